"""Tests for the 2023-2025 methods in cbp_jax.methods against NumPy re-computations of their rules.

UPGD, ReGraMa, SNR, Hare & Tortoise, plasticity injection, the LayerNorm +
weight decay recipe, and the combinations that work or are refused.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cbp_jax
from cbp_jax import methods as M


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
  np.testing.assert_array_equal(np.asarray(new[consumer]["kernel"])[rows],
                                np.asarray(plain[consumer]["kernel"])[rows])


# --- UPGD -----------------------------------------------------------------


def upgd_numpy(params_list, grads_list, key, lr, beta, sigma, wd, hess_list=None):
  """The authors' global protecting UPGD, in NumPy, over a sequence of steps.

  The noise is drawn with jax.random (split the key per step, then one draw
  for all leaves in tree order), the same numbers the transform's fused draws give.
  """
  w = [p.copy() for p in params_list[0]]
  avg = [np.zeros_like(p) for p in w]
  for t, grads in enumerate(grads_list, start=1):
    hess = None if hess_list is None else hess_list[t - 1]
    for i, g in enumerate(grads):
      u = -g * w[i] if hess is None else -g * w[i] + 0.5 * hess[i] * w[i] ** 2
      avg[i] = beta * avg[i] + (1 - beta) * u
    gmax = max(a.max() for a in avg)
    key, noise_key = jax.random.split(key)
    draw = np.asarray(jax.random.normal(noise_key, (sum(g.size for g in grads),)), np.float64)
    offset = 0
    for i, g in enumerate(grads):
      noise = draw[offset:offset + g.size].reshape(g.shape) * sigma
      offset += g.size
      s = 1 / (1 + np.exp(-(avg[i] / (1 - beta ** t)) / gmax))
      w[i] = w[i] * (1 - lr * wd) - lr * (g + noise) * (1 - s)
  return w


@pytest.mark.parametrize("order", [1, 2])
def test_upgd_matches_numpy(order):
  _, params, _, _ = mlp()
  rng = np.random.default_rng(0)
  leaves, treedef = jax.tree.flatten(params)
  grads_list = [[rng.normal(size=l.shape) for l in leaves] for _ in range(3)]
  hess_list = [[np.abs(rng.normal(size=l.shape)) for l in leaves] for _ in range(3)]
  lr, beta, sigma, wd = 0.1, 0.9, 0.05, 0.01
  tx = M.upgd(lr, key=7, beta_utility=beta, sigma=sigma, weight_decay=wd, order=order)
  state = tx.init(params)
  p = params
  for t in range(3):
    g = jax.tree.unflatten(treedef, [jnp.asarray(a, jnp.float32) for a in grads_list[t]])
    extra = {}
    if order == 2:
      extra["hessian_diag"] = jax.tree.unflatten(
          treedef, [jnp.asarray(a, jnp.float32) for a in hess_list[t]])
    u, state = jax.jit(tx.update)(g, state, p, **extra)
    p = optax.apply_updates(p, u)
  want = upgd_numpy([np_leaves(params)], grads_list, jax.random.key(7), lr, beta, sigma, wd,
                    hess_list if order == 2 else None)
  for got, w in zip(np_leaves(p), want):
    np.testing.assert_allclose(got, w, rtol=2e-5, atol=2e-6)


def test_upgd_gate_by_hand():
  """One weight of high utility is protected, one of negative utility gets the full step."""
  params = {"w": jnp.array([2.0, 1.0])}
  grads = {"w": jnp.array([-1.0, 1.0])}  # Utilities -g*w: [2, -1]; max 2.
  tx = M.upgd(1.0, key=0, beta_utility=0.0, sigma=0.0)
  u, _ = tx.update(grads, tx.init(params), params)
  s = 1 / (1 + np.exp(-np.array([2.0, -1.0]) / 2.0))  # sigmoid(1), sigmoid(-0.5)
  np.testing.assert_allclose(np.asarray(u["w"]), -np.array([-1.0, 1.0]) * (1 - s), rtol=1e-6)


def test_upgd_zero_gradients_are_finite():
  params = {"w": jnp.ones((3,))}
  tx = M.upgd(0.1, key=0, sigma=1.0)
  u, _ = tx.update({"w": jnp.zeros((3,))}, tx.init(params), params)
  # Utility 0 everywhere: the gate is sigmoid(0) = 1/2, the step half the noise.
  noise = jax.random.normal(jax.random.split(jax.random.key(0))[1], (3,))
  np.testing.assert_allclose(np.asarray(u["w"]), -0.1 * 0.5 * np.asarray(noise), rtol=1e-5)


def test_upgd_in_a_chain_equals_upgd():
  _, params, _, _ = mlp()
  g = jax.tree.map(lambda p: jnp.cos(p) * 0.3, params)
  full = M.upgd(0.05, key=3, sigma=0.1)
  chained = optax.chain(optax.clip_by_global_norm(1e9), M.scale_by_upgd(key=3, sigma=0.1),
                        optax.scale_by_learning_rate(0.05))
  u1, _ = jax.jit(full.update)(g, full.init(params), params)
  u2, _ = jax.jit(chained.update)(g, chained.init(params), params)
  for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_upgd_vmaps_over_keys_and_traced_hyperparameters():
  _, params, _, _ = mlp()
  g = jax.tree.map(lambda p: jnp.sin(p), params)

  def step(key, sigma, lr):
    tx = M.upgd(lr, key=key, sigma=sigma)
    u, _ = tx.update(g, tx.init(params), params)
    return u

  keys = jax.random.split(jax.random.key(0), 3)
  out = jax.jit(jax.vmap(step))(keys, jnp.array([0.0, 0.0, 0.5]), jnp.array([0.1, 0.1, 0.1]))
  k = np.asarray(out["Dense_0"]["kernel"])
  np.testing.assert_array_equal(k[0], k[1])  # No noise: the key does not matter.
  assert not np.allclose(k[0], k[2])
  single = step(keys[2], 0.5, 0.1)
  np.testing.assert_allclose(k[2], np.asarray(single["Dense_0"]["kernel"]), rtol=1e-6, atol=1e-7)


def test_upgd_validates():
  for kwargs, match in (({"beta_utility": 1.0}, "beta_utility"), ({"sigma": -1.0}, "sigma"),
                        ({"order": 3}, "order"), ({"weight_decay": -1.0}, "weight_decay")):
    with pytest.raises(ValueError, match=match):
      M.upgd(0.1, key=0, **kwargs)
  tx = M.upgd(0.1, key=0, order=2)
  params = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match="hessian_diag"):
    tx.update(params, tx.init(params), params)
  with pytest.raises(ValueError, match="needs params"):
    M.scale_by_upgd(key=0).update(params, M.scale_by_upgd(key=0).init(params))


# --- Hare & Tortoise ------------------------------------------------------


def test_hare_tortoise_matches_numpy():
  _, params, _, _ = mlp()
  rng = np.random.default_rng(1)
  leaves, treedef = jax.tree.flatten(params)
  lr, decay, period = 0.1, 0.8, 3
  tx = optax.chain(optax.sgd(lr), M.hare_tortoise(decay, period))
  state = tx.init(params)
  p = params
  hare = np_leaves(params)
  tortoise = [h.copy() for h in hare]
  for t in range(1, 8):
    g = [rng.normal(size=l.shape) for l in leaves]
    u, state = jax.jit(tx.update)(
        jax.tree.unflatten(treedef, [jnp.asarray(a, jnp.float32) for a in g]), state, p)
    p = optax.apply_updates(p, u)
    hare = [h - lr * gi for h, gi in zip(hare, g)]
    tortoise = [decay * s + (1 - decay) * h for s, h in zip(tortoise, hare)]
    if t % period == 0:
      hare = [s.copy() for s in tortoise]
    for got, want in zip(np_leaves(p), hare):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"step {t}")
  for got, want in zip(np_leaves(M.tortoise_params(state)), tortoise):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_hare_tortoise_validates():
  with pytest.raises(ValueError, match="decay"):
    M.hare_tortoise(1.5, 10)
  with pytest.raises(ValueError, match="reset_period"):
    M.hare_tortoise(0.9, 0)
  with pytest.raises(ValueError, match="expected one hare_tortoise state"):
    M.tortoise_params(optax.sgd(0.1).init({"w": jnp.ones(2)}))


# --- ReGraMa --------------------------------------------------------------


def test_gradient_scores_by_hand():
  g = jnp.array([[1.0, 0.0, -2.0], [1.0, 0.0, 4.0]])  # Per unit mean |g| = [1, 0, 3], mean 4/3.
  np.testing.assert_allclose(np.asarray(M.gradient_scores(g)), [0.75, 0.0, 2.25], rtol=1e-6)


def test_regrama_resets_the_unit_without_gradient():
  model, params, x, y = mlp()
  params = kill(params, "Dense_1", 2)  # A dead ReLU gets no gradient on its incoming weights.
  g, _ = grads_and_acts(model, params, x, y)
  kg = np.abs(np.asarray(g["Dense_1"]["kernel"], np.float64)).mean(0)
  scores = kg / kg.mean()
  np.testing.assert_allclose(np.asarray(M.gradient_scores(g["Dense_1"]["kernel"])), scores, rtol=1e-5)
  dead = set(np.flatnonzero(scores == 0))
  assert 2 in dead and len(dead) < 6
  kg0 = np.abs(np.asarray(g["Dense_0"]["kernel"])).mean(0)
  dead0 = set(np.flatnonzero(kg0 == 0))
  plain = optax.apply_updates(params, optax.sgd(0.1).update(g, optax.sgd(0.1).init(params))[0])
  graph = cbp_jax.graph_from_params(params)
  for period, resets in ((1, True), (2, False)):
    tx = M.regrama(graph, key=0, tau=0.0, period=period, optimizer=optax.sgd(0.1))
    state = tx.init(params)
    u, state = jax.jit(tx.update)(g, state, params)
    new = optax.apply_updates(params, u)
    if resets:
      check_unit_reset(params, new, plain, "Dense_1", "Dense_2", dead)
      assert int(state.replaced_total["Dense_1"]) == len(dead)
      assert int(state.replaced_total["Dense_0"]) == len(dead0)
    else:
      for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_regrama_restarts_the_wrapped_adam_moments():
  model, params, x, y = mlp()
  params = kill(params, "Dense_0", 1)
  g, _ = grads_and_acts(model, params, x, y)
  live = np.abs(np.asarray(g["Dense_0"]["kernel"])).mean(0) > 0
  assert not live[1] and live.any()
  graph = cbp_jax.graph_from_params(params)
  tx = M.regrama(graph, key=0, tau=0.0, period=1, optimizer=optax.adam(1e-2))
  state = tx.init(params)
  state = state._replace(inner_state=jax.tree.map(lambda a: a + 1.0, state.inner_state))
  _, state = tx.update(g, state, params)
  mu = state.inner_state[0].mu
  np.testing.assert_array_equal(np.asarray(mu["Dense_0"]["kernel"])[:, 1], 0.0)
  np.testing.assert_array_equal(np.asarray(mu["Dense_1"]["kernel"])[1], 0.0)
  assert (np.asarray(mu["Dense_0"]["kernel"])[:, live] != 0).all()


# --- SNR ------------------------------------------------------------------


def snr_numpy(acts_list, eta):
  """SNR's rule in NumPy: per step, the units reset (and the statistics after)."""
  width = acts_list[0].shape[-1]
  rate, seen, streak = np.zeros(width), np.zeros(width), np.zeros(width)
  resets = []
  for h in acts_list:
    fired = (h > 0).reshape(-1, width)
    n = fired.shape[0]
    hits = fired.sum(0)
    rate = (rate * seen + hits) / (seen + n)
    seen = seen + n
    streak = np.where(hits > 0, 0, streak + n)
    with np.errstate(divide="ignore"):
      prob = np.where(streak > 0, (1 - rate) ** streak, 1.0)
    reset = prob < eta
    resets.append(set(np.flatnonzero(reset)))
    rate, seen, streak = (np.where(reset, 0, a) for a in (rate, seen, streak))
  return resets


def test_snr_resets_when_the_streak_is_improbable():
  model, params, x, _ = mlp(batch=4)
  graph = cbp_jax.graph_from_params(params)
  rng = np.random.default_rng(3)
  # Unit 0 always fires, then stops; unit 1 fires on ~1 in 8 examples and
  # stays quiet long stretches; unit 2 never fires; the rest fire at random.
  acts_list = []
  for t in range(12):
    h = rng.uniform(-1, 1, size=(4, 6)).astype(np.float32)
    h[:, 0] = 1.0 if t < 2 else -1.0
    h[:, 1] = -1.0
    if t in (0, 5):
      h[0, 1] = 1.0
    h[:, 2] = -1.0
    acts_list.append(h)
  eta = 0.05
  want = snr_numpy(acts_list, eta)
  assert 0 in want[2]  # Fired on all 8 examples, then silent on 4: (1 - 8/12)^4 = 1/81 < eta.
  assert all(2 not in w for w in want)  # Never fired: never reset.
  tx = optax.chain(optax.sgd(0.0), M.snr(graph, key=0, eta=eta))
  state = tx.init(params)
  update = jax.jit(tx.update)
  g = jax.tree.map(jnp.zeros_like, params)
  for t, h in enumerate(acts_list):
    acts = {"Dense_0": jnp.asarray(h), "Dense_1": jnp.ones((4, 6))}
    u, state = update(g, state, params, activations=acts)
    got = set(np.flatnonzero(np.asarray(state[1].last_replaced["Dense_0"])))
    assert got == want[t], f"step {t}: {got} vs {want[t]}"
    if got:
      new = optax.apply_updates(params, u)
      check_unit_reset(params, new, params, "Dense_0", "Dense_1", got)
      assert not np.asarray(state[1].last_replaced["Dense_1"]).any()


def test_snr_statistics_by_hand():
  rate, seen, streak = M.update_firing(jnp.array([0.5, 0.0]), jnp.array([4.0, 4.0]),
                                       jnp.array([0.0, 4.0]), jnp.array([[1.0, -1.0], [0.0, 0.0]]))
  np.testing.assert_allclose(np.asarray(rate), [(2 + 1) / 6, 0.0])
  np.testing.assert_allclose(np.asarray(seen), [6.0, 6.0])
  np.testing.assert_allclose(np.asarray(streak), [0.0, 6.0])
  logp = M.streak_log_probability(jnp.array([0.5, 1.0, 0.3]), jnp.array([3.0, 2.0, 0.0]))
  np.testing.assert_allclose(np.asarray(logp)[[0, 2]], [3 * math.log(0.5), 0.0], rtol=1e-6)
  assert np.asarray(logp)[1] == -np.inf


def test_snr_validates():
  _, params, _, _ = mlp()
  graph = cbp_jax.graph_from_params(params)
  for eta in (0.0, 1.0, -0.1):
    with pytest.raises(ValueError, match="eta"):
      M.snr(graph, key=0, eta=eta)
  tx = M.snr(graph, key=0)
  with pytest.raises(ValueError, match="snr: update needs the keyword argument activations"):
    tx.update(params, tx.init(params), params)


# --- Plasticity injection -------------------------------------------------


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
    np.testing.assert_array_equal(np.asarray(part["Dense_2/kernel"]),
                                  np.asarray(p.fresh["Dense_2/kernel"]))
  before = apply(p1, x)
  fresh = model.init(jax.random.key(9), x)["params"]
  p2, state = jax.jit(M.inject)(p1, state, fresh)
  np.testing.assert_array_equal(np.asarray(apply(p2, x)), np.asarray(before))  # Bitwise.
  np.testing.assert_array_equal(np.asarray(p2.fresh["Dense_2/kernel"]),
                                np.asarray(fresh["Dense_2"]["kernel"]))
  p3, state = step(p2, state)
  for path in ("Dense_2/kernel", "Dense_2/bias"):
    layer, leaf = path.split("/")
    np.testing.assert_array_equal(np.asarray(p3.base[layer][leaf]), np.asarray(p2.base[layer][leaf]))
    np.testing.assert_array_equal(np.asarray(p3.anchor[path]), np.asarray(p2.anchor[path]))
    assert not np.allclose(p3.fresh[path], p2.fresh[path])
  assert not np.allclose(p3.base["Dense_0"]["kernel"], p2.base["Dense_0"]["kernel"])
  # A second injection changes nothing.
  p4, _ = M.inject(p3, state, model.init(jax.random.key(10), x)["params"])
  np.testing.assert_array_equal(np.asarray(p4.fresh["Dense_2/kernel"]),
                                np.asarray(p3.fresh["Dense_2/kernel"]))


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
      p, state = M.inject(p, state, model.init(jax.random.fold_in(key, 1), x)["params"],
                          when=t == at)
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


# --- LayerNorm + weight decay, and combinations ---------------------------


def test_layer_norm_weight_decay_recipe():
  """MLP(layer_norm=True) with L2 before SGD: the step is -lr * (g + wd * p), norms in the graph."""
  model, params, x, y = mlp(layer_norm=True)
  graph = cbp_jax.graph_from_params(params)
  assert [l.norm for l in graph.layers] == ["LayerNorm_0", "LayerNorm_1"]
  g, acts = grads_and_acts(model, params, x, y)
  # The recorded activation is the post-norm ReLU output.
  h = x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
  h = (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-6)
  h = jax.nn.relu(h * params["LayerNorm_0"]["scale"] + params["LayerNorm_0"]["bias"])
  np.testing.assert_allclose(np.asarray(acts["Dense_0"]), np.asarray(h), rtol=1e-5, atol=1e-6)
  tx = optax.chain(M.l2(1e-2), optax.sgd(0.1))
  u, _ = tx.update(g, tx.init(params), params)
  for ui, gi, pi in zip(np_leaves(u), np_leaves(g), np_leaves(params)):
    np.testing.assert_allclose(ui, -0.1 * (gi + 1e-2 * pi), rtol=1e-5, atol=1e-7)


def test_cbp_with_layer_norm_and_weight_decay():
  model, params, x, y = mlp(layer_norm=True)
  graph = cbp_jax.graph_from_params(params)
  params = jax.tree.map(lambda a: a, params)
  params["LayerNorm_0"] = {"scale": params["LayerNorm_0"]["scale"] * 2.0 + 0.5,
                           "bias": params["LayerNorm_0"]["bias"] + 0.3}
  tx = optax.chain(M.l2(1e-3), optax.sgd(0.01),
                   cbp_jax.cbp(graph, key=0, replacement_rate=0.5, maturity_threshold=0))
  state = tx.init(params)
  p, state = jitted_step(model, tx, x, y)(params, state)
  replaced = np.asarray(state[2].last_replaced["Dense_0"])
  assert replaced.any()
  np.testing.assert_array_equal(np.asarray(p["LayerNorm_0"]["scale"])[replaced], 1.0)
  np.testing.assert_array_equal(np.asarray(p["LayerNorm_0"]["bias"])[replaced], 0.0)
  assert (np.asarray(p["LayerNorm_0"]["scale"])[~replaced] != 1.0).all()


def test_unit_reset_methods_do_not_nest():
  _, params, _, _ = mlp()
  graph = cbp_jax.graph_from_params(params)
  adam = optax.adam(1e-2)
  with pytest.raises(ValueError, match=r"snr: init needs the parameters.*optax\.chain\(cbp"):
    cbp_jax.cbp(graph, key=0, optimizer=M.snr(graph, key=1, optimizer=adam)).init(params)
  for outer in (M.regrama, M.snr, M.redo):
    with pytest.raises(ValueError, match=r"optimizer= holds a cbp, redo, regrama or snr"):
      outer(graph, key=0, optimizer=optax.chain(optax.sgd(0.1), M.regrama(graph, key=1))).init(params)


def test_chains_of_new_methods_run_jitted():
  """UPGD under CBP's optimizer=, Hare & Tortoise after CBP, SNR after ReGraMa: one jitted step each."""
  model, params, x, y = mlp()
  graph = cbp_jax.graph_from_params(params)
  txs = [
      cbp_jax.cbp(graph, key=0, optimizer=M.upgd(0.01, key=1)),
      optax.chain(optax.sgd(0.01), cbp_jax.cbp(graph, key=0), M.hare_tortoise(0.99, 2)),
      optax.chain(M.regrama(graph, key=0, optimizer=optax.sgd(0.01)), M.snr(graph, key=1)),
  ]
  for tx in txs:
    state = tx.init(params)
    step = jitted_step(model, tx, x, y)
    p = params
    for _ in range(2):
      p, state = step(p, state)
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(p))


@pytest.mark.slow  # Six compilations; the experiments' tests vmap these methods in `make test`.
def test_reset_methods_vmap_over_keys_and_traced_hyperparameters():
  """ReGraMa (tau, period), SNR (eta), Hare & Tortoise (decay, period): vmapped == one by one."""
  model, params, x, y = mlp()
  params = kill(params, "Dense_0", 3)
  graph = cbp_jax.graph_from_params(params)
  makers = {
      "regrama": lambda k, a, b: optax.chain(
          optax.sgd(0.1), M.regrama(graph, key=k, tau=a, period=b.astype(jnp.int32))),
      "snr": lambda k, a, b: optax.chain(optax.sgd(0.1), M.snr(graph, key=k, eta=a)),
      "hare_tortoise": lambda k, a, b: optax.chain(
          optax.sgd(0.1), M.hare_tortoise(a, b.astype(jnp.int32))),
  }
  settings = {"regrama": ([0.0, 0.5], [1.0, 3.0]), "snr": ([0.3, 0.9], [0.0, 0.0]),
              "hare_tortoise": ([0.5, 0.9], [2.0, 1.0])}
  keys = jax.random.split(jax.random.key(5), 2)
  for name, make in makers.items():
    def run(k, a, b):
      tx = make(k, a, b)
      return jax.lax.fori_loop(0, 2, lambda _, c: jitted_step(model, tx, x, y)(*c),
                               (params, tx.init(params)))[0]
    a, b = (jnp.asarray(v, jnp.float32) for v in settings[name])
    batched = jax.jit(jax.vmap(run))(keys, a, b)
    for i in range(2):
      single = run(keys[i], a[i], b[i])
      for got, want in zip(jax.tree.leaves(batched), jax.tree.leaves(single)):
        np.testing.assert_allclose(np.asarray(got)[i], np.asarray(want), rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    if name != "snr":  # SNR resets nothing in two steps here (its rule is tested above).
      leaf = np.asarray(batched["Dense_0"]["kernel"])
      assert not np.allclose(leaf[0], leaf[1]), name  # The settings matter.
