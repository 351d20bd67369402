"""Property-based tests of the reset kernel, the layer graph and cbp().

Hypothesis draws small random networks (Dense chains, conv -> conv -> flatten
-> dense in either flatten layout, fan-out with a skip consumer, with or
without biases and a per-unit affine norm), random parameters, updates,
selections, rates, maturities and decays. Every expectation is computed here,
in NumPy, from the network's description and SPEC.md, not from the library's
own graph resolution.

Compilation dominates the cost, so the examples are few, shapes small, and
the cbp() properties run one compiled, scanned program per architecture with
the hyperparameters traced (hypothesis varies them without recompiling).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cbp_jax
from cbp_jax import reset as reset_lib
from tests.cbp_steps import mlp

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- Random networks described in plain Python -----------------------------


@dataclasses.dataclass(frozen=True)
class Net:
  """A small network, its parameters built here and its forward pass in jnp.

  kind:
    ``"mlp"``: ``Dense_0 .. Dense_{L-1}`` hidden, ``Dense_L`` head.
    ``"conv"``: ``Conv_0 ..`` hidden (2x2 VALID), flatten (``layout``),
      ``Dense_0`` head.
    ``"fanout"``: ``Dense_0`` read by ``Dense_1`` (hidden, read by the head
      ``Dense_2``) and by a skip ``Dense_3``; output ``Dense_2 + Dense_3``.
  The first hidden layer optionally has a per-unit affine norm ``Norm_0``
  (scale, offset: an inference-mode BatchNorm) between producer and ReLU.
  """

  kind: str
  inputs: int
  widths: tuple[int, ...]
  outputs: int
  norm: bool
  bias: bool
  layout: str = "channels_last"
  size: int = 3

  @property
  def hidden(self) -> list[str]:
    prefix = "Conv" if self.kind == "conv" else "Dense"
    return [f"{prefix}_{i}" for i in range(len(self.widths))]

  @property
  def positions(self) -> int:
    """Spatial positions the flatten reads per channel (conv)."""
    return (self.size - len(self.widths)) ** 2

  def kernel_shapes(self) -> dict[str, tuple[int, ...]]:
    w = self.widths
    if self.kind == "mlp":
      fans = (self.inputs,) + w
      shapes = {f"Dense_{i}": (fans[i], w[i]) for i in range(len(w))}
      shapes[f"Dense_{len(w)}"] = (w[-1], self.outputs)
    elif self.kind == "conv":
      chans = (self.inputs,) + w
      shapes = {f"Conv_{i}": (2, 2, chans[i], w[i]) for i in range(len(w))}
      shapes["Dense_0"] = (w[-1] * self.positions, self.outputs)
    else:
      shapes = {
        "Dense_0": (self.inputs, w[0]),
        "Dense_1": (w[0], w[1]),
        "Dense_2": (w[1], self.outputs),
        "Dense_3": (w[0], self.outputs),
      }
    return shapes

  def consumers(self, name: str) -> list[tuple[str, int, str]]:
    """(consumer module, positions per unit, layout) of a hidden layer."""
    if self.kind == "fanout":
      return {
        "Dense_0": [("Dense_1", 1, "channels_last"), ("Dense_3", 1, "channels_last")],
        "Dense_1": [("Dense_2", 1, "channels_last")],
      }[name]
    i = self.hidden.index(name)
    if self.kind == "mlp":
      return [(f"Dense_{i + 1}", 1, "channels_last")]
    if i + 1 < len(self.widths):
      return [(f"Conv_{i + 1}", 1, "channels_last")]
    return [("Dense_0", self.positions, self.layout)]

  def graph(self) -> cbp_jax.LayerGraph:
    layers = []
    for n, name in enumerate(self.hidden):
      layers.append(
        cbp_jax.Layer(
          name,
          kernel=f"{name}/kernel",
          bias=f"{name}/bias" if self.bias else None,
          norm="Norm_0" if (self.norm and n == 0) else None,
          consumers=[
            cbp_jax.Consumer(f"{c}/kernel", f"{c}/bias" if self.bias else None, layout)
            for c, _, layout in self.consumers(name)
          ],
        )
      )
    return cbp_jax.LayerGraph(layers)

  def params(self, rng: np.random.Generator) -> dict:
    params = {}
    for module, shape in self.kernel_shapes().items():
      params[module] = {"kernel": jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32)}
      if self.bias:
        params[module]["bias"] = jnp.asarray(rng.uniform(-1, 1, shape[-1]), jnp.float32)
    if self.norm:
      params["Norm_0"] = {
        "scale": jnp.asarray(rng.uniform(0.5, 1.5, self.widths[0]), jnp.float32),
        "bias": jnp.asarray(rng.uniform(-0.5, 0.5, self.widths[0]), jnp.float32),
      }
    return params

  def x(self, rng: np.random.Generator, batch: int = 2) -> jax.Array:
    shape = (batch, self.inputs) if self.kind != "conv" else (batch, self.size, self.size, self.inputs)
    return jnp.asarray(rng.normal(size=shape), jnp.float32)

  def forward(self, params, x):
    """Output and ``{hidden layer: post-activation h}``."""
    hp = jax.lax.Precision.HIGHEST

    def layer(name, h, first=False):
      k = params[name]["kernel"]
      if k.ndim == 4:
        z = jax.lax.conv_general_dilated(
          h, k, (1, 1), "VALID", precision=hp, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
      else:
        z = jnp.dot(h, k, precision=hp)
      if self.bias:
        z = z + params[name]["bias"]
      if first and self.norm:
        z = z * params["Norm_0"]["scale"] + params["Norm_0"]["bias"]
      return z

    acts = {}
    if self.kind == "fanout":
      h0 = acts["Dense_0"] = jax.nn.relu(layer("Dense_0", x, first=True))
      h1 = acts["Dense_1"] = jax.nn.relu(layer("Dense_1", h0))
      return layer("Dense_2", h1) + layer("Dense_3", h0), acts
    h = x
    for n, name in enumerate(self.hidden):
      h = acts[name] = jax.nn.relu(layer(name, h, first=n == 0))
    if self.kind == "conv":
      if self.layout == "channels_first":
        h = jnp.transpose(h, (0, 3, 1, 2))
      h = h.reshape(h.shape[0], -1)
    return layer(f"Dense_{len(self.widths) if self.kind == 'mlp' else 0}", h), acts


@st.composite
def nets(draw):
  kind = draw(st.sampled_from(["mlp", "conv", "conv", "fanout"]))  # Conv has the most geometry.
  depth = draw({"mlp": st.integers(1, 3), "conv": st.integers(1, 2), "fanout": st.just(2)}[kind])
  widths = tuple(draw(st.integers(1, 4)) for _ in range(depth))
  if kind == "conv":  # The flatten layouts differ only for 2+ channels.
    widths = widths[:-1] + (draw(st.integers(2, 4)),)
  return Net(
    kind=kind,
    inputs=draw(st.integers(1, 3)),
    widths=widths,
    outputs=draw(st.integers(1, 2)),
    norm=draw(st.booleans()),
    bias=draw(st.booleans()),
    layout=draw(st.sampled_from(["channels_last", "channels_first"])) if kind == "conv" else "channels_last",
    size=len(widths) + 2,
  )  # 2x2 positions per channel behind the flatten.


def path_of(keypath) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in keypath)


def leaf_paths(tree) -> list[str]:
  return [path_of(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def get(tree, path: str):
  module, leaf = path.split("/")
  return tree[module][leaf]


def unit_rows(width: int, positions: int, layout: str, i: int) -> list[int]:
  """Consumer inputs (axis -2) reading unit ``i`` (written from the README)."""
  return [p * width + i if layout == "channels_last" else i * positions + p for p in range(positions)]


def expected_reset_masks(net: Net, params, selected: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Per leaf path, the entries a reset of ``selected`` units rewrites (SPEC 7).

  Incoming kernel columns, bias and norm entries of the units, and their
  outgoing rows in every consumer. Consumer biases are only shifted.
  """
  masks = {p: np.zeros(np.shape(get(params, p)), bool) for p in leaf_paths(params)}
  for n, name in enumerate(net.hidden):
    units = selected[name]
    masks[f"{name}/kernel"][..., units] = True
    if net.bias:
      masks[f"{name}/bias"][units] = True
    if net.norm and n == 0:
      masks["Norm_0/scale"][units] = True
      masks["Norm_0/bias"][units] = True
    for consumer, positions, layout in net.consumers(name):
      rows = [r for i in units for r in unit_rows(net.widths[n], positions, layout, i)]
      masks[f"{consumer}/kernel"][..., rows, :] = True
  return masks


def init_bound(init: str, kernel_shape) -> float:
  """SPEC 8 bounds for a ReLU layer (gain sqrt 2); conv fans count the window."""
  fan_in = math.prod(kernel_shape[:-1])
  fan_out = kernel_shape[-1] * math.prod(kernel_shape[:-2])
  g = math.sqrt(2.0)
  # kaiming_normal has no bound; 8 std is crossed with probability ~1e-15.
  return {
    "kaiming": g * math.sqrt(3 / fan_in),
    "default": math.sqrt(1 / fan_in),
    "xavier": g * math.sqrt(6 / (fan_in + fan_out)),
    "lecun": math.sqrt(3 / fan_in),
    "kaiming_normal": 8 * g / math.sqrt(fan_in),
    # flax's lecun_normal: a normal truncated at 2 of its scales, sqrt(1 / fan_in) / 0.8796.
    "lecun_normal": 2 * math.sqrt(1 / fan_in) / 0.87962566103423978,
  }[init]


OPTIMIZERS = {
  # name: (optimizer, what a fresh init holds in its parameter-shaped statistics)
  "adam": (optax.adam(1e-3), 0.0),
  "momentum": (optax.sgd(1e-2, momentum=0.9), 0.0),
  "adagrad": (optax.adagrad(1e-2, initial_accumulator_value=0.1), 0.1),
}


# --- select_lowest ---------------------------------------------------------

_select = jax.jit(reset_lib.select_lowest, static_argnums=3)
SCORE = st.one_of(
  st.sampled_from([0.0, 1.0, 2.0, 3.0, -1.0, np.nan, np.inf, -np.inf]),  # Ties and non-finite.
  st.floats(-1e6, 1e6, width=32, allow_subnormal=False).filter(lambda v: v != 0.0),
)


@settings(max_examples=25, **SETTINGS)
@given(data=st.data())
def test_select_lowest_picks_the_lowest_eligible_finite_scores(data):
  n = data.draw(st.integers(1, 6), label="width")
  bound = data.draw(st.integers(1, n), label="bound")
  count = data.draw(st.integers(0, n + 2), label="count")
  scores = np.array(data.draw(st.lists(SCORE, min_size=n, max_size=n), label="scores"), np.float32)
  eligible = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n), label="eligible"))
  sel = _select(jnp.asarray(scores), jnp.asarray(eligible), jnp.int32(count), bound)

  idx = np.asarray(sel.indices)
  candidates = [i for i in range(n) if eligible[i] and np.isfinite(scores[i])]
  k = min(count, len(candidates), bound)
  # Lowest score first, ties to the lower index.
  expected = sorted(candidates, key=lambda i: (scores[i], i))[:k]
  assert idx.shape == (bound,)
  assert sorted(idx[idx < n].tolist()) == sorted(expected)
  assert np.all(idx[idx >= n] == n)  # Empty slots hold the width.
  assert int(sel.count(n)) == k
  np.testing.assert_array_equal(np.asarray(sel.mask(n)), np.isin(np.arange(n), expected))


# --- The reset kernel on random graphs ----------------------------------


@functools.cache
def reset_program(net: Net, init: str, correct: bool, optimizer: str):
  """One compiled call: reset_units, touched_slices and reset_optimizer_state."""
  graph = net.graph()
  inner = OPTIMIZERS[optimizer][0]

  def program(params, updates, opt_state, indices, key, x):
    layers, leaves, _ = cbp_jax.graph.resolve(graph, params)
    post = optax.apply_updates(params, updates)
    plain_out, acts = net.forward(post, x)
    f_hat = {n: jnp.mean(a.reshape(-1, a.shape[-1]), axis=0) for n, a in acts.items()}
    selections = {n: reset_lib.Selection(i) for n, i in indices.items()}
    new_updates = reset_lib.reset_units(
      updates, params, layers, selections, key, init=init, mean_activation=f_hat if correct else None
    )
    touched = reset_lib.touched_slices(layers, selections)
    new_params = optax.apply_updates(params, new_updates)
    new_state = reset_lib.reset_optimizer_state(inner, opt_state, new_params, touched)
    touched_masks = {}
    for leaf, slices in touched.items():
      m = jnp.zeros(leaves[leaf].shape, bool)
      for axis, idx in slices:
        m = m.at[(slice(None),) * (axis % m.ndim) + (idx,)].set(True, mode="drop")
      touched_masks[leaf] = m
    reset_out, _ = net.forward(new_params, x)
    return new_updates, touched_masks, new_state, f_hat, plain_out, reset_out

  return jax.jit(program)


@settings(max_examples=12, **SETTINGS)
@given(net=nets(), data=st.data())
def test_reset_kernel_on_random_graphs(net, data):
  """reset_units / touched_slices / reset_optimizer_state, checked entry by entry.

  * touched_slices names exactly the incoming columns, biases, norm entries
    and outgoing rows (every flattened position) of the selected units;
  * every other update entry is bitwise the optimizer's, so
    params + updates there is bitwise params + original updates;
  * outgoing weights are exactly 0 (unless the column is redrawn because the
    consumer's own unit is replaced), incoming ones within the init bound,
    biases and norm offsets exactly 0, norm scales 1;
  * consumer biases absorb sum_rows w_out * f_hat of the replaced units;
  * with the first layer's post-step kernel zero (all activations constant),
    the network's output is unchanged by the reset (bias correction);
  * the wrapped optimizer's statistics of touched entries hold a fresh
    init's value, all others (and consumer biases) are untouched.
  """
  init = data.draw(st.sampled_from(cbp_jax.initializers.INITS), label="init")
  correct = data.draw(st.booleans(), label="correct")
  opt_name = data.draw(st.sampled_from(sorted(OPTIMIZERS)), label="optimizer")
  rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
  selected, indices = {}, {}
  for name, n in zip(net.hidden, net.widths):
    picked = data.draw(st.lists(st.booleans(), min_size=n, max_size=n), label=name)
    units = [i for i in range(n) if picked[i]]
    slots = data.draw(st.permutations(units + [n] * (n - len(units))), label=f"{name} slots")
    selected[name] = np.array(sorted(units), int)
    indices[name] = jnp.asarray(slots, jnp.int32)

  params = net.params(rng)
  updates = jax.tree.map(lambda p: jnp.asarray(rng.normal(0, 0.1, p.shape), p.dtype), params)
  first = f"{net.hidden[0]}/kernel"
  # Post-step first kernel exactly 0: every hidden activation is then constant.
  updates[first.split("/")[0]]["kernel"] = -get(params, first)
  inner, fresh_value = OPTIMIZERS[opt_name]
  opt_state = optax.tree_utils.tree_map_params(
    inner, lambda v: jnp.asarray(rng.uniform(0.2, 1.0, v.shape), v.dtype), inner.init(params)
  )
  key = jax.random.key(data.draw(st.integers(0, 1000), label="key"))

  new_updates, touched, new_state, f_hat, plain_out, reset_out = reset_program(net, init, correct, opt_name)(
    params, updates, opt_state, indices, key, net.x(rng)
  )

  paths = leaf_paths(params)
  masks = expected_reset_masks(net, params, selected)
  # touched_slices, independently derived.
  for i, path in enumerate(paths):
    got = np.asarray(touched[i]) if i in touched else np.zeros_like(masks[path])
    np.testing.assert_array_equal(got, masks[path], err_msg=path)

  consumer_bias = {}  # bias path -> expected shift, float64
  if net.bias:
    for n, name in enumerate(net.hidden):
      for consumer, positions, layout in net.consumers(name):
        w = np.asarray(get(params, f"{consumer}/kernel"), np.float64) + np.asarray(
          get(updates, f"{consumer}/kernel"), np.float64
        )
        shift = consumer_bias.setdefault(f"{consumer}/bias", np.zeros(w.shape[-1]))
        if correct:
          for i in selected[name]:
            rows = unit_rows(net.widths[n], positions, layout, i)
            block = w[..., rows, :].reshape(-1, w.shape[-1])
            shift += block.sum(axis=0) * float(f_hat[name][i])

  for path in paths:
    p = np.asarray(get(params, path))
    old_u, new_u = np.asarray(get(updates, path)), np.asarray(get(new_updates, path))
    assert new_u.dtype == old_u.dtype
    keep = ~masks[path]
    if path in consumer_bias:
      np.testing.assert_allclose(
        new_u[keep], (old_u + consumer_bias[path])[keep], rtol=1e-5, atol=1e-5, err_msg=path
      )
      if not correct:
        np.testing.assert_array_equal(new_u[keep], old_u[keep], err_msg=path)
    else:
      np.testing.assert_array_equal(new_u[keep], old_u[keep], err_msg=path)
      np.testing.assert_array_equal((p + new_u)[keep], (p + old_u)[keep], err_msg=path)

  new_p = jax.tree.map(lambda a, b: np.asarray(a) + np.asarray(b), params, new_updates)
  redrawn = {
    f"{name}/kernel": np.isin(np.arange(n), selected[name]) for name, n in zip(net.hidden, net.widths)
  }
  for n, name in enumerate(net.hidden):
    units = selected[name]
    k = get(new_p, f"{name}/kernel")
    assert np.all(np.abs(k[..., units]) <= init_bound(init, k.shape) * (1 + 1e-6) + 1e-7)
    if units.size and k[..., 0].size > 1:  # Redrawn, not the old column.
      old = np.asarray(get(params, f"{name}/kernel")) + np.asarray(get(updates, f"{name}/kernel"))
      assert not np.array_equal(k[..., units], old[..., units])
    if net.bias:
      np.testing.assert_array_equal(get(new_p, f"{name}/bias")[units], 0.0)
    if net.norm and n == 0:
      np.testing.assert_allclose(new_p["Norm_0"]["scale"][units], 1.0, atol=1e-6)
      np.testing.assert_array_equal(new_p["Norm_0"]["bias"][units], 0.0)
    for consumer, positions, layout in net.consumers(name):
      rows = [r for i in units for r in unit_rows(net.widths[n], positions, layout, i)]
      out_rows = get(new_p, f"{consumer}/kernel")[..., rows, :]
      cols = redrawn.get(f"{consumer}/kernel", np.zeros(out_rows.shape[-1], bool))
      np.testing.assert_array_equal(out_rows[..., ~cols], 0.0)

  if net.bias and correct:  # Constant activations: the function does not jump.
    scale = 1.0 + float(np.max(np.abs(plain_out)))
    np.testing.assert_allclose(reset_out, plain_out, rtol=1e-4, atol=1e-5 * scale)

  # The wrapped optimizer's statistics: a state-shaped tree of masks, "other"
  # at fields that do not mirror the parameters (step counts).
  param_masks = jax.tree.unflatten(jax.tree.structure(params), [masks[p] for p in paths])
  state_masks = optax.tree_utils.tree_map_params(
    inner, lambda _, m: m, new_state, param_masks, transform_non_params=lambda _: "other"
  )
  mirrored = 0
  for mask, after, before in zip(
    jax.tree.leaves(state_masks), jax.tree.leaves(new_state), jax.tree.leaves(opt_state), strict=True
  ):
    after, before = np.asarray(after), np.asarray(before)
    if isinstance(mask, str):
      np.testing.assert_array_equal(after, before)
      continue
    mirrored += 1
    np.testing.assert_array_equal(after[mask], np.float32(fresh_value))
    np.testing.assert_array_equal(after[~mask], before[~mask])
  assert mirrored >= len(paths)


# --- Graph resolution on random graphs -----------------------------------


@settings(max_examples=25, **SETTINGS)
@given(net=nets(), data=st.data())
def test_resolved_graph_and_touched_slices_match_the_description(net, data):
  """resolve() finds each layer's leaves, width, fans and flatten positions;
  touched_slices names exactly the selected units' entries (every position of
  a channel behind a flatten, in the consumer's layout); graph_from_params
  infers the same sequential stacks."""
  params = net.params(np.random.default_rng(0))
  layers, leaves, _ = cbp_jax.graph.resolve(net.graph(), params)
  paths = leaf_paths(params)
  shapes = net.kernel_shapes()
  assert [l.name for l in layers] == net.hidden
  for layer, width in zip(layers, net.widths):
    name = layer.name
    assert layer.width == width
    assert paths[layer.kernel] == f"{name}/kernel"
    assert layer.fan_in == math.prod(shapes[name][:-1])
    assert [(paths[c.kernel], c.positions, c.layout) for c in layer.consumers] == [
      (f"{c}/kernel", p, l) for c, p, l in net.consumers(name)
    ]

  selected, selections = {}, {}
  for name, n in zip(net.hidden, net.widths):
    picked = data.draw(st.lists(st.booleans(), min_size=n, max_size=n), label=name)
    units = [i for i in range(n) if picked[i]]
    selected[name] = np.array(units, int)
    selections[name] = reset_lib.Selection(jnp.asarray(units + [n] * (n - len(units)), jnp.int32))
  masks = expected_reset_masks(net, params, selected)
  touched = reset_lib.touched_slices(layers, selections)
  for i, path in enumerate(paths):
    got = np.zeros(np.shape(leaves[i]), bool)
    for axis, idx in touched.get(i, []):
      idx = np.asarray(idx)
      got[(slice(None),) * (axis % got.ndim) + (idx[idx < got.shape[axis]],)] = True
    np.testing.assert_array_equal(got, masks[path], err_msg=path)

  if net.kind != "fanout" and not net.norm and (net.kind == "mlp" or net.layout == "channels_last"):
    # graph_from_params infers the same sequential stack (it knows only
    # flax's channels_last flatten, and norms placed between siblings).
    inferred = cbp_jax.graph_from_params(params)
    assert inferred.names == tuple(net.hidden)
    assert [[c.kernel for c in l.consumers] for l in inferred] == [
      [f"{c}/kernel" for c, _, _ in net.consumers(n)] for n in net.hidden
    ]


# --- cbp() on whole runs with traced hyperparameters ------------------------


STEPS = 16
RATES = [0.0, 1 / 64, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0]  # Dyadic: float32 counts are exact.


@dataclasses.dataclass(frozen=True)
class Arch:
  """A network for the cbp() runs, with cbp's static options."""

  name: str
  utility: str
  count_basis: str
  bound: int | None
  magnitude_refresh_every: int = 1


ARCHS = {
  # The tests' flax MLP; "contribution" ignores incoming weights, so a zero
  # first kernel (constant activations) gives finite utilities.
  "mlp": Arch("mlp", "contribution", "eligible", 2),
  # Conv -> conv -> channels-first flatten -> dense, with a norm; magnitudes
  # refreshed a slice at a time (the invariants below hold either way).
  "conv": Arch("conv", "adaptable_contribution", "layer", None, magnitude_refresh_every=3),
}
CONV_NET = Net(
  kind="conv", inputs=1, widths=(3, 4), outputs=2, norm=True, bias=True, layout="channels_first", size=4
)


def arch_net(arch: Arch):
  """(params, forward, Net description) of an architecture."""
  if arch.name == "mlp":
    model, params = mlp(hidden=(5, 4), inputs=3, outputs=2)
    desc = Net(kind="mlp", inputs=3, widths=(5, 4), outputs=2, norm=False, bias=True)
    return params, lambda p, x: cbp_jax.apply_with_activations(model, p, x), desc
  return CONV_NET.params(np.random.default_rng(0)), CONV_NET.forward, CONV_NET


@functools.cache
def cbp_run(arch_name: str):
  """A compiled run of STEPS steps of cbp(optimizer=adam(lr)), all hyperparameters traced.

  Records, per step, the ages before the step, the replaced units, cbp's
  updates and adam's own updates from the same state, and both inner states.
  """
  arch = ARCHS[arch_name]
  _, forward, desc = arch_net(arch)
  graph = desc.graph() if arch.name == "conv" else cbp_jax.graph_from_params(arch_net(arch)[0])

  def run(params, lr, rate, maturity, decay, key, xs, ys):
    inner = optax.adam(lr)
    tx = cbp_jax.cbp(
      graph,
      key=key,
      replacement_rate=rate,
      maturity_threshold=maturity,
      decay_rate=decay,
      utility=arch.utility,
      count_basis=arch.count_basis,
      optimizer=inner,
      max_replacements_per_step=arch.bound,
      magnitude_refresh_every=arch.magnitude_refresh_every,
    )

    def loss_fn(p, x, y):
      out, acts = forward(p, x)
      return jnp.mean((out - y) ** 2), acts

    def body(carry, batch):
      p, s = carry
      (_, acts), g = jax.value_and_grad(loss_fn, has_aux=True)(p, *batch)
      plain_u, plain_inner = inner.update(g, s.inner_state, p)
      u, s2 = tx.update(g, s, p, activations=acts)
      record = dict(
        age_before={n: st_.age for n, st_ in s.statistics.items()},
        age_after={n: st_.age for n, st_ in s2.statistics.items()},
        replaced=s2.last_replaced,
        updates=u,
        plain_updates=plain_u,
        inner=s2.inner_state[0],
        plain_inner=plain_inner[0],
        nonfinite=s2.nonfinite,
      )
      return (optax.apply_updates(p, u), s2), record

    (p, s), records = jax.lax.scan(body, (params, tx.init(params)), (xs, ys))
    return p, s, records

  return jax.jit(run)


def expected_counts(age_before, width, rate, maturity, basis, bound):
  """Accumulate-mode count per step from eligibility (README "Replacement count")."""
  pending, counts = 0.0, []
  for ages in age_before:
    eligible = int(np.sum(ages + 1 > maturity))
    base = eligible if basis == "eligible" else (width if eligible else 0)
    total = pending + rate * base
    due = math.floor(total)
    owed = min(due, eligible)
    count = min(owed, bound)
    pending = total - count - (due - owed)
    counts.append(count)
  return counts


@settings(max_examples=20, **SETTINGS)
@given(
  arch_name=st.sampled_from(sorted(ARCHS)),
  rate=st.sampled_from(RATES),
  maturity=st.integers(0, 8),
  decay=st.sampled_from([0.0, 0.5, 0.9, 0.99]),
  seed=st.integers(0, 2**31 - 1),
  constant=st.booleans(),
)
def test_cbp_runs_with_random_rates_and_maturities(arch_name, rate, maturity, decay, seed, constant):
  """Per step of a cbp(optimizer=adam) run:

  * replaced count == the accumulate-mode count from eligibility and the
    static bound (carry-over included), i.e. min(count, eligible, bound);
  * only units with age > maturity (after the step's increment) are replaced,
    and their ages restart at 0, all others' grow by one;
  * every entry not belonging to a replaced unit gets bitwise adam's own
    update; adam's moments of replaced entries are 0, all others bitwise
    adam's own;
  * with lr 0 and constant activations (zero first kernel), the output at
    the end equals the output at the start: resets with bias correction do
    not change the function.
  """
  arch = ARCHS[arch_name]
  constant = constant and arch.name == "mlp"
  params, forward, desc = arch_net(arch)
  rng = np.random.default_rng(seed)
  x0 = desc.x(rng, batch=2)
  xs = jnp.asarray(rng.normal(size=(STEPS,) + x0.shape), jnp.float32)
  ys = jnp.asarray(rng.normal(size=(STEPS, 2, 2)), jnp.float32)
  if constant:
    params = dict(
      params,
      Dense_0={"kernel": jnp.zeros((3, 5)), "bias": jnp.asarray(rng.uniform(0.2, 1.0, 5), jnp.float32)},
    )
  lr = 0.0 if constant else 1e-2
  final, state, rec = cbp_run(arch_name)(
    params, lr, rate, maturity, decay, jax.random.key(seed % 1000), xs, ys
  )
  rec = jax.tree.map(np.asarray, rec)
  assert int(state.nonfinite) == 0
  paths = leaf_paths(params)
  bound = {name: arch.bound or w for name, w in zip(desc.hidden, desc.widths)}

  for name, width in zip(desc.hidden, desc.widths):
    ages, replaced = rec["age_before"][name], rec["replaced"][name]
    counts = expected_counts(ages, width, rate, maturity, arch.count_basis, bound[name])
    np.testing.assert_array_equal(replaced.sum(axis=1), counts, err_msg=name)
    assert np.all(ages[replaced] + 1 > maturity)
    np.testing.assert_array_equal(rec["age_after"][name], np.where(replaced, 0, ages + 1))

  for t in range(STEPS):
    selected = {n: np.flatnonzero(rec["replaced"][n][t]) for n in desc.hidden}
    masks = expected_reset_masks(desc, params, selected)
    shifted = {f"{c}/bias" for n in desc.hidden if selected[n].size for c, _, _ in desc.consumers(n)}
    for path in paths:
      new_u, plain_u = get(rec["updates"], path)[t], get(rec["plain_updates"], path)[t]
      keep = ~masks[path]
      if path not in shifted:
        np.testing.assert_array_equal(new_u[keep], plain_u[keep], err_msg=f"step {t} {path}")
      for moment in ("mu", "nu"):
        after = get(getattr(rec["inner"], moment), path)[t]
        plain = get(getattr(rec["plain_inner"], moment), path)[t]
        np.testing.assert_array_equal(after[masks[path]], 0.0)
        np.testing.assert_array_equal(after[keep], plain[keep], err_msg=f"step {t} {moment} {path}")
    np.testing.assert_array_equal(rec["inner"].count[t], rec["plain_inner"].count[t])

  if constant:
    probe = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    before, after = forward(params, probe)[0], forward(final, probe)[0]
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5)
