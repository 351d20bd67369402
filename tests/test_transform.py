"""`cbp_jax/transform.py`: the state's layout, its views and the refusal of the old one."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cbp_jax
from cbp_jax import transform


def mlp(hidden=(6, 5), inputs=4, outputs=3, seed=0):
  model = cbp_jax.models.MLP(hidden=hidden, outputs=outputs)
  params = model.init(jax.random.key(seed), jnp.ones((1, inputs)))["params"]
  return model, params


def one_step(model, params, tx, state, seed=0):
  x = jax.random.normal(jax.random.key(seed), (8, 4))

  def loss_fn(p):
    out, acts = cbp_jax.apply_with_activations(model, p, x)
    return jnp.mean(out ** 2), acts

  (_, acts), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return tx.update(g, state, params, activations=acts)


def test_state_holds_one_layer_state_per_layer_and_the_old_views_read_it():
  model, params = mlp()
  tx = cbp_jax.cbp(cbp_jax.graph_from_params(params), key=0, replacement_rate=0.5,
                   maturity_threshold=0)
  _, state = one_step(model, params, tx, tx.init(params))
  assert set(state.layers) == {"Dense_0", "Dense_1"}
  assert all(isinstance(l, cbp_jax.LayerState) for l in state.layers.values())
  for name, layer in state.layers.items():
    assert state.statistics[name] is layer.statistics
    assert state.pending[name] is layer.pending
    assert state.replaced_total[name] is layer.replaced_total
    assert state.last_replaced[name] is layer.last_replaced
    # rate 0.5 of 6 (5) eligible units: 3 (2) replaced, and the count says so.
    assert int(layer.replaced_total) == int(np.sum(layer.last_replaced)) == {"Dense_0": 3,
                                                                             "Dense_1": 2}[name]
  with pytest.raises(AttributeError):
    state.statistics = {}  # A view, not a field.


def test_layer_after_step_restarts_exactly_the_replaced_units():
  stats = cbp_jax.utility.UnitStatistics(
      utility=jnp.array([1.0, 2.0, 3.0]), mean_activation=jnp.array([0.5, 0.75, 0.25]),
      age=jnp.array([10, 20, 30], jnp.int32))
  mask = jnp.array([False, True, False])
  after = transform._layer_after_step(stats, jnp.float32(0.25), jnp.int32(4), mask)
  np.testing.assert_array_equal(after.statistics.utility, [1.0, 0.0, 3.0])
  np.testing.assert_array_equal(after.statistics.mean_activation, [0.5, 0.0, 0.25])
  np.testing.assert_array_equal(after.statistics.age, [10, 0, 30])
  assert float(after.pending) == 0.25
  assert int(after.replaced_total) == 5
  np.testing.assert_array_equal(after.last_replaced, mask)


OldCbpState = collections.namedtuple(
    "OldCbpState", ["statistics", "pending", "replaced_total", "last_replaced", "nonfinite",
                    "skipped", "decay_rate", "key", "magnitudes", "inner_state"])


@pytest.mark.parametrize("form", ["namedtuple", "dict"])
def test_a_state_of_the_old_layout_is_refused_saying_what_changed(form):
  model, params = mlp()
  tx = cbp_jax.cbp(cbp_jax.graph_from_params(params), key=0)
  new = tx.init(params)
  fields = dict(statistics=new.statistics, pending=new.pending,
                replaced_total=new.replaced_total, last_replaced=new.last_replaced,
                nonfinite=new.nonfinite, skipped=new.skipped, decay_rate=new.decay_rate,
                key=new.key, magnitudes=new.magnitudes, inner_state=new.inner_state)
  old = OldCbpState(**fields) if form == "namedtuple" else fields
  with pytest.raises(ValueError, match=r"old layout.*one LayerState per layer in CbpState.layers"):
    one_step(model, params, tx, old)


def test_a_state_of_another_kind_is_refused():
  model, params = mlp()
  tx = cbp_jax.cbp(cbp_jax.graph_from_params(params), key=0)
  with pytest.raises(ValueError, match="needs the state that init returned, got EmptyState"):
    one_step(model, params, tx, optax.EmptyState())
