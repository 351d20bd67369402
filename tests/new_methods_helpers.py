"""Helpers of the 2023-2025 methods' test modules: a small MLP, its gradients and activations, a jitted step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cbp_jax


def mlp(seed=0, batch=8, inputs=5, hidden=(6, 6), outputs=3, layer_norm=False):
  model = cbp_jax.models.MLP(hidden=hidden, outputs=outputs, layer_norm=layer_norm)
  x = jax.random.normal(jax.random.key(100 + seed), (batch, inputs))
  y = jax.random.normal(jax.random.key(200 + seed), (batch, outputs))
  params = model.init(jax.random.key(seed), x)["params"]
  return model, params, x, y


def grads_and_acts(model, params, x, y):
  def loss(p):
    out, acts = cbp_jax.apply_with_activations(model, p, x)
    return jnp.mean((out - y) ** 2), acts

  (_, acts), g = jax.value_and_grad(loss, has_aux=True)(params)
  return g, acts


def jitted_step(model, tx, x, y):
  """One jitted training step of ``tx`` (with activations) on ``(x, y)``."""

  @jax.jit
  def step(p, state):
    g, acts = grads_and_acts(model, p, x, y)
    u, state = tx.update(g, state, p, activations=acts)
    return optax.apply_updates(p, u), state

  return step


def kill(params, layer, unit):
  """Makes ``unit`` of ``layer`` output 0 on any input (ReLU of -1): no gradient reaches it."""
  params = jax.tree.map(lambda a: a, params)
  params[layer] = dict(params[layer])
  params[layer]["kernel"] = params[layer]["kernel"].at[:, unit].set(0.0)
  params[layer]["bias"] = params[layer]["bias"].at[unit].set(-1.0)
  return params


def np_leaves(tree):
  return [np.asarray(a, np.float64) for a in jax.tree.leaves(tree)]


def check_unit_reset(old, new, plain, layer, consumer, units):
  """Units of ``layer`` were reset (bias 0, outgoing rows 0); every other entry equals ``plain``."""
  units = sorted(units)
  k_new, k_plain = np.asarray(new[layer]["kernel"]), np.asarray(plain[layer]["kernel"])
  other = [i for i in range(k_new.shape[1]) if i not in units]
  np.testing.assert_array_equal(k_new[:, other], k_plain[:, other])
  assert not np.allclose(k_new[:, units], np.asarray(old[layer]["kernel"])[:, units])
  np.testing.assert_array_equal(np.asarray(new[layer]["bias"])[units], 0.0)
  np.testing.assert_array_equal(np.asarray(new[consumer]["kernel"])[units], 0.0)
  rows = [i for i in range(k_new.shape[1]) if i not in units]
  np.testing.assert_array_equal(
    np.asarray(new[consumer]["kernel"])[rows], np.asarray(plain[consumer]["kernel"])[rows]
  )
