"""The method name -> optax optimizer switch: each method's first update by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cbp_jax
from experiments import optimizers

PARAMS = {
  "Dense_0": {"kernel": jnp.array([[1.0, -2.0]]), "bias": jnp.array([0.5, 0.0])},
  "Dense_1": {"kernel": jnp.array([[3.0], [-1.0]]), "bias": jnp.array([0.25])},
}
GRADS = jax.tree.map(lambda p: 0.5 * p + 1.0, PARAMS)
LR, WD = 0.1, 0.2


def _update(tx, steps=1):
  state = tx.init(PARAMS)
  for _ in range(steps):
    updates, state = tx.update(GRADS, state, PARAMS)
  return updates


def _close(tree, expected):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), tree, expected)


def test_sgd_methods_by_hand():
  _close(_update(optimizers.optimizer("bp", {"step_size": LR})), jax.tree.map(lambda g: -LR * g, GRADS))
  _close(
    _update(optimizers.optimizer("l2", {"step_size": LR, "weight_decay": WD})),
    jax.tree.map(lambda g, p: -LR * (g + WD * p), GRADS, PARAMS),
  )
  # Momentum 0.9, second step of the same gradient: -lr * (1 + 0.9) g.
  _close(
    _update(optimizers.optimizer("bp", {"step_size": LR, "momentum": 0.9}), steps=2),
    jax.tree.map(lambda g: -LR * 1.9 * g, GRADS),
  )


def test_snp_shrinks_after_sgd_or_decays_in_the_gradient():
  key = jax.random.key(0)
  shrink = 1 - LR * WD
  hp = {"step_size": LR, "weight_decay": WD, "noise_scale": 0.0, "shrink": shrink}
  # Shrink form: p' = shrink * (p - lr g), so the update is p' - p.
  _close(
    _update(optimizers.optimizer("snp", hp, key=key)),
    jax.tree.map(lambda g, p: shrink * (p - LR * g) - p, GRADS, PARAMS),
  )
  hp = {"step_size": LR, "weight_decay": WD, "noise_scale": 0.0, "momentum": 0.0}
  _close(
    _update(optimizers.optimizer("snp", hp, key=key, snp_decay="gradient")),
    jax.tree.map(lambda g, p: -LR * (g + WD * p), GRADS, PARAMS),
  )


def test_adam_first_update_is_the_step_size_times_the_sign():
  hp = {"step_size": LR, "b1": 0.9, "b2": 0.999, "eps": 1e-12}
  _close(_update(optimizers.optimizer("adam", hp)), jax.tree.map(lambda g: -LR * jnp.sign(g), GRADS))


def test_cbp_follows_sgd_or_wraps_it():
  graph = cbp_jax.graph_from_params(PARAMS)
  hp = {
    "step_size": LR,
    "replacement_rate": 0.0,
    "maturity_threshold": 100,
    "decay_rate": 0.9,
    "utility": "contribution",
    "accumulate": True,
  }
  chained = optimizers.optimizer("cbp", hp, graph, jax.random.key(0))
  assert isinstance(chained.init(PARAMS), tuple)  # chain(sgd, cbp)
  acts = {"Dense_0": jnp.ones((1, 2))}
  state = chained.init(PARAMS)
  updates, _ = chained.update(GRADS, state, PARAMS, activations=acts)
  _close(updates, jax.tree.map(lambda g: -LR * g, GRADS))  # Nothing mature: plain SGD.
  wrapped = optimizers.optimizer(
    "cbp", {**hp, "reset_optimizer": True, "momentum": 0.9}, graph, jax.random.key(0)
  )
  assert hasattr(wrapped.init(PARAMS), "inner_state")


def test_bad_names_are_refused():
  with pytest.raises(ValueError, match="unknown method 'sgdd'"):
    optimizers.optimizer("sgdd", {"step_size": LR})
  with pytest.raises(ValueError, match="snp_decay must be one of"):
    optimizers.optimizer("bp", {"step_size": LR}, snp_decay="after")
