"""cbp_jax.prng: the fused threefry draws equal jax.random's, bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cbp_jax
from cbp_jax import prng

SHAPES = [(), (7,), (3, 5), (2, 3, 4), (1000,)]


@pytest.mark.parametrize("seed", [0, 1, 2**31 + 5])
def test_split_uniform_normal_equal_jax_random(seed):
  key = jax.random.key(seed)
  for num in (1, 2, 4, 9):
    np.testing.assert_array_equal(
      jax.random.key_data(prng.split(key, num)), jax.random.key_data(jax.random.split(key, num))
    )
  for shape in SHAPES:
    np.testing.assert_array_equal(prng.uniform(key, shape), jax.random.uniform(key, shape, jnp.float32))
    np.testing.assert_array_equal(
      prng.uniform(key, shape, -1.0, 1.0), jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0)
    )
    np.testing.assert_array_equal(prng.normal(key, shape), jax.random.normal(key, shape, jnp.float32))


def test_equal_under_jit_and_vmap():
  keys = jax.random.split(jax.random.key(3), 5)
  np.testing.assert_array_equal(
    jax.jit(jax.vmap(lambda k: prng.uniform(k, (4, 2))))(keys),
    jax.vmap(lambda k: jax.random.uniform(k, (4, 2)))(keys),
  )
  np.testing.assert_array_equal(
    jax.random.key_data(jax.jit(jax.vmap(lambda k: prng.split(k, 3)))(keys)),
    jax.random.key_data(jax.vmap(lambda k: jax.random.split(k, 3))(keys)),
  )


def test_other_key_implementations_go_to_jax_random():
  key = jax.random.key(0, impl="rbg")
  np.testing.assert_array_equal(prng.uniform(key, (5,)), jax.random.uniform(key, (5,)))
  np.testing.assert_array_equal(
    jax.random.key_data(prng.split(key, 3)), jax.random.key_data(jax.random.split(key, 3))
  )


def test_too_many_numbers_are_refused_by_shape():
  with pytest.raises(ValueError, match=r"2\*\*32.*\(65536, 65536\)"):
    jax.eval_shape(lambda k: prng.uniform(k, (65536, 65536)), jax.random.key(0))


def test_cbp_step_compiles_without_loops():
  """The reason for the module: no rolled threefry ``while`` in a CBP step on CPU."""
  model = cbp_jax.models.MLP(hidden=(6,), outputs=1)
  x = jnp.ones((2, 3))
  params = model.init(jax.random.key(0), x)["params"]
  tx = optax.chain(
    optax.sgd(0.1), cbp_jax.cbp(cbp_jax.graph_from_params(params), key=0, accumulate=False, utility="random")
  )
  state = tx.init(params)

  def step(params, state):
    (_, acts), g = jax.value_and_grad(
      lambda p: (lambda y, a: (jnp.sum(y**2), a))(*cbp_jax.apply_with_activations(model, p, x)), has_aux=True
    )(params)
    return tx.update(g, state, params, activations=acts)

  hlo = jax.jit(step).lower(params, state).compile().as_text()
  assert " while(" not in hlo
