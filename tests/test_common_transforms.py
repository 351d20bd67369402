"""Every gradient transformation the library exports, through the same checks (as optax's `_common_test.py`).

For each: a short run under `jax.jit` equals the eager run; `jax.vmap` over seeds equals a Python loop over them;
inside `optax.chain` after SGD and after Adam it equals the two applied by hand; and
`optax.tree_utils.tree_map_params` over its state maps exactly the state entries that mirror the parameters. The
transforms whose ``init`` resolves a layer graph against real parameters (CBP, ReDo, ReGraMa, SNR) or needs
`InjectedParams` (plasticity injection's optimizer) cannot be initialised on the placeholder that
`tree_map_params` passes: for them it must fail, and `cbp_jax.methods.reset_optimizer_for` is the search that
locates their parameter-shaped entries instead.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cbp_jax
from cbp_jax import methods as M

MODEL = cbp_jax.models.MLP(hidden=(6, 5), outputs=3)
X = jax.random.normal(jax.random.key(0), (8, 4))
STEPS = 1
KEY = jax.random.key(1)


BASE_PARAMS = MODEL.init(jax.random.key(0), X)["params"]


def graph():
  return cbp_jax.graph_from_params(BASE_PARAMS)


@dataclasses.dataclass(frozen=True)
class Case:
  make: Callable[[jax.Array], optax.GradientTransformation]  # From a seed's key.
  activations: bool = False  # update(..., activations=) is required.
  injected: bool = False  # Trains InjectedParams (plasticity injection).
  mirrors: int | None = 0  # Parameter-shaped subtrees of the state; None: tree_map_params cannot run.


CASES = {
  "cbp": Case(
    lambda k: cbp_jax.cbp(graph(), key=k, replacement_rate=0.2, maturity_threshold=0),
    activations=True,
    mirrors=None,
  ),
  "cbp_adam": Case(
    lambda k: cbp_jax.cbp(
      graph(), key=k, replacement_rate=0.2, maturity_threshold=0, optimizer=optax.adam(1e-2)
    ),
    activations=True,
    mirrors=None,
  ),
  "redo": Case(lambda k: M.redo(graph(), key=k, tau=0.5, period=1), activations=True, mirrors=None),
  "regrama": Case(lambda k: M.regrama(graph(), key=k, tau=0.5, period=1), mirrors=None),
  "snr": Case(lambda k: M.snr(graph(), key=k, eta=0.5), activations=True, mirrors=None),
  "upgd": Case(lambda k: M.upgd(1e-2, key=k, beta_utility=0.9, sigma=0.1), mirrors=1),
  "scale_by_upgd": Case(lambda k: M.scale_by_upgd(key=k, beta_utility=0.9, sigma=0.1), mirrors=1),
  "hare_tortoise": Case(lambda k: M.hare_tortoise(decay=0.9, reset_period=1), mirrors=1),
  "l2": Case(lambda k: M.l2(1e-2), mirrors=0),
  "l2_init": Case(lambda k: M.l2_init(1e-2), mirrors=1),
  "shrink_and_perturb": Case(lambda k: M.shrink_and_perturb(0.9, 0.01, key=k), mirrors=0),
  "injection_optimizer": Case(lambda k: M.injection_optimizer(optax.adam(1e-2)), injected=True, mirrors=None),
}


# Seed-dependent parameters and gradients from elementwise hashes of the key's bits rather than PRNG draws, which
# would dominate the compile time of these small programs.
def _seed(key):
  return jax.random.key_data(key)[-1].astype(jnp.float32) / 2.0**32


# CBP wrapping Adam and UPGD's direction alone compile the same code as CBP and UPGD: their compiled checks run
# in `make test-slow`, to keep this module's share of `make test` small.
VARIANTS = ("cbp_adam", "scale_by_upgd")
COMPILED = [pytest.param(n, marks=pytest.mark.slow) if n in VARIANTS else n for n in CASES]


def initial_params(key, case):
  params = jax.tree.map(lambda p: p + 0.1 * jnp.sin(5.0 * p + 3.0 * _seed(key)), BASE_PARAMS)
  return M.injectable(params, ["Dense_1"]) if case.injected else params


def gradients(key, params, step):
  """Seed- and step-dependent pseudo-gradients shaped like ``params``."""
  return jax.tree.map(lambda p: jnp.sin(7.0 * p + step + 3.0 * _seed(key)), params)


def extra_args(case, params):
  if not case.activations:
    return {}
  return {"activations": cbp_jax.apply_with_activations(MODEL, params, X)[1]}


def run(case, key):
  """``STEPS`` steps from ``initial_params(key)``: the final params and state."""
  tx = optax.with_extra_args_support(case.make(key))
  params = initial_params(key, case)
  state = tx.init(params)
  for step in range(STEPS):
    updates, state = tx.update(gradients(key, params, step), state, params, **extra_args(case, params))
    params = optax.apply_updates(params, updates)
  return params, state


@functools.cache
def jitted_run(name):
  """One compiled run per transform, shared by the checks below."""
  return jax.jit(lambda key: run(CASES[name], key))


def plain(tree):
  """Leaves as NumPy arrays (key data for PRNG keys)."""

  def leaf(x):
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)

  return [leaf(x) for x in jax.tree.leaves(tree)]


def assert_close(got, expected):
  got, expected = plain(got), plain(expected)
  assert len(got) == len(expected)
  for g, e in zip(got, expected):
    assert g.shape == e.shape and g.dtype == e.dtype
    if jnp.issubdtype(e.dtype, jnp.floating):
      np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)  # Fusion differs between the programs.
    else:
      np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("name", COMPILED)
def test_jit_equals_eager(name):
  assert_close(jitted_run(name)(KEY), run(CASES[name], KEY))


@pytest.mark.parametrize("name", COMPILED)
def test_vmap_over_seeds_equals_a_loop(name):
  keys = jax.random.split(jax.random.key(2), 2)
  batched = jax.jit(jax.vmap(lambda k: run(CASES[name], k)))(keys)
  for i, key in enumerate(keys):
    assert_close(jax.tree.map(lambda x: x[i], batched), jitted_run(name)(key))
  # The seeds differ, so the comparison above compared something.
  first, second = (
    plain(jax.tree.map(lambda x: x[0], batched[0])),
    plain(jax.tree.map(lambda x: x[1], batched[0])),
  )
  assert any(not np.array_equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("inner", [optax.sgd(0.1), optax.adam(1e-2)], ids=["sgd", "adam"])
@pytest.mark.parametrize("name", CASES)
def test_inside_a_chain_equals_the_two_by_hand(name, inner):
  case = CASES[name]
  key = jax.random.key(3)
  params = initial_params(key, case)
  tx = optax.with_extra_args_support(case.make(key))
  chain = optax.chain(inner, case.make(key))
  grads, extra = gradients(key, params, 0), extra_args(case, params)
  chained, chained_state = chain.update(grads, chain.init(params), params, **extra)
  middle, inner_state = inner.update(grads, inner.init(params), params)
  by_hand, tx_state = tx.update(middle, tx.init(params), params, **extra)
  assert_close(chained, by_hand)
  assert_close(chained_state, (inner_state, tx_state))


@pytest.mark.parametrize("name", CASES)
def test_tree_map_params_maps_the_entries_that_mirror_the_parameters(name):
  case = CASES[name]
  params = initial_params(KEY, case)
  tx = case.make(KEY)
  _, state = jitted_run(name)(KEY)
  if case.mirrors is None:
    with pytest.raises(ValueError, match="init needs (the parameters|InjectedParams)"):
      optax.tree_utils.tree_map_params(tx, lambda p: p + 1.0, state)
    return
  mapped = optax.tree_utils.tree_map_params(tx, lambda p: p + 1.0, state)
  assert jax.tree.structure(mapped) == jax.tree.structure(state)
  changed = [(new, old) for new, old in zip(plain(mapped), plain(state)) if not np.array_equal(new, old)]
  # Exactly the parameter-shaped subtrees moved, each entry by +1; counts and keys did not.
  assert len(changed) == case.mirrors * len(jax.tree.leaves(params))
  for new, old in changed:
    np.testing.assert_allclose(new, old + 1.0, rtol=1e-6)
