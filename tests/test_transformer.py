"""CBP in a pre-LN transformer, with the graph traced from the computation (README recipe)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import cbp_jax

VOCAB, LENGTH, DIM, HIDDEN = 11, 8, 16, 32


class Block(nn.Module):
  """``x + attn(LN(x))``, then ``x + fc2(gelu(fc1(LN(x))))``; records the MLP's hidden units."""

  record_stream: bool = False

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2)(y, y)
    fc1 = nn.Dense(HIDDEN, name="fc1")
    h = cbp_jax.sow_activation(fc1, nn.gelu(fc1(nn.LayerNorm()(x))))
    x = x + nn.Dense(DIM, name="fc2")(h)
    return cbp_jax.sow_activation(self, x) if self.record_stream else x


class Transformer(nn.Module):
  depth: int = 2
  record_stream: bool = False

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, DIM)(tokens)
    x = x + self.param("position", nn.initializers.normal(0.02), (LENGTH, DIM))
    for i in range(self.depth):
      x = Block(self.record_stream, name=f"block_{i}")(x)
    return nn.Dense(VOCAB, name="head")(nn.LayerNorm()(x))


MODEL = Transformer()


def forward(params, tokens):
  return cbp_jax.apply_with_activations(MODEL, params, tokens)


def loss_fn(params, tokens, targets):
  logits, acts = forward(params, tokens)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(), acts


def data(key, batch=4):
  k1, k2 = jax.random.split(key)
  return (
    jax.random.randint(k1, (batch, LENGTH), 0, VOCAB),
    jax.random.randint(k2, (batch, LENGTH), 0, VOCAB),
  )


def init(key):
  return MODEL.init(key, jnp.zeros((1, LENGTH), jnp.int32))["params"]


def test_only_the_mlp_hidden_units_are_in_the_traced_graph():
  params = init(jax.random.key(0))
  graph = cbp_jax.trace_graph(forward, params, jnp.zeros((2, LENGTH), jnp.int32))
  assert graph == cbp_jax.LayerGraph(
    [
      cbp_jax.Layer(
        f"block_{i}/fc1",
        f"block_{i}/fc1/kernel",
        f"block_{i}/fc1/bias",
        [cbp_jax.Consumer(f"block_{i}/fc2/kernel", f"block_{i}/fc2/bias")],
        activation="gelu",
      )
      for i in range(2)
    ]
  )


def test_the_residual_stream_is_refused_with_a_message_that_says_what_to_declare():
  model = Transformer(record_stream=True)
  tokens = jnp.zeros((2, LENGTH), jnp.int32)
  params = model.init(jax.random.key(0), tokens)["params"]
  with pytest.raises(
    ValueError,
    match=(
      # Both kernels are listed; their order differs between flax 0.12.7 and 0.12.8.
      r"layer 'block_0': its units are made by more than one product \(.*kernel "
      r"'block_0/fc2/kernel'.*residual connection.*hidden units of each block's MLP, not the "
      r"residual stream"
    ),
  ):
    cbp_jax.trace_graph(lambda p, t: cbp_jax.apply_with_activations(model, p, t), params, tokens)


def make_step(tx):
  @jax.jit
  def step(params, state, tokens, targets):
    (loss, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens, targets)
    updates, state = tx.update(grads, state, params, activations=acts)
    return optax.apply_updates(params, updates), state, loss

  return step


@pytest.mark.parametrize("correct", [True, False])
def test_a_reset_with_bias_correction_preserves_the_function(correct):
  """With constant hidden units (zero fc1 kernels) a reset must not move the output."""
  params = init(jax.random.key(0))
  biases = jax.random.uniform(jax.random.key(1), (HIDDEN,), minval=0.5, maxval=1.5)
  for i in range(2):
    params[f"block_{i}"]["fc1"] = {"kernel": jnp.zeros((DIM, HIDDEN)), "bias": biases}
  graph = cbp_jax.trace_graph(forward, params, jnp.zeros((2, LENGTH), jnp.int32))
  tx = optax.chain(
    optax.sgd(0.0),
    cbp_jax.cbp(graph, key=0, replacement_rate=0.25, maturity_threshold=2, next_bias_correction=correct),
  )
  state, step = tx.init(params), make_step(tx)
  probe, _ = data(jax.random.key(7), batch=3)
  before = MODEL.apply({"params": params}, probe)
  for i in range(5):
    params, state, _ = step(params, state, *data(jax.random.key(i)))
  assert all(int(s["replaced"]) > 0 for s in cbp_jax.unit_stats(state).values())
  after = MODEL.apply({"params": params}, probe)
  if correct:
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
  else:
    assert np.max(np.abs(after - before)) > 1e-2


def expected_replacements(steps, width, rate, maturity):
  """The accumulate-mode count rule, replayed on ages alone (which units go does not matter)."""
  ages, pending, total = np.zeros(width, int), np.float32(0), 0
  bound = int(np.ceil(np.float32(rate) * np.float32(width)))
  for _ in range(steps):
    ages += 1
    eligible = np.flatnonzero(ages > maturity)
    owed = pending + np.float32(rate) * np.float32(len(eligible))
    due = np.floor(owed)
    count = int(min(due, len(eligible), bound))
    pending = owed - count - (due - min(due, len(eligible)))
    ages[eligible[:count]] = 0
    total += count
  return total


def test_a_vmapped_four_seed_run_is_one_program_that_replaces_units():
  graph = cbp_jax.trace_graph(forward, init(jax.random.key(0)), jnp.zeros((2, LENGTH), jnp.int32))

  def train(key):
    k_init, k_cbp, k_data = jax.random.split(key, 3)
    params = init(k_init)
    # The model's own kernel_init: replaced units start like their neighbours did.
    tx = cbp_jax.cbp(
      graph,
      key=k_cbp,
      replacement_rate=0.05,
      maturity_threshold=5,
      optimizer=optax.adam(1e-2),
      init=nn.initializers.lecun_normal(),
    )

    def one_step(carry, k):
      params, state = carry
      (loss, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *data(k))
      updates, state = tx.update(grads, state, params, activations=acts)
      return (optax.apply_updates(params, updates), state), loss

    (params, state), losses = jax.lax.scan(one_step, (params, tx.init(params)), jax.random.split(k_data, 20))
    replaced = sum(s["replaced"] for s in cbp_jax.unit_stats(state).values())
    return losses, replaced, params["block_0"]["fc1"]["kernel"]

  run = jax.jit(jax.vmap(train)).lower(jax.random.split(jax.random.key(3), 4)).compile()
  losses, replaced, kernels = run(jax.random.split(jax.random.key(3), 4))
  assert np.all(np.isfinite(losses))
  assert np.all(np.asarray(replaced) > 0)
  np.testing.assert_array_equal(replaced, 2 * expected_replacements(20, HIDDEN, 0.05, 5))
  assert len({np.asarray(k).tobytes() for k in kernels}) == 4  # Seeds are independent.
