"""Tests for cbp_jax.methods: each method's effect against hand/NumPy computation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cbp_jax
from cbp_jax import methods as M

NAMES = ("Dense_0", "Dense_1", "Dense_2")  # Two hidden layers and the head.


# --- Helpers --------------------------------------------------------------


def bits(a):
  a = np.asarray(a)
  return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_bitwise(a, b, err_msg=""):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
  np.testing.assert_array_equal(bits(a), bits(b), err_msg=err_msg)


def mlp(seed=0, batch=16, inputs=5, hidden=(8, 8), outputs=3):
  model = cbp_jax.models.MLP(hidden=hidden, outputs=outputs)
  x = jax.random.normal(jax.random.key(100 + seed), (batch, inputs))
  y = jax.random.normal(jax.random.key(200 + seed), (batch, outputs))
  params = model.init(jax.random.key(seed), x)["params"]
  return model, params, x, y


def kill(params, layer, unit):
  """Makes ``unit`` of ``layer`` output exactly 0 (ReLU of -1) on any input."""
  params = {k: dict(v) for k, v in params.items()}
  params[layer]["kernel"] = params[layer]["kernel"].at[:, unit].set(0.0)
  params[layer]["bias"] = params[layer]["bias"].at[unit].set(-1.0)
  return params


def loss_fn(model, x, y):
  def loss(p):
    out, acts = cbp_jax.apply_with_activations(model, p, x)
    return jnp.mean((out - y) ** 2), acts
  return loss


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


# --- L2 -------------------------------------------------------------------


def test_l2_is_add_decayed_weights_and_adds_wd_params():
  _, params, _, _ = mlp()
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
  wd = 0.01
  tx = M.l2(wd)
  up, _ = tx.update(grads, tx.init(params), params)
  jit_up, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  ref, _ = optax.add_decayed_weights(wd).update(grads, optax.EmptyState(), params)
  for u, j, r, g, p in zip(*map(jax.tree.leaves, (up, jit_up, ref, grads, params))):
    assert_bitwise(u, r)  # The same transform (same arithmetic, both eager).
    np.testing.assert_allclose(j, r, rtol=1e-6)
    np.testing.assert_allclose(u, np.asarray(g) + wd * np.asarray(p), rtol=1e-6)
  # In a chain before the learning rate: p - lr * (g + wd * p).
  lr = 0.1
  chain = optax.chain(M.l2(wd), optax.sgd(lr))
  up, _ = chain.update(grads, chain.init(params), params)
  new = optax.apply_updates(params, up)
  for n, g, p in zip(*map(jax.tree.leaves, (new, grads, params))):
    p = np.asarray(p, np.float64)
    np.testing.assert_allclose(n, p - lr * (np.asarray(g) + wd * p), rtol=1e-5, atol=1e-7)


def test_l2_under_vmap():
  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  wds = jnp.array([0.0, 0.1, 1.0])

  def run(wd):
    tx = M.l2(wd)
    return tx.update({"w": jnp.ones((2, 3))}, tx.init(params), params)[0]["w"]

  out = jax.jit(jax.vmap(run))(wds)
  expect = 1.0 + np.asarray(wds)[:, None, None] * np.arange(6.0).reshape(2, 3)
  np.testing.assert_allclose(out, expect, rtol=1e-6)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "x"])
def test_l2_and_l2_init_validate(bad):
  with pytest.raises(ValueError, match="weight_decay"):
    M.l2(bad)
  with pytest.raises(ValueError, match="weight_decay"):
    M.l2_init(bad)


# --- L2-Init --------------------------------------------------------------


def test_l2_init_pulls_toward_init_by_hand():
  p0 = {"a": jnp.array([1.0, -2.0, 3.0]), "b": {"c": jnp.array([[0.5, 0.0]])}}
  wd, lr = 0.5, 0.1
  tx = optax.chain(M.l2_init(wd), optax.sgd(lr))
  state = tx.init(p0)
  params = jax.tree.map(lambda p: p + 2.0, p0)  # Moved away by 2.
  grads = {"a": jnp.array([1.0, 0.0, -1.0]), "b": {"c": jnp.array([[0.0, 4.0]])}}
  step = jax.jit(tx.update)
  up, state = step(grads, state, params)
  # -lr * (g + wd * (p - p0)) = -0.1 * (g + 1).
  np.testing.assert_allclose(up["a"], [-0.2, -0.1, 0.0], atol=1e-7)
  np.testing.assert_allclose(up["b"]["c"], [[-0.1, -0.5]], atol=1e-7)
  # With zero gradients the distance to the init shrinks by (1 - lr*wd) a step.
  zeros = jax.tree.map(jnp.zeros_like, p0)
  for _ in range(3):
    up, state = step(zeros, state, params)
    params = optax.apply_updates(params, up)
  np.testing.assert_allclose(params["a"] - p0["a"], 2.0 * (1 - lr * wd) ** 3, rtol=1e-6)
  # The state holds the initial parameters, as a copy.
  assert_bitwise(state[0].initial_params["a"], p0["a"])
  assert state[0].initial_params["a"] is not p0["a"]


def test_l2_init_under_vmap_and_needs_params():
  p0 = jnp.stack([jnp.zeros(3), jnp.ones(3)])  # Two seeds.
  tx = M.l2_init(1.0)

  def run(p):
    state = tx.init(p)
    return tx.update(jnp.zeros(3), state, p + 1.0)[0]

  np.testing.assert_allclose(jax.jit(jax.vmap(run))(p0), np.ones((2, 3)))
  with pytest.raises(ValueError, match="params"):
    tx.update(jnp.zeros(3), tx.init(jnp.zeros(3)))


# --- Shrink and Perturb ---------------------------------------------------


def test_shrink_and_perturb_zero_noise_is_scaling():
  _, params, _, _ = mlp()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  lr, shrink = 0.1, 0.9
  tx = optax.chain(optax.sgd(lr), M.shrink_and_perturb(shrink, 0.0, key=0))
  up, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  new = optax.apply_updates(params, up)
  for n, p, g in zip(*map(jax.tree.leaves, (new, params, grads))):
    expect = shrink * (np.asarray(p, np.float64) - lr * np.asarray(g))
    np.testing.assert_allclose(n, expect, rtol=1e-6, atol=1e-7)
  # shrink 1, no noise: bitwise the inner updates.
  tx1 = optax.chain(optax.sgd(lr), M.shrink_and_perturb(1.0, 0.0, key=0))
  up1, _ = tx1.update(grads, tx1.init(params), params)
  ref, _ = optax.sgd(lr).update(grads, optax.sgd(lr).init(params), params)
  for a, b in zip(jax.tree.leaves(up1), jax.tree.leaves(ref)):
    assert_bitwise(a, b)


def test_shrink_and_perturb_noise_statistics():
  params = {"w": jnp.full((400, 500), 2.0), "v": jnp.full((400, 500), -1.0)}
  updates = {"w": jnp.full((400, 500), 0.5), "v": jnp.zeros((400, 500))}
  shrink, scale = 0.5, 0.25
  tx = M.shrink_and_perturb(shrink, scale, key=3)
  up, _ = jax.jit(tx.update)(updates, tx.init(params), params)
  new = optax.apply_updates(params, up)
  noise_w = np.asarray(new["w"], np.float64) - shrink * 2.5
  noise_v = np.asarray(new["v"], np.float64) - shrink * -1.0
  for noise in (noise_w, noise_v):
    # 2e5 draws: mean within 5 standard errors, std within 1%.
    assert abs(noise.mean()) < 5 * scale / math.sqrt(noise.size)
    assert abs(noise.std() / scale - 1) < 0.01
  # Leaves get independent noise.
  assert abs(np.corrcoef(noise_w.ravel(), noise_v.ravel())[0, 1]) < 0.02


def test_shrink_and_perturb_every_k_steps():
  params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}
  grads = {"w": jnp.full((3, 4), 0.2)}
  lr, shrink, k = 0.1, 0.8, 3
  inner = optax.sgd(lr)
  tx = optax.chain(inner, M.shrink_and_perturb(shrink, 0.0, key=0, every=k))
  noisy = optax.chain(inner, M.shrink_and_perturb(1.0, 0.1, key=0, every=k))
  state, noisy_state = tx.init(params), noisy.init(params)
  step, noisy_step = jax.jit(tx.update), jax.jit(noisy.update)
  ref, _ = inner.update(grads, inner.init(params), params)
  noises = []
  for t in range(1, 7):
    up, state = step(grads, state, params)
    nup, noisy_state = noisy_step(grads, noisy_state, params)
    if t % k:
      assert_bitwise(up["w"], ref["w"])
      assert_bitwise(nup["w"], ref["w"])
    else:
      new = params["w"] + up["w"]
      np.testing.assert_allclose(new, shrink * (params["w"] + ref["w"]), rtol=1e-6, atol=1e-7)
      noises.append(np.asarray(nup["w"] - ref["w"]))
    assert int(state[1].count) == t
  assert len(noises) == 2 and not np.allclose(noises[0], noises[1])  # Fresh noise each time.
  assert all(np.all(n != 0) for n in noises)


def test_shrink_and_perturb_per_seed_noise_under_vmap():
  params = {"w": jnp.zeros((50,))}
  updates = {"w": jnp.zeros((50,))}

  def run(key):
    tx = M.shrink_and_perturb(1.0, 1.0, key=key)
    return tx.update(updates, tx.init(params), params)[0]["w"]

  keys = jax.random.split(jax.random.key(0), 4)
  out = np.asarray(jax.jit(jax.vmap(run))(keys))
  assert out.shape == (4, 50)
  for i in range(4):
    for j in range(i + 1, 4):
      assert not np.allclose(out[i], out[j])
  # Same key, same noise (deterministic); int seeds work too.
  np.testing.assert_array_equal(out[1], run(keys[1]))
  a, b = run(7), M.shrink_and_perturb(1.0, 1.0, key=jax.random.key(7))
  np.testing.assert_array_equal(a, b.update(updates, b.init(params), params)[0]["w"])
  # Traced shrink (a vmapped sweep) is accepted and applied.
  def sweep(shrink):
    tx = M.shrink_and_perturb(shrink, 0.0, key=0)
    p = {"w": jnp.ones(3)}
    return optax.apply_updates(p, tx.update({"w": jnp.zeros(3)}, tx.init(p), p)[0])["w"]
  np.testing.assert_allclose(jax.vmap(sweep)(jnp.array([0.5, 1.0])), [[0.5] * 3, [1.0] * 3])


@pytest.mark.parametrize("kwargs, name", [
    (dict(shrink=0.0, noise_scale=0.1), "shrink"),
    (dict(shrink=1.5, noise_scale=0.1), "shrink"),
    (dict(shrink=float("nan"), noise_scale=0.1), "shrink"),
    (dict(shrink=0.9, noise_scale=-0.1), "noise_scale"),
    (dict(shrink=0.9, noise_scale=0.1, every=0), "every"),
    (dict(shrink=0.9, noise_scale=0.1, every=1.5), "every"),
])
def test_shrink_and_perturb_validates(kwargs, name):
  with pytest.raises(ValueError, match=name):
    M.shrink_and_perturb(key=0, **kwargs)


# --- ReDo -----------------------------------------------------------------


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
  np.testing.assert_allclose(model.apply({"params": new}, x),
                             model.apply({"params": optax.apply_updates(before, ref)}, x),
                             rtol=1e-6, atol=1e-6)
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
    tx = optax.chain(optax.sgd(lr), M.redo(graph, key=1, tau=tau, period=1,
                                           next_bias_correction=correction))
    up, state, ref = jax.jit(with_reference(tx, optax.sgd(lr)))(
        grads, tx.init(params), params, acts)
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
    same = all(np.array_equal(bits(a), bits(b))
               for a, b in zip(jax.tree.leaves(up), jax.tree.leaves(ref)))
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
      cbp_jax.cbp(graph, key=2, replacement_rate=1 / 8, maturity_threshold=0, utility="weight",
                  next_bias_correction=False, optimizer=adam),
      M.redo(graph, key=3, tau=0.0, period=1))
  # Eager on both sides, so untouched entries can be compared bitwise (as above).
  up, state, (ref_up, ref_state) = with_reference(tx, adam, adam.init(params))(
      grads, tx.init(params), params, acts)
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
        assert_bitwise(g[~m], np.asarray(getattr(want, moment)[name][leaf])[~m],
                       err_msg=f"{moment} {name}/{leaf}")


def test_redo_and_cbp_do_not_nest():
  params, _, _ = hand_setup()
  graph = cbp_jax.graph_from_params(params)
  adam = optax.adam(1e-2)
  with pytest.raises(ValueError, match=r"optimizer=.*redo: init needs the parameters.*optax\.chain\(cbp"):
    cbp_jax.cbp(graph, key=0, optimizer=M.redo(graph, key=1, optimizer=adam)).init(params)
  for inner in (cbp_jax.cbp(graph, key=1, optimizer=adam),
                optax.chain(optax.sgd(0.1), M.redo(graph, key=1))):
    with pytest.raises(ValueError, match=r"redo: optimizer= holds a cbp, redo, regrama or snr transform.*optax\.chain"):
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


# --- Task-boundary resets -------------------------------------------------


def test_reset_layers_replaces_exactly_the_named_leaves():
  model, params, x, _ = mlp()
  fresh = model.init(jax.random.key(9), x)["params"]
  out = jax.jit(lambda p, f: M.reset_layers(p, f, ["Dense_2"]))(params, fresh)
  for name in NAMES:
    src = fresh if name == "Dense_2" else params
    for leaf in ("kernel", "bias"):
      assert_bitwise(out[name][leaf], src[name][leaf])
  assert not np.array_equal(fresh["Dense_2"]["kernel"], params["Dense_2"]["kernel"])
  out = M.reset_layers(params, fresh, "Dense_0/kernel")  # One leaf; a string is one path.
  assert_bitwise(out["Dense_0"]["kernel"], fresh["Dense_0"]["kernel"])
  assert_bitwise(out["Dense_0"]["bias"], params["Dense_0"]["bias"])
  out = M.reset_layers(params, fresh, ["Dense_0", "Dense_1/bias"])
  assert_bitwise(out["Dense_1"]["bias"], fresh["Dense_1"]["bias"])
  assert_bitwise(out["Dense_1"]["kernel"], params["Dense_1"]["kernel"])
  # Per-seed stacks under vmap.
  stack = jax.tree.map(lambda a, b: jnp.stack([a, b]), params, fresh)
  out = jax.vmap(lambda p, f: M.reset_layers(p, f, "Dense_2"))(stack, jax.tree.map(lambda a: a[::-1], stack))
  assert_bitwise(out["Dense_2"]["kernel"][0], fresh["Dense_2"]["kernel"])
  assert_bitwise(out["Dense_1"]["kernel"][0], params["Dense_1"]["kernel"])


def test_reset_layers_errors():
  model, params, x, _ = mlp()
  fresh = model.init(jax.random.key(9), x)["params"]
  with pytest.raises(ValueError, match="'Dense_9'"):
    M.reset_layers(params, fresh, ["Dense_2", "Dense_9"])
  with pytest.raises(ValueError, match="'Dense'"):
    M.reset_layers(params, fresh, ["Dense"])  # Not a prefix match.
  with pytest.raises(ValueError, match="structure"):
    M.reset_layers(params, {"Dense_0": fresh["Dense_0"]}, ["Dense_0"])
  _, other, _, _ = mlp(hidden=(8, 6))
  with pytest.raises(ValueError, match="Dense_1/(kernel|bias)"):
    M.reset_layers(params, other, ["Dense_1"])


def optimizer(name, graph):
  """The optimizers `reset_optimizer_for` is tested on, by name."""
  adam = optax.adam(1e-2)
  return {
      "adam": adam,
      "momentum": optax.sgd(1e-2, momentum=0.9),
      "l2_init+adam": optax.chain(M.l2_init(1e-3), adam),
      "cbp(adam)": cbp_jax.cbp(graph, key=0, optimizer=adam),
      "l2_init+cbp(adam)": optax.chain(M.l2_init(1e-3), cbp_jax.cbp(graph, key=0, optimizer=adam)),
      "redo(momentum)": M.redo(graph, key=0, optimizer=optax.sgd(1e-2, momentum=0.9)),
      "cbp(adam)+redo": optax.chain(cbp_jax.cbp(graph, key=0, optimizer=adam), M.redo(graph, key=1)),
  }[name]


def same_leaf(a, b):
  if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
    return np.array_equal(jax.random.key_data(a), jax.random.key_data(b))
  return np.array_equal(bits(a), bits(b))


@pytest.mark.parametrize("opt, n_stats", [
    ("adam", 4), ("momentum", 2), ("l2_init+adam", 6), ("cbp(adam)", 4), ("l2_init+cbp(adam)", 6),
    ("redo(momentum)", 2), ("cbp(adam)+redo", 4)])
def test_reset_optimizer_for(opt, n_stats):
  """Exactly the statistics of Dense_2's kernel and bias restart (n_stats leaves: Adam's
  mu and nu, the momentum trace, l2_init's initial parameters), also inside cbp/redo
  states and chains holding them; everything else (counts, CBP's per-unit statistics,
  keys) is kept bitwise."""
  model, params, x, y = mlp()
  tx = optax.with_extra_args_support(optimizer(opt, cbp_jax.graph_from_params(params)))
  state = tx.init(params)
  loss = loss_fn(model, x, y)
  for _ in range(2):
    (_, acts), g = jax.value_and_grad(loss, has_aux=True)(params)
    up, state = tx.update(g, state, params, activations=acts)
    params = optax.apply_updates(params, up)
  fresh = model.init(jax.random.key(9), x)["params"]
  params = M.reset_layers(params, fresh, "Dense_2")
  new_state = jax.jit(lambda s, p: M.reset_optimizer_for(tx, s, p, ["Dense_2"]))(state, params)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  old_leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  new_leaves = jax.tree.leaves(new_state)
  n_reset = 0
  for (path, old), new in zip(old_leaves, new_leaves):
    keys = jax.tree_util.keystr(path)
    if "Dense_2" in keys:
      n_reset += 1
      if "initial_params" in keys:  # l2_init: the new initial value is the reset value.
        leaf = "kernel" if "kernel" in keys else "bias"
        assert_bitwise(new, fresh["Dense_2"][leaf])
      else:
        np.testing.assert_array_equal(new, 0.0)
        assert np.any(np.asarray(old) != 0)
    else:
      assert same_leaf(new, old), keys  # Other statistics and counts kept.
  assert n_reset == n_stats


def test_reset_optimizer_for_errors():
  _, params, _, _ = mlp()
  tx = optax.adam(1e-3)
  with pytest.raises(ValueError, match="'Dense_7'"):
    M.reset_optimizer_for(tx, tx.init(params), params, "Dense_7")
  # An init that cannot take optax's placeholder, outside cbp/redo: nothing to go by.
  opaque = optax.GradientTransformation(
      lambda p: {"w": jnp.zeros_like(p["Dense_0"]["kernel"])}, lambda u, s, p=None: (u, s))
  with pytest.raises(ValueError, match="tree_map_params"):
    M.reset_optimizer_for(opaque, opaque.init(params), params, "Dense_2")
  with pytest.raises(ValueError, match="structure"):
    M.reset_optimizer_for(optimizer("cbp(adam)", cbp_jax.graph_from_params(params)),
                          optimizer("redo(momentum)", cbp_jax.graph_from_params(params)).init(params),
                          params, "Dense_2")
