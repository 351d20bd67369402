"""cbp() with Optax, nnx, jit/vmap/scan, dtypes, and its error messages."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import cbp_jax
from tests.cbp_steps import batches, make_step, mlp


def run(tx, steps=12, hidden=(6, 5), seed=0, dtype=jnp.float32):
  model, params = mlp(hidden=hidden, seed=seed, param_dtype=dtype)
  state = tx(params).init(params)
  step = make_step(model, tx(params))
  for x, y in batches(steps):
    params, state, _, _ = step(params, state, x.astype(dtype), y.astype(dtype))
  return params, state


def graph_of(params):
  return cbp_jax.graph_from_params(params)


@pytest.mark.parametrize("opt", [optax.sgd(0.01), optax.adam(1e-3), optax.adamw(1e-3)])
def test_last_in_a_chain_after_common_optimizers(opt):
  tx = lambda p: optax.chain(opt, cbp_jax.cbp(graph_of(p), key=0, replacement_rate=0.1, maturity_threshold=2))
  params, state = run(tx)
  assert int(cbp_jax.unit_stats(state)["Dense_0"]["replaced"]) > 0
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))


def wrapped_state_check(inner, fresh_value):
  """Wrapping form: replaced entries' statistics restart, the others don't."""
  model, params = mlp(hidden=(6,))
  tx = cbp_jax.cbp(graph_of(params), key=0, replacement_rate=1 / 6, maturity_threshold=3, optimizer=inner)
  state = tx.init(params)
  ref_state = inner.init(params)
  update = jax.jit(lambda g, s, p, a: tx.update(g, s, p, activations=a))
  ref_update = jax.jit(inner.update)
  for x, y in batches(4):
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
    _, acts = cbp_jax.apply_with_activations(model, params, x)
    _, state = update(grads, state, params, acts)
    _, ref_state = ref_update(grads, ref_state, params)
  mask = np.asarray(state.last_replaced["Dense_0"])
  assert mask.sum() == 1
  mine = jax.tree.leaves(state.inner_state)
  theirs = jax.tree.leaves(ref_state)
  checked = 0
  for a, b in zip(mine, theirs):
    if a.shape == (4, 6):  # Dense_0 kernel-shaped statistics: columns are units.
      np.testing.assert_array_equal(a[:, mask], fresh_value)
      np.testing.assert_array_equal(a[:, ~mask], b[:, ~mask])
      checked += 1
    if a.shape == (6, 3):  # Head kernel: rows read the units.
      np.testing.assert_array_equal(a[mask], fresh_value)
      np.testing.assert_array_equal(a[~mask], b[~mask])
  assert checked > 0


def test_wrapped_adam_moments_of_replaced_units_restart():
  wrapped_state_check(optax.adam(1e-3), 0.0)


def test_wrapped_momentum_trace_restarts():
  wrapped_state_check(optax.sgd(1e-2, momentum=0.9), 0.0)


def test_wrapped_adagrad_restarts_at_its_initial_accumulator():
  # Not zero: the value a fresh init gives, so any optimizer is handled.
  wrapped_state_check(optax.adagrad(1e-2, initial_accumulator_value=0.25), 0.25)


def test_under_multisteps():
  model, params = mlp()
  tx = optax.MultiSteps(
    cbp_jax.cbp(
      graph_of(params), key=0, replacement_rate=0.2, maturity_threshold=1, optimizer=optax.sgd(0.01)
    ),
    every_k_schedule=2,
  )
  state = tx.init(params)
  step = make_step(model, tx)
  for x, y in batches(10):
    params, state, _, _ = step(params, state, x, y)
  stats = cbp_jax.unit_stats(state)
  # Five inner steps: ages count inner steps only.
  assert int(stats["Dense_0"]["age"].max()) <= 5
  assert int(stats["Dense_0"]["replaced"]) > 0


class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List(
      [nnx.Linear(4, 6, rngs=rngs), nnx.Linear(6, 5, rngs=rngs), nnx.Linear(5, 3, rngs=rngs)]
    )

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = cbp_jax.sow_activation(layer, nnx.relu(layer(x)))
    return self.layers[-1](x)


def test_nnx_optimizer_update_with_activations():
  model = NnxMLP(nnx.Rngs(0))
  graph = cbp_jax.graph_from_params(nnx.state(model, nnx.Param))
  assert graph.names == ("layers/0", "layers/1")
  tx = cbp_jax.cbp(graph, key=0, replacement_rate=0.2, maturity_threshold=1, optimizer=optax.adam(1e-2))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    def loss_fn(model):
      out, records = nnx.capture(model, nnx.Intermediate)(x)
      return jnp.mean((out - y) ** 2), cbp_jax.collect_activations(records)

    (loss, acts), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads, activations=acts)
    return loss

  for x, y in batches(10):
    train_step(model, optimizer, x, y)
  stats = cbp_jax.unit_stats(optimizer.opt_state)
  assert int(stats["layers/0"]["replaced"]) > 0


def test_vmap_over_keys_gives_different_reinitialisations():
  model, params = mlp(hidden=(6,))
  graph = graph_of(params)
  x, y = next(batches(1))

  def one_seed(key):
    tx = optax.chain(
      optax.sgd(0.0), cbp_jax.cbp(graph, key=key, replacement_rate=1 / 6, maturity_threshold=0)
    )
    state = tx.init(params)
    _, acts = cbp_jax.apply_with_activations(model, params, x)
    updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params, activations=acts)
    return optax.apply_updates(params, updates)["Dense_0"]["kernel"]

  kernels = jax.jit(jax.vmap(one_seed))(jax.random.split(jax.random.key(0), 3))
  assert not np.allclose(kernels[0], kernels[1])
  np.testing.assert_array_equal(kernels[0], one_seed(jax.random.split(jax.random.key(0), 3)[0]))


def test_traced_hyperparameters_in_a_vmapped_scanned_sweep():
  model, params = mlp(hidden=(8,))
  graph = graph_of(params)
  xs = jax.random.normal(jax.random.key(0), (20, 8, 4))
  ys = jax.random.normal(jax.random.key(1), (20, 8, 3))

  def train(rate, maturity, decay):
    tx = optax.chain(
      optax.sgd(0.01),
      cbp_jax.cbp(
        graph,
        key=0,
        replacement_rate=rate,
        maturity_threshold=maturity,
        decay_rate=decay,
        max_replacements_per_step=8,
      ),
    )

    def body(carry, batch):
      p, s = carry
      x, y = batch
      loss_fn = lambda p: (lambda o: (jnp.mean((o[0] - y) ** 2), o[1]))(
        cbp_jax.apply_with_activations(model, p, x)
      )
      (_, acts), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
      u, s = tx.update(g, s, p, activations=acts)
      return (optax.apply_updates(p, u), s), None

    (_, s), _ = jax.lax.scan(body, (params, tx.init(params)), (xs, ys))
    return s[1].replaced_total["Dense_0"]

  rates = jnp.array([0.0, 1 / 16, 1 / 8])
  counts = jax.jit(jax.vmap(train))(rates, jnp.array([0, 0, 5]), jnp.array([0.9, 0.99, 0.5]))
  # maturity 0: every unit always eligible -> floor(20 * 8 * rate);
  # maturity 5: steps 6..20 with eligibility drops after replacements (<= 15 * 8 / 8).
  assert int(counts[0]) == 0
  assert int(counts[1]) == 10
  assert 0 < int(counts[2]) <= 15


def test_no_recompilation_on_second_call():
  model, params = mlp()
  tx = optax.chain(optax.sgd(0.01), cbp_jax.cbp(graph_of(params), key=0))
  state = tx.init(params)
  step = make_step(model, tx)
  for x, y in batches(3):
    params, state, _, _ = step(params, state, x, y)
  assert step._cache_size() == 1


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_low_and_single_precision_params(dtype):
  tx = lambda p: optax.chain(
    optax.sgd(0.01), cbp_jax.cbp(graph_of(p), key=0, replacement_rate=0.1, maturity_threshold=2)
  )
  params, state = run(tx, dtype=dtype)
  assert all(x.dtype == dtype for x in jax.tree.leaves(params))
  assert int(cbp_jax.unit_stats(state)["Dense_0"]["replaced"]) > 0
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))


def test_double_precision_params():
  with jax.enable_x64(True):
    tx = lambda p: optax.chain(
      optax.sgd(0.01), cbp_jax.cbp(graph_of(p), key=0, replacement_rate=0.1, maturity_threshold=2)
    )
    params, state = run(tx, dtype=jnp.float64)
    assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(params))
    assert int(cbp_jax.unit_stats(state)["Dense_0"]["replaced"]) > 0


# --- Errors ---------------------------------------------------------------


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"replacement_rate": -0.1}, "replacement_rate must be in \\[0.0, 1.0\\], got -0.1"),
    ({"replacement_rate": 1.5}, "replacement_rate must be in \\[0.0, 1.0\\], got 1.5"),
    ({"decay_rate": 1.0}, "decay_rate must be in \\[0.0, 1.0\\), got 1.0"),
    ({"maturity_threshold": -1}, "maturity_threshold must be >= 0, got -1"),
    ({"utility": "bogus"}, "utility must be one of .* got 'bogus'"),
    ({"init": "he"}, "init must be one of .* got 'he'"),
    ({"init": lambda key: key}, "not a jax.nn.initializers-style callable init\\(key, shape, dtype\\)"),
    ({"init": lambda key, shape, dtype: jnp.zeros(3)}, "must return an array of the requested shape"),
    ({"count_basis": "all"}, "count_basis must be one of .* got 'all'"),
    ({"max_replacements_per_step": 0}, "max_replacements_per_step must be a positive int"),
  ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, message):
  _, params = mlp()
  with pytest.raises(ValueError, match=message):
    cbp_jax.cbp(graph_of(params), key=0, **kwargs)


def test_a_whole_variables_dict_is_refused_at_init_saying_what_to_pass():
  model, params = mlp()
  variables = {"params": params}
  with pytest.raises(ValueError, match=r"whole variables dict: pass variables\['params'\]"):
    cbp_jax.cbp(graph_of(params), key=0).init(variables)


def test_a_state_initialised_for_other_widths_names_the_layer_and_both_widths():
  model, params = mlp(hidden=(6, 5))
  _, wider = mlp(hidden=(8, 5))
  tx = cbp_jax.cbp(graph_of(params), key=0)
  state = tx.init(params)
  grads = jax.tree.map(jnp.zeros_like, wider)
  _, acts = cbp_jax.apply_with_activations(model.clone(hidden=(8, 5)), wider, jnp.ones((2, 4)))
  with pytest.raises(
    ValueError, match="layer 'Dense_0' has 8 units in these params but the state was initialised for 6"
  ):
    tx.update(grads, state, wider, activations=acts)


def test_reset_batch_stats_without_the_norms_statistics_says_what_to_pass():
  from tests.cbp_steps import WithBatchNorm

  model = WithBatchNorm()
  variables = model.init(jax.random.key(0), jnp.ones((2, 4)))
  graph = cbp_jax.graph_from_params(variables["params"])
  state = cbp_jax.cbp(graph, key=0).init(variables["params"])
  with pytest.raises(
    ValueError,
    match=r"none of the norms' running statistics.*"
    r"pass variables\['batch_stats'\]",
  ):
    cbp_jax.reset_batch_stats(variables, graph, state)
  with pytest.raises(ValueError, match="It holds parameters"):
    cbp_jax.reset_batch_stats(variables["params"], graph, state)


def test_activation_errors_name_the_layer():
  model, params = mlp(hidden=(6, 5))
  tx = cbp_jax.cbp(graph_of(params), key=0)
  state = tx.init(params)
  grads = jax.tree.map(jnp.zeros_like, params)
  _, acts = cbp_jax.apply_with_activations(model, params, jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="activations has no entry for layer 'Dense_1'"):
    tx.update(grads, state, params, activations={"Dense_0": acts["Dense_0"]})
  with pytest.raises(
    ValueError, match="layer 'Dense_1' must have the layer's 5 units .* got shape \\(2, 7\\)"
  ):
    tx.update(grads, state, params, activations={**acts, "Dense_1": jnp.ones((2, 7))})
  with pytest.raises(ValueError, match="needs the keyword argument activations"):
    tx.update(grads, state, params)
  with pytest.raises(ValueError, match="update needs params"):
    tx.update(grads, state, activations=acts)
