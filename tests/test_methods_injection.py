"""`cbp_jax/methods/_injection.py`: plasticity injection: output bitwise unchanged at injection, frozen
parameters unchanged, only the fresh copy learns, inside a vmapped `lax.scan`."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cbp_jax
from cbp_jax import methods as M
from tests.new_methods_helpers import mlp


def test_injection_output_unchanged_and_only_the_fresh_copy_learns():
  model, params, x, y = mlp()
  apply = M.injection_apply(lambda p, x: model.apply({"params": p}, x))
  loss = lambda p: jnp.mean((apply(p, x) - y) ** 2)
  tx = M.injection_optimizer(optax.adamw(1e-2, weight_decay=0.1))
  p = M.injectable(params, "Dense_2")
  state = tx.init(p)
  np.testing.assert_array_equal(np.asarray(apply(p, x)), np.asarray(model.apply({"params": params}, x)))

  @jax.jit
  def step(p, state):
    u, state = tx.update(jax.grad(loss)(p), state, p)
    return optax.apply_updates(p, u), state

  p1, state = step(p, state)  # Before the injection: the base learns, the copies do not.
  assert not np.allclose(p1.base["Dense_2"]["kernel"], p.base["Dense_2"]["kernel"])
  for part in (p1.fresh, p1.anchor):
    np.testing.assert_array_equal(np.asarray(part["Dense_2/kernel"]), np.asarray(p.fresh["Dense_2/kernel"]))
  before = apply(p1, x)
  fresh = model.init(jax.random.key(9), x)["params"]
  p2, state = jax.jit(M.inject)(p1, state, fresh)
  np.testing.assert_array_equal(np.asarray(apply(p2, x)), np.asarray(before))  # Bitwise.
  np.testing.assert_array_equal(
    np.asarray(p2.fresh["Dense_2/kernel"]), np.asarray(fresh["Dense_2"]["kernel"])
  )
  p3, state = step(p2, state)
  for path in ("Dense_2/kernel", "Dense_2/bias"):
    layer, leaf = path.split("/")
    np.testing.assert_array_equal(np.asarray(p3.base[layer][leaf]), np.asarray(p2.base[layer][leaf]))
    np.testing.assert_array_equal(np.asarray(p3.anchor[path]), np.asarray(p2.anchor[path]))
    assert not np.allclose(p3.fresh[path], p2.fresh[path])
  assert not np.allclose(p3.base["Dense_0"]["kernel"], p2.base["Dense_0"]["kernel"])
  # A second injection changes nothing.
  p4, _ = M.inject(p3, state, model.init(jax.random.key(10), x)["params"])
  np.testing.assert_array_equal(
    np.asarray(p4.fresh["Dense_2/kernel"]), np.asarray(p3.fresh["Dense_2/kernel"])
  )


def test_injection_inside_a_scan_vmapped_over_seeds():
  model, params, x, y = mlp()
  apply = M.injection_apply(lambda p, x: model.apply({"params": p}, x))
  loss = lambda p: jnp.mean((apply(p, x) - y) ** 2)
  tx = M.injection_optimizer(optax.sgd(0.05))

  def run(key, at):
    p0 = model.init(key, x)["params"]
    p = M.injectable(p0, ["Dense_2"])
    state = tx.init(p)

    def body(carry, t):
      p, state = carry
      p, state = M.inject(p, state, model.init(jax.random.fold_in(key, 1), x)["params"], when=t == at)
      u, state = tx.update(jax.grad(loss)(p), state, p)
      return (optax.apply_updates(p, u), state), loss(p)

    (p, state), losses = jax.lax.scan(body, (p, state), jnp.arange(6))
    return p, state.injected, losses

  keys = jax.random.split(jax.random.key(0), 2)
  p, injected, losses = jax.jit(jax.vmap(run))(keys, jnp.array([2, 100]))
  np.testing.assert_array_equal(np.asarray(injected), [True, False])
  assert np.isfinite(np.asarray(losses)).all()
  for s in range(2):
    single, _, single_losses = run(keys[s], [2, 100][s])
    np.testing.assert_allclose(np.asarray(losses[s]), np.asarray(single_losses), rtol=1e-5)


def test_plasticity_injection_recipe_is_the_four_pieces():
  model, params, x, y = mlp()
  fn = lambda p, x: model.apply({"params": p}, x)
  recipe = M.plasticity_injection(fn, optax.sgd(0.1), ["Dense_1", "Dense_2"])
  p = recipe.prepare(params)
  assert set(p.fresh) == {"Dense_1/kernel", "Dense_1/bias", "Dense_2/kernel", "Dense_2/bias"}
  state = recipe.optimizer.init(p)
  p, state = recipe.inject(p, state, model.init(jax.random.key(3), x)["params"])
  assert bool(state.injected)
  np.testing.assert_array_equal(np.asarray(recipe.apply(p, x)), np.asarray(fn(params, x)))
  for bad in ([], "", [3]):
    with pytest.raises(ValueError, match="plasticity_injection: paths must be non-empty strings"):
      M.plasticity_injection(fn, optax.sgd(0.1), bad)


def test_injection_refuses_bad_input():
  _, params, _, _ = mlp()
  with pytest.raises(ValueError, match="no parameter at or under path 'Head'"):
    M.injectable(params, "Head")
  with pytest.raises(ValueError, match="init needs InjectedParams"):
    M.injection_optimizer(optax.sgd(0.1)).init(params)
  graph = cbp_jax.graph_from_params(params)
  with pytest.raises(ValueError, match="cannot be initialised on InjectedParams.*'Dense_0/kernel'"):
    M.injection_optimizer(cbp_jax.cbp(graph, key=0)).init(M.injectable(params, "Dense_2"))
  p = M.injectable(params, "Dense_2")
  state = M.injection_optimizer(optax.sgd(0.1)).init(p)
  with pytest.raises(ValueError, match=r"fresh_params\['Dense_2/bias'\] must have shape \(3,\), got \(4,\)"):
    M.inject(p, state, mlp(outputs=4)[1])
  with pytest.raises(ValueError, match="state of injection_optimizer"):
    M.inject(p, state.inner_state, params)
