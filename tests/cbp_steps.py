"""Small nets, batches and a jitted `cbp()` step shared by the library's test modules."""

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

import cbp_jax


def mlp(hidden=(6, 5), inputs=4, outputs=3, seed=0, **kw):
  model = cbp_jax.models.MLP(hidden=hidden, outputs=outputs, **kw)
  params = model.init(jax.random.key(seed), jnp.ones((1, inputs)))["params"]
  return model, params


def make_step(model, tx):
  def loss_fn(p, x, y):
    out, acts = cbp_jax.apply_with_activations(model, p, x)
    return jnp.mean((out - y) ** 2), acts

  @jax.jit
  def step(params, state, x, y):
    (_, acts), g = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
    updates, state = tx.update(g, state, params, activations=acts)
    return optax.apply_updates(params, updates), state, updates, acts

  return step


def batches(n, inputs=4, outputs=3, batch=8, seed=0):
  key = jax.random.key(seed + 100)
  for i in range(n):
    kx, ky = jax.random.split(jax.random.fold_in(key, i))
    yield jax.random.normal(kx, (batch, inputs)), jax.random.normal(ky, (batch, outputs))


def conv_graph_params():
  model = cbp_jax.models.ConvNet(outputs=2)
  params = model.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)))["params"]
  return model, params


class FanOut(nn.Module):
  """x -> Dense_0 -> LayerNorm -> relu -> (Dense_1 + Dense_2)."""

  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(6)
    h = cbp_jax.sow_activation(dense, nn.relu(nn.LayerNorm()(dense(x))))
    return nn.Dense(2)(h) + nn.Dense(2)(h)


def fan_out_graph():
  return cbp_jax.LayerGraph(
    [
      cbp_jax.Layer(
        name="Dense_0",
        kernel="Dense_0/kernel",
        bias="Dense_0/bias",
        norm="LayerNorm_0",
        consumers=[
          cbp_jax.Consumer("Dense_1/kernel", "Dense_1/bias"),
          cbp_jax.Consumer("Dense_2/kernel", "Dense_2/bias"),
        ],
      )
    ]
  )


class WithBatchNorm(nn.Module):
  """x -> Dense_0 -> BatchNorm -> relu -> Dense_1."""

  @nn.compact
  def __call__(self, x, train=True):
    dense = nn.Dense(6)
    h = nn.relu(nn.BatchNorm(use_running_average=not train)(dense(x)))
    return nn.Dense(2)(cbp_jax.sow_activation(dense, h))
