"""`cbp_jax/methods/_redo.py`: ReDo's resets by hand, with a wrapped Adam, under vmap, chained after CBP."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cbp_jax
from cbp_jax import methods as M
from tests.methods_helpers import NAMES, assert_bitwise, bits, loss_fn, mlp


def kill(params, layer, unit):
  """Makes ``unit`` of ``layer`` output exactly 0 (ReLU of -1) on any input."""
  params = {k: dict(v) for k, v in params.items()}
  params[layer]["kernel"] = params[layer]["kernel"].at[:, unit].set(0.0)
  params[layer]["bias"] = params[layer]["bias"].at[unit].set(-1.0)
  return params


def touched_masks(params, dead):
  """Per leaf, the entries a reset of the ``dead`` units rewrites (NumPy)."""
  masks = {}
  for li, name in enumerate(NAMES):
    k = np.zeros(params[name]["kernel"].shape, bool)
    b = np.zeros(params[name]["bias"].shape, bool)
    if li > 0:
      k[sorted(dead.get(NAMES[li - 1], ())), :] = True  # Outgoing rows.
    cols = sorted(dead.get(name, ()))
    k[:, cols] = True  # Incoming columns.
    b[cols] = True
    masks[name] = {"kernel": k, "bias": b}
  return masks


def check_reset(before, ref, new, dead):
  """New params == ref (params + plain updates) bitwise except the reset units.

  Reset units: incoming weights redrawn within the kaiming bound, bias 0,
  outgoing rows 0 (a column redrawn in the same kernel wins).
  """
  masks = touched_masks(before, dead)
  for li, name in enumerate(NAMES):
    for leaf in ("kernel", "bias"):
      m = masks[name][leaf]
      n, r = np.asarray(new[name][leaf]), np.asarray(ref[name][leaf])
      assert_bitwise(n[~m], r[~m], err_msg=f"{name}/{leaf} untouched entries")
    k_new = np.asarray(new[name]["kernel"])
    cols = sorted(dead.get(name, ()))
    if cols:
      bound = math.sqrt(2.0) * math.sqrt(3.0 / k_new.shape[0])
      assert np.all(np.abs(k_new[:, cols]) <= bound)
      assert not np.any(k_new[:, cols] == np.asarray(before[name]["kernel"])[:, cols])
      assert np.unique(k_new[:, cols]).size == k_new[:, cols].size  # Fresh draws.
      np.testing.assert_array_equal(np.asarray(new[name]["bias"])[cols], 0.0)
    if li > 0:
      rows = sorted(dead.get(NAMES[li - 1], ()))
      other_cols = [c for c in range(k_new.shape[1]) if c not in cols]
      np.testing.assert_array_equal(k_new[np.ix_(rows, other_cols)], 0.0)


def test_redo_resets_exactly_the_dead_units_on_period_steps():
  model, params, x, y = mlp()
  params = kill(kill(params, "Dense_0", 2), "Dense_1", 5)
  dead = {"Dense_0": {2}, "Dense_1": {5}}
  graph = cbp_jax.graph_from_params(params)
  lr, period = 0.05, 3
  tx = optax.chain(optax.sgd(lr), M.redo(graph, key=7, period=period))
  loss = loss_fn(model, x, y)

  @jax.jit
  def step(params, state):
    (_, acts), g = jax.value_and_grad(loss, has_aux=True)(params)
    up, state = tx.update(g, state, params, activations=acts)
    ref, _ = optax.sgd(lr).update(g, optax.sgd(lr).init(params), params)
    return up, ref, state, acts

  state = tx.init(params)
  for t in range(1, period + 1):
    up, ref, state, acts = step(params, state)
    found = {k: set(np.flatnonzero(np.all(np.asarray(v) == 0, axis=0))) for k, v in acts.items()}
    assert found == dead  # Only the units made dead by hand are dormant.
    redo_state = state[1]
    if t < period:
      for a, b in zip(jax.tree.leaves(up), jax.tree.leaves(ref)):
        assert_bitwise(a, b)
      assert all(int(v) == 0 for v in redo_state.replaced_total.values())
      params = optax.apply_updates(params, up)
  before = params
  new = optax.apply_updates(before, up)
  check_reset(before, optax.apply_updates(before, ref), new, dead)
  assert {k: int(v) for k, v in redo_state.replaced_total.items()} == {"Dense_0": 1, "Dense_1": 1}
  for name, units in dead.items():
    np.testing.assert_array_equal(np.flatnonzero(redo_state.last_replaced[name]), sorted(units))
  # Outgoing weights are 0, so the network's output does not jump.
  np.testing.assert_allclose(
    model.apply({"params": new}, x),
    model.apply({"params": optax.apply_updates(before, ref)}, x),
    rtol=1e-6,
    atol=1e-6,
  )
  # Steps after the reset and before the next period pass updates through.
  params = new
  up, ref, state, _ = step(params, state)
  for a, b in zip(jax.tree.leaves(up), jax.tree.leaves(ref)):
    assert_bitwise(a, b)
  assert int(state[1].count) == period + 1


def hand_setup(seed=0):
  """MLP params, random grads and hand-made activations (units 1, 4 of Dense_0 dormant)."""
  _, params, _, _ = mlp(seed)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(50 + seed), len(leaves))
  grads = jax.tree.unflatten(treedef, [jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])
  h0 = jnp.abs(jax.random.normal(jax.random.key(60), (16, 8))) + 0.5
  h0 = h0.at[:, 1].multiply(0.01).at[:, 4].set(0.0)
  h1 = jnp.abs(jax.random.normal(jax.random.key(61), (16, 8))) + 0.5
  return params, grads, {"Dense_0": h0, "Dense_1": h1}


def with_reference(tx, inner, inner_state=None):
  """One function computing tx's update and, in the same compilation, inner's.

  Returns (updates, state, ref) with ref = inner's updates, or (updates,
  inner_state) when ``inner_state`` is given. Comparing within one jit keeps
  XLA's arithmetic the same on both sides, so untouched entries match bitwise.
  """

  def fn(g, s, p, a):
    up, s = tx.update(g, s, p, activations=a)
    st = inner.init(p) if inner_state is None else inner_state
    ref_up, ref_st = inner.update(g, st, p)
    return up, s, (ref_up if inner_state is None else (ref_up, ref_st))

  return fn


def np_scores(h):
  m = np.abs(np.asarray(h, np.float64)).mean(axis=0)
  return m / m.mean()


def test_redo_tau_threshold_and_bias_correction():
  params, grads, acts = hand_setup()
  tau, lr = 0.05, 0.1
  expect = {k: set(np.flatnonzero(np_scores(h) <= tau)) for k, h in acts.items()}
  assert expect == {"Dense_0": {1, 4}, "Dense_1": set()}
  graph = cbp_jax.graph_from_params(params)
  for correction in (False, True):
    tx = optax.chain(optax.sgd(lr), M.redo(graph, key=1, tau=tau, period=1, next_bias_correction=correction))
    up, state, ref = jax.jit(with_reference(tx, optax.sgd(lr)))(grads, tx.init(params), params, acts)
    ref = optax.apply_updates(params, ref)
    new = optax.apply_updates(params, up)
    dead = {"Dense_0": {1, 4}}
    b_ref = np.asarray(ref["Dense_1"]["bias"], np.float64)
    if correction:
      # The consumer's bias absorbs w_out[i, :] * mean_batch(h_i) (post-step w_out).
      w_out = np.asarray(ref["Dense_1"]["kernel"], np.float64)
      mean_h = np.asarray(acts["Dense_0"], np.float64).mean(axis=0)
      b_ref = b_ref + sum(w_out[i] * mean_h[i] for i in (1, 4))
      np.testing.assert_allclose(new["Dense_1"]["bias"], b_ref, rtol=1e-5, atol=1e-6)
      new = {k: dict(v) for k, v in new.items()}
      new["Dense_1"]["bias"] = ref["Dense_1"]["bias"]  # Checked above.
    else:
      assert_bitwise(new["Dense_1"]["bias"], ref["Dense_1"]["bias"])
    check_reset(params, ref, new, dead)
    assert int(state[1].replaced_total["Dense_0"]) == 2


def test_redo_wrapping_adam_resets_moments_of_reset_units_only():
  params, grads, acts = hand_setup()
  graph = cbp_jax.graph_from_params(params)
  adam = optax.adam(1e-2)
  tx = M.redo(graph, key=3, tau=0.0, period=1, optimizer=adam)
  state = tx.init(params)
  # Non-zero moments everywhere, as after some training.
  filled = optax.tree_utils.tree_map_params(adam, lambda s: s + 0.3, state.inner_state)
  filled = (filled[0]._replace(count=jnp.asarray(5, jnp.int32)),) + tuple(filled[1:])
  state = state._replace(inner_state=filled)
  # Eagerly, both sides run the same op-by-op arithmetic, so untouched entries
  # can be compared bitwise (two different jit graphs may fuse Adam's
  # arithmetic differently, 1 ulp apart); the jitted step must agree closely.
  fn = with_reference(tx, adam, filled)
  up, new_state, (ref_up, ref_state) = fn(grads, state, params, acts)
  jit_up, jit_state, _ = jax.jit(fn)(grads, state, params, acts)
  for a, b in zip(jax.tree.leaves((up, new_state)), jax.tree.leaves((jit_up, jit_state))):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b))
    elif jnp.issubdtype(a.dtype, jnp.floating):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    else:
      np.testing.assert_array_equal(a, b)
  dead = {"Dense_0": {4}}  # tau = 0: only the all-zero unit.
  check_reset(params, optax.apply_updates(params, ref_up), optax.apply_updates(params, up), dead)
  masks = touched_masks(params, dead)
  got, want = new_state.inner_state[0], ref_state[0]
  assert int(got.count) == int(want.count) == 6
  for moment in ("mu", "nu"):
    for name in NAMES:
      for leaf in ("kernel", "bias"):
        m = masks[name][leaf]
        g = np.asarray(getattr(got, moment)[name][leaf])
        w = np.asarray(getattr(want, moment)[name][leaf])
        np.testing.assert_array_equal(g[m], 0.0)
        assert_bitwise(g[~m], w[~m], err_msg=f"{moment} {name}/{leaf}")
        assert np.all(w != 0)  # So the zeros above are the reset's.


def test_redo_only_on_period_steps_with_persistent_dormant_unit():
  params, grads, acts = hand_setup()
  graph = cbp_jax.graph_from_params(params)
  tx = optax.chain(optax.sgd(0.1), M.redo(graph, key=0, period=2))
  step = jax.jit(with_reference(tx, optax.sgd(0.1)))
  state = tx.init(params)
  kernels = []
  for t in range(1, 5):
    up, state, ref = step(grads, state, params, acts)
    same = all(np.array_equal(bits(a), bits(b)) for a, b in zip(jax.tree.leaves(up), jax.tree.leaves(ref)))
    assert same == (t % 2 == 1), t
    assert int(state[1].replaced_total["Dense_0"]) == t // 2
    if t % 2 == 0:
      kernels.append(np.asarray(params["Dense_0"]["kernel"] + up["Dense_0"]["kernel"])[:, 4])
  assert not np.allclose(kernels[0], kernels[1])  # A fresh key each reset.


def test_redo_under_vmap_over_keys_and_tau():
  params, grads, acts = hand_setup()
  graph = cbp_jax.graph_from_params(params)

  def run(key, tau):
    tx = optax.chain(optax.sgd(0.1), M.redo(graph, key=key, tau=tau, period=1))
    up, state = tx.update(grads, tx.init(params), params, activations=acts)
    return optax.apply_updates(params, up)["Dense_0"]["kernel"], state[1].replaced_total["Dense_0"]

  keys = jax.random.split(jax.random.key(0), 3)
  k, n = jax.jit(jax.vmap(run, in_axes=(0, None)))(keys, 0.0)
  np.testing.assert_array_equal(n, [1, 1, 1])
  cols = np.asarray(k)[:, :, 4]
  assert not np.allclose(cols[0], cols[1]) and not np.allclose(cols[1], cols[2])
  np.testing.assert_array_equal(cols[2], np.asarray(run(keys[2], 0.0)[0])[:, 4])
  _, n = jax.jit(jax.vmap(run, in_axes=(None, 0)))(keys[0], jnp.array([0.0, 0.05, 10.0]))
  np.testing.assert_array_equal(n, [1, 2, 8])


def test_redo_chained_after_cbp_resets_both_selections():
  """optax.chain(cbp(..., optimizer=adam), redo(...)): CBP replaces one unit per layer
  (rate 1/8, maturity 0) and restarts their Adam moments; ReDo then resets the dead
  unit 4 of Dense_0; every other entry gets Adam's update bitwise."""
  params, grads, acts = hand_setup()
  graph = cbp_jax.graph_from_params(params)
  adam = optax.adam(1e-2)
  tx = optax.chain(
    cbp_jax.cbp(
      graph,
      key=2,
      replacement_rate=1 / 8,
      maturity_threshold=0,
      utility="weight",
      next_bias_correction=False,
      optimizer=adam,
    ),
    M.redo(graph, key=3, tau=0.0, period=1),
  )
  # Eager on both sides, so untouched entries can be compared bitwise (as above).
  up, state, (ref_up, ref_state) = with_reference(tx, adam, adam.init(params))(
    grads, tx.init(params), params, acts
  )
  cbp_state, redo_state = state
  by_cbp = {n: set(np.flatnonzero(cbp_state.last_replaced[n])) for n in NAMES[:2]}
  by_redo = {n: set(np.flatnonzero(redo_state.last_replaced[n])) for n in NAMES[:2]}
  assert [len(by_cbp[n]) for n in NAMES[:2]] == [1, 1]
  assert by_redo == {"Dense_0": {4}, "Dense_1": set()}
  dead = {n: by_cbp[n] | by_redo[n] for n in NAMES[:2]}
  check_reset(params, optax.apply_updates(params, ref_up), optax.apply_updates(params, up), dead)
  masks = touched_masks(params, by_cbp)  # Only CBP's units restart the moments it wraps.
  got, want = cbp_state.inner_state[0], ref_state[0]
  for moment in ("mu", "nu"):
    for name in NAMES:
      for leaf in ("kernel", "bias"):
        m = masks[name][leaf]
        g = np.asarray(getattr(got, moment)[name][leaf])
        np.testing.assert_array_equal(g[m], 0.0)
        assert_bitwise(
          g[~m], np.asarray(getattr(want, moment)[name][leaf])[~m], err_msg=f"{moment} {name}/{leaf}"
        )


def test_redo_and_cbp_do_not_nest():
  params, _, _ = hand_setup()
  graph = cbp_jax.graph_from_params(params)
  adam = optax.adam(1e-2)
  with pytest.raises(ValueError, match=r"optimizer=.*redo: init needs the parameters.*optax\.chain\(cbp"):
    cbp_jax.cbp(graph, key=0, optimizer=M.redo(graph, key=1, optimizer=adam)).init(params)
  for inner in (cbp_jax.cbp(graph, key=1, optimizer=adam), optax.chain(optax.sgd(0.1), M.redo(graph, key=1))):
    with pytest.raises(
      ValueError, match=r"redo: optimizer= holds a cbp, redo, regrama or snr transform.*optax\.chain"
    ):
      M.redo(graph, key=0, optimizer=inner).init(params)


def test_redo_validates():
  params, grads, acts = hand_setup()
  graph = cbp_jax.graph_from_params(params)
  with pytest.raises(ValueError, match="tau"):
    M.redo(graph, key=0, tau=-0.1)
  with pytest.raises(ValueError, match="period"):
    M.redo(graph, key=0, period=0)
  with pytest.raises(ValueError, match="period"):
    M.redo(graph, key=0, period=2.5)
  with pytest.raises(ValueError, match="'gaussian'"):
    M.redo(graph, key=0, init="gaussian")
  with pytest.raises(ValueError, match="LayerGraph"):
    M.redo({"Dense_0": None}, key=0)
  tx = M.redo(graph, key=0)
  state = tx.init(params)
  with pytest.raises(ValueError, match="activations"):
    tx.update(grads, state, params)
  with pytest.raises(ValueError, match="Dense_1"):
    tx.update(grads, state, params, activations={"Dense_0": acts["Dense_0"]})
  with pytest.raises(ValueError, match="Dense_0"):
    tx.update(grads, state, params, activations={**acts, "Dense_0": jnp.ones((16, 3))})
  with pytest.raises(ValueError, match="params"):
    tx.update(grads, state, activations=acts)
