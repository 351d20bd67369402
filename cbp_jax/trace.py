"""The layer graph traced from the computation (`trace_graph`).

`graph_from_params` can only guess which kernel feeds which from the names
and order of a parameter dict. `trace_graph` instead traces the user's
forward function once with `jax.make_jaxpr` (nothing runs on data) and
follows the dataflow of every recorded activation ``h``:

* backwards to its **producer**: the one ``dot_general``/convolution whose
  kernel (a leaf of ``params``) makes the units on the last axis, through
  the bias add, an optional norm (per-unit scale/offset leaves) and the
  elementwise activation, which is identified for the reinitialisation gain;
* forwards to its **consumers**: every ``dot_general``/convolution whose
  kernel reads the units (also behind reshape/flatten in either layout,
  transposes, pooling and dropout masks), with their biases.

Anything else that reads the units or their pre-activations (a residual
add, attention scores, a concat with other features, a norm over the
units, the model output itself) makes them impossible to remove by zeroing
outgoing weights, and is refused with a ValueError naming the layer, the
operation and its source line. The result depends only on the computation:
attribute names, dict order and nesting do not change it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from cbp_jax import initializers, tree_paths
from cbp_jax.graph import Consumer, Layer, LayerGraph

__all__ = [
  "trace_graph",
]


_CONTRACTIONS = ("dot_general", "conv_general_dilated")
# Control flow hides its body behind a loop: units cannot be followed through it.
_OPAQUE = ("scan", "while", "cond", "custom_lin", "shard_map", "pure_callback", "io_callback")
# Elementwise primitives: unit i of the output depends on unit i of the inputs only.
_ELEMENTWISE = frozenset(
  """
    add sub mul div max min neg abs sign exp exp2 log log1p expm1 tanh logistic erf erfc
    erf_inv sin cos sqrt rsqrt cbrt integer_pow pow square select_n convert_element_type copy
    copy_p floor ceil round clamp is_finite eq ne lt le gt ge and or not nextafter
    stop_gradient reduce_precision rem atan2 sinh cosh asinh acosh atanh tan reciprocal
""".split()
)
_REDUCTIONS = ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin")
# Activation names as jax/flax call them (the name of their jit or custom_jvp).
_ACTIVATION_NAMES = {
  "relu": "relu",
  "gelu": "gelu",
  "silu": "silu",
  "swish": "silu",
  "leaky_relu": "leaky_relu",
  "elu": "elu",
  "selu": "selu",
  "sigmoid": "sigmoid",
  "tanh": "tanh",
}
# Primitives that a norm, a bias or pooling between a kernel and its activation use: on
# their own they are no activation function (the identity's gain applies).
_NOT_ACTIVATIONS = frozenset(
  """
    add sub mul div integer_pow square rsqrt sqrt reduce_sum reduce_max reduce_min broadcast_in_dim
    reshape convert_element_type squeeze max copy copy_p stop_gradient select_n eq ne lt le gt ge neg
    reduce_window_max reduce_window_sum pad slice transpose
""".split()
)


class _Value:
  """One value of the flattened program."""

  __slots__ = ("shape", "dtype", "kind", "leaf", "literal", "producer", "users", "param_dep", "data_dep")

  def __init__(self, aval, kind="inner", leaf=None, literal=None):
    self.shape = tuple(getattr(aval, "shape", ()))
    self.dtype = getattr(aval, "dtype", None)
    self.kind = kind  # "param", "data", "key", "const", "literal" or "inner".
    self.leaf = leaf  # Index of the params leaf (kind "param").
    self.literal = literal
    self.producer = None
    self.users = []
    self.param_dep = kind == "param"
    self.data_dep = kind == "data"


class _Eqn(NamedTuple):
  prim: str
  ins: tuple
  outs: tuple
  params: dict
  where: str  # Source line, for messages.
  names: tuple  # Names of the enclosing jitted functions, outermost first.
  order: int


def _where(eqn) -> str:
  try:
    from jax._src import source_info_util  # Private, but the only source of lines.

    return source_info_util.summarize(eqn.source_info)
  except Exception:  # pylint: disable=broad-except
    return "unknown location"


def _sub_jaxpr(eqn):
  """The body of a call-like equation (jit, custom_jvp/vjp, checkpoint), else None."""
  if eqn.primitive.name in _OPAQUE:
    return None
  bodies = [
    v
    for k, v in eqn.params.items()
    if k in ("jaxpr", "call_jaxpr", "fun_jaxpr") and isinstance(v, (jex_core.Jaxpr, jex_core.ClosedJaxpr))
  ]
  if len(bodies) != 1:
    return None
  body = bodies[0]
  if isinstance(body, jex_core.Jaxpr):
    body = jex_core.ClosedJaxpr(body, ())
  return body if len(body.jaxpr.invars) == len(eqn.invars) else None


class _Program:
  """A jaxpr with every call inlined: values, equations, users and producers."""

  def __init__(self, closed, inputs):
    self.eqns: list[_Eqn] = []
    self.outs = self._inline(closed, inputs, ())
    live = set()
    stack = [v for v in self.outs]
    while stack:
      v = stack.pop()
      if id(v) in live:
        continue
      live.add(id(v))
      if v.producer is not None:
        stack.extend(v.producer.ins)
    self.live = live

  def _inline(self, closed, inputs, names):
    env = {}
    for var, const in zip(closed.jaxpr.constvars, closed.consts):
      env[var] = _Value(var.aval, "const")
    env.update(zip(closed.jaxpr.invars, inputs))

    def read(atom):
      if isinstance(atom, jex_core.Literal):
        return _Value(atom.aval, "literal", literal=atom.val)
      return env[atom]

    for eqn in closed.jaxpr.eqns:
      ins = tuple(read(a) for a in eqn.invars)
      body = _sub_jaxpr(eqn)
      if body is not None:
        name = eqn.params.get("name")
        outs = self._inline(body, ins, names + ((str(name),) if name else ()))
        env.update(zip(eqn.outvars, outs))
        continue
      outs = tuple(_Value(v.aval) for v in eqn.outvars)
      e = _Eqn(eqn.primitive.name, ins, outs, dict(eqn.params), _where(eqn), names, len(self.eqns))
      for v in outs:
        v.producer = e
        v.param_dep = any(x.param_dep for x in ins)
        v.data_dep = any(x.data_dep for x in ins)
      for x in ins:
        x.users.append(e)
      self.eqns.append(e)
      env.update(zip(eqn.outvars, outs))
    return [read(a) for a in closed.jaxpr.outvars]


def _is_key(dtype) -> bool:
  return dtype is not None and (jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) or dtype == jnp.uint32)


def _split_static(tree):
  """Array leaves (traced) and everything else (closed over)."""
  leaves, treedef = jax.tree.flatten(tree)
  is_array = [isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)) for x in leaves]
  arrays = [x for x, a in zip(leaves, is_array) if a]

  def rebuild(traced):
    it = iter(traced)
    return jax.tree.unflatten(treedef, [next(it) if a else x for x, a in zip(leaves, is_array)])

  return arrays, rebuild


class _Unit(NamedTuple):
  """Where a value holds a layer's units: ``axis``, of size ``outer * width * inner``.

  Unit ``i`` sits at the axis entries ``(o * width + i) * inner + r``: after
  a channels-last flatten ``inner == 1``, after a channels-first one
  ``outer == 1``.
  """

  axis: int
  outer: int
  inner: int


_CASTS = ("convert_element_type", "reshape", "copy", "copy_p")


def _param_source(v: _Value, through=_CASTS):
  """The params leaf ``v`` is, through casts and reshapes (a kernel operand); else None.

  ``through`` names the primitives looked through: add ``broadcast_in_dim``
  for a bias or norm vector broadcast along the other axes.
  """
  while v.kind == "inner" and v.producer is not None and v.producer.prim in through:
    v = v.producer.ins[0]
  return v.leaf if v.kind == "param" else None


def _vector_source(v: _Value):
  """A params leaf broadcast along other axes (a bias or norm vector), else None."""
  return _param_source(v, _CASTS + ("broadcast_in_dim",))


class _Tracer:
  """Follows one traced program; `layer` builds each recorded activation's Layer."""

  def __init__(
    self, program: _Program, paths: list[str], shapes: list[tuple], records: dict, outputs: list[_Value]
  ):
    self.program = program
    self.paths = paths
    self.shapes = shapes
    self.records = records  # name -> _Value
    self.outputs = {id(v) for v in outputs}
    self.producer_order: dict[str, int] = {}

  # --- producer -----------------------------------------------------------

  def _backward(self, name, h):
    """Equations between ``h`` and the contractions feeding it, and those contractions."""
    seen, chain, stops, leaves = set(), {}, {}, []
    stack = [h]
    while stack:
      v = stack.pop()
      if id(v) in seen:
        continue
      seen.add(id(v))
      e = v.producer
      if e is None:
        leaves.append(v)
        continue
      if e.prim in _CONTRACTIONS:
        stops[e.order] = e
        continue
      if e.prim in _OPAQUE:
        raise ValueError(
          f"trace_graph: layer '{name}': its units come out of `{e.prim}` at {e.where}; units "
          "cannot be followed through loops or conditionals (record activations outside them)"
        )
      chain[e.order] = e
      stack.extend(e.ins)
    return list(chain.values()), [stops[k] for k in sorted(stops)], leaves

  def _producer(self, name, h):
    chain, stops, leaves = self._backward(name, h)
    kernels = [(e, self._kernel_operand(e)) for e in stops]
    if not stops:
      raise ValueError(
        f"trace_graph: layer '{name}' is not produced by a kernel: no dot_general or "
        "convolution of a parameter feeds the recorded activation"
      )
    if len(stops) > 1:
      what = ", ".join(self._describe_contraction(e, k) for e, k in kernels)
      raise ValueError(
        f"trace_graph: layer '{name}': its units are made by more than one product ({what}), "
        "e.g. a residual connection adds a skip path into them or a gate multiplies two "
        "projections. Such units cannot be reset by redrawing one kernel's columns; record "
        "(and declare) units with a single producing kernel, e.g. the hidden units of each "
        "block's MLP, not the residual stream"
      )
    e, kernel_pos = kernels[0]
    if kernel_pos is None:
      raise ValueError(
        f"trace_graph: layer '{name}': its units come from `{e.prim}` at {e.where}, which "
        "multiplies two activations (attention-like), not an activation and a parameter kernel"
      )
    return e, kernel_pos, chain, leaves

  def _kernel_operand(self, e):
    """Which operand of a contraction is a params leaf (the kernel), or None."""
    for pos in (1, 0):
      if _param_source(e.ins[pos]) is not None:
        return pos
    return None

  def _describe_contraction(self, e, pos):
    if pos is None:
      return f"`{e.prim}` of two activations at {e.where}"
    return f"kernel '{self.paths[_param_source(e.ins[pos])]}' at {e.where}"

  def _check_producer_geometry(self, name, e, kernel_pos):
    """Checks the kernel makes units on the output's last axis; returns (leaf, width)."""
    kernel = e.ins[kernel_pos]
    leaf = _param_source(kernel)
    path, pshape = self.paths[leaf], self.shapes[leaf]
    out = e.outs[0]
    ok = kernel_pos == 1 and len(pshape) >= 2 and out.shape and out.shape[-1] == pshape[-1]
    if ok and e.prim == "dot_general":
      (lc, rc), (lb, rb) = e.params["dimension_numbers"]
      free = [d for d in range(len(kernel.shape)) if d not in rc]
      ok = not rb and free == [len(kernel.shape) - 1] and kernel.shape[-1] == pshape[-1]
    elif ok:
      dn = e.params["dimension_numbers"]
      ok = (
        dn.rhs_spec[0] == len(kernel.shape) - 1
        and dn.out_spec[1] == len(out.shape) - 1
        and e.params.get("feature_group_count", 1) == 1
      )
    if not ok:
      raise ValueError(
        f"trace_graph: layer '{name}': kernel '{path}' (shape {pshape}) in `{e.prim}` at "
        f"{e.where} does not make the units on its last axis and the output's last axis "
        "(expected a Dense/Conv kernel (..., in, units) applied as x @ kernel)"
      )
    return leaf, pshape[-1]

  def layer(self, name: str, activation: str | None) -> Layer:
    h = self.records[name]
    e, kernel_pos, chain, leaves = self._producer(name, h)
    kernel, width = self._check_producer_geometry(name, e, kernel_pos)
    self.producer_order[name] = e.order
    if not h.shape or h.shape[-1] != width:
      raise ValueError(
        f"trace_graph: layer '{name}': the recorded activation has shape {h.shape}, but kernel "
        f"'{self.paths[kernel]}' makes {width} units; record the units on the last axis"
      )
    z = e.outs[0]
    chain = self._chain(name, z, h, chain, width)
    bias, norm = self._vectors(name, z, chain, leaves, width)
    self._check_side_reads(name, chain, h, width)
    consumers = self._consumers(name, h, width)
    return Layer(
      name=name,
      kernel=self.paths[kernel],
      bias=bias,
      consumers=tuple(consumers),
      norm=norm,
      activation=activation or self._activation(name, chain, width),
    )

  def _chain(self, name, z, h, backward_chain, width):
    """The equations on paths from the kernel's output ``z`` to ``h``, in program order."""
    reach = {id(z)}
    chain = []
    for eqn in sorted(backward_chain, key=lambda q: q.order):
      if any(id(x) in reach for x in eqn.ins):
        chain.append(eqn)
        reach.update(id(o) for o in eqn.outs)
    for eqn in chain:
      moved = False
      if eqn.prim == "transpose":
        moved = eqn.params["permutation"][-1] != len(eqn.ins[0].shape) - 1
      elif eqn.prim in ("reshape", "broadcast_in_dim", "squeeze"):
        src, dst = eqn.ins[0].shape, eqn.outs[0].shape
        moved = bool(src) and src[-1] == width and (not dst or dst[-1] != width)
      if moved:
        raise ValueError(
          f"trace_graph: layer '{name}': `{eqn.prim}` at {eqn.where} moves the units off the "
          "last axis between the kernel and the recorded activation"
        )
    return chain

  def _vectors(self, name, z, chain, leaves, width):
    """The producer's bias and norm from the per-unit parameters met on the way."""
    vectors = {}
    for v in leaves:
      if v.kind == "param":
        if self.shapes[v.leaf] != (width,):
          raise ValueError(
            f"trace_graph: layer '{name}': parameter '{self.paths[v.leaf]}' (shape "
            f"{self.shapes[v.leaf]}) enters the units between the kernel and the activation; "
            f"only per-unit vectors of shape ({width},) (bias, norm scale/offset) may"
          )
        vectors[v.leaf] = self.paths[v.leaf]
      elif v.kind == "data" and math.prod(v.shape) not in (1, width):
        raise ValueError(
          f"trace_graph: layer '{name}': an input of shape {v.shape} is added into its units "
          "besides the kernel's product (a skip connection from the input?)"
        )
    bias = None
    product = {id(z)}  # The kernel's output, also reshaped or cast (im2col reshapes it).
    for eqn in chain:  # The bias is added to the product itself.
      if eqn.prim in ("reshape", "convert_element_type") and id(eqn.ins[0]) in product:
        product.add(id(eqn.outs[0]))
      elif eqn.prim == "add" and any(id(x) in product for x in eqn.ins):
        other = eqn.ins[1] if id(eqn.ins[0]) in product else eqn.ins[0]
        leaf = _vector_source(other)
        if leaf is not None and leaf in vectors:
          bias = vectors.pop(leaf)
        break
    norm = None
    if vectors:
      prefixes = {p.rsplit("/", 1)[0] if "/" in p else "" for p in vectors.values()}
      names = {p.rsplit("/", 1)[-1] for p in vectors.values()}
      if len(prefixes) != 1 or not names <= {"scale", "bias"} or "" in prefixes:
        raise ValueError(
          f"trace_graph: layer '{name}': per-unit parameters {sorted(vectors.values())} act on "
          "its units besides the kernel's bias; only one norm module's 'scale' and 'bias' are "
          "understood (flax LayerNorm/BatchNorm/RMSNorm)"
        )
      norm = prefixes.pop()
    return bias, norm

  def _check_side_reads(self, name, chain, h, width):
    """Pre-activation values may be read only by the chain itself or per-unit statistics."""
    in_chain = {id(e) for e in chain}
    for eqn in chain:
      for v in eqn.outs:
        if v is h:
          continue
        for user in v.users:
          if id(user) in in_chain or not any(id(o) in self.program.live for o in user.outs):
            continue
          if not self._only_statistics(user, width):
            raise ValueError(
              f"trace_graph: layer '{name}': its pre-activation is also read by `{user.prim}` at "
              f"{user.where}, outside the path to the recorded activation (a skip connection "
              "taken before the activation?); the units cannot be removed by zeroing their "
              "outgoing weights"
            )

  def _only_statistics(self, eqn, width):
    """True when everything downstream of ``eqn`` is per-unit vectors (BatchNorm stats)."""
    stack, seen = [eqn], set()
    while stack:
      e = stack.pop()
      if id(e) in seen:
        continue
      seen.add(id(e))
      if e.prim in _CONTRACTIONS:
        return False
      for v in e.outs:
        if math.prod(v.shape) > width:
          return False
        stack.extend(v.users)
    return True

  def _activation(self, name, chain, width):
    for eqn in reversed(chain):
      for n in eqn.names:
        if n in _ACTIVATION_NAMES:
          return _ACTIVATION_NAMES[n]
    prims = {e.prim for e in chain}
    if prims & {"erf", "erfc"} or (
      "tanh" in prims and any(e.prim == "integer_pow" and e.params.get("y") == 3 for e in chain)
    ):
      return "gelu"
    if "tanh" in prims:
      return "tanh"
    if "logistic" in prims:
      inputs = {id(x) for e in chain if e.prim == "logistic" for x in e.ins}
      gated = any(e.prim == "mul" and any(id(x) in inputs for x in e.ins) for e in chain)
      return "silu" if gated else "sigmoid"
    # max(z, 0) on the units themselves (a norm's max(var, 0) acts on a reduced value).
    if any(
      e.prim == "max"
      and e.outs[0].shape[-1:] == (width,)
      and any(x.kind == "literal" and float(np.max(x.literal)) == 0.0 for x in e.ins)
      for e in chain
    ):
      return "relu"
    unknown = sorted(prims - _NOT_ACTIVATIONS)
    if unknown:
      raise ValueError(
        f"trace_graph: layer '{name}': cannot identify its activation function (saw "
        f"{unknown}); pass activation={{'{name}': ...}} with one of {initializers.ACTIVATIONS}"
      )
    return "identity"

  # --- consumers ----------------------------------------------------------

  def _consumers(self, name, h, width):
    found: dict[int, Consumer] = {}
    tracked = {id(h): _Unit(len(h.shape) - 1, 1, 1)}
    stack = [h]
    while stack:
      v = stack.pop()
      unit = tracked[id(v)]
      if id(v) in self.outputs:
        raise ValueError(
          f"trace_graph: layer '{name}': its units reach the function's output directly, not "
          "through a consumer kernel (is it the output layer? only hidden layers can be reset)"
        )
      for e in v.users:
        if not any(id(o) in self.program.live for o in e.outs):
          continue
        if e.prim in _CONTRACTIONS:
          consumer = self._consumer(name, e, v, unit, width)
          found.setdefault(e.order, consumer)
          continue
        out_unit = self._follow(name, e, v, unit, width, tracked)
        for o in e.outs:
          prev = tracked.get(id(o))
          if prev is None:
            tracked[id(o)] = out_unit
            stack.append(o)
          elif prev != out_unit:
            raise ValueError(
              f"trace_graph: layer '{name}': `{e.prim}` at {e.where} combines its units in "
              "two different arrangements"
            )
    if not found:
      raise ValueError(
        f"trace_graph: layer '{name}': no kernel reads its units, so it has no outgoing "
        "weights to zero (the output layer is not a hidden layer)"
      )
    consumers, seen = [], set()
    for _, c in sorted(found.items()):
      if (c.kernel, c.layout) not in seen:
        seen.add((c.kernel, c.layout))
        consumers.append(c)
    return consumers

  def _refuse_read(self, name, e, why):
    return ValueError(
      f"trace_graph: layer '{name}': its units are read by `{e.prim}` at {e.where} ({why}); "
      "zeroing their outgoing weights would not remove them. Record units that only "
      "Dense/Conv kernels read (through reshape, pooling, dropout)"
    )

  def _follow(self, name, e, v, unit, width, tracked) -> _Unit:
    """Where the units sit in ``e``'s output, or a refusal."""
    a, outer, inner = unit
    if e.prim in _ELEMENTWISE:
      for x in e.ins:
        if x is v or id(x) in tracked and tracked[id(x)] == unit:
          continue
        if not x.param_dep and not x.data_dep:  # Constants, dropout masks from keys.
          continue
        raise self._refuse_read(
          name,
          e,
          "together with values made from other parameters or inputs: a residual "
          "or skip connection, or a gate",
        )
      if e.outs[0].shape != v.shape:
        raise self._refuse_read(name, e, "broadcasting the units' values")
      return unit
    if e.prim in _OPAQUE:
      raise self._refuse_read(name, e, "loops and conditionals cannot be followed")
    if e.prim == "transpose":
      return _Unit(list(e.params["permutation"]).index(a), outer, inner)
    if e.prim == "broadcast_in_dim":
      new_a = e.params["broadcast_dimensions"][a]
      if e.outs[0].shape[new_a] != v.shape[a]:
        raise self._refuse_read(name, e, "broadcasting the units' axis")
      return _Unit(new_a, outer, inner)
    if e.prim == "squeeze":
      dims = [d % len(v.shape) for d in e.params["dimensions"]]
      return _Unit(a - sum(d < a for d in dims), outer, inner)
    if e.prim in _REDUCTIONS or e.prim == "reduce_and" or e.prim == "reduce_or":
      axes = tuple(e.params["axes"])
      if a in axes:
        raise self._refuse_read(name, e, "a reduction over the units mixes them")
      return _Unit(a - sum(d < a for d in axes), outer, inner)
    if e.prim.startswith("reduce_window"):
      dims = e.params["window_dimensions"]
      strides = e.params["window_strides"]
      pads = e.params["padding"]
      if dims[a] != 1 or strides[a] != 1 or tuple(pads[a]) != (0, 0):
        raise self._refuse_read(name, e, "a pooling window over the units' axis")
      return unit
    if e.prim == "pad":
      if tuple(e.params["padding_config"][a]) != (0, 0, 0):
        raise self._refuse_read(name, e, "padding along the units' axis")
      return unit
    if e.prim == "slice":
      start, limit = e.params["start_indices"][a], e.params["limit_indices"][a]
      strides = e.params["strides"]
      if start != 0 or limit != v.shape[a] or (strides and strides[a] != 1):
        raise self._refuse_read(name, e, "a slice of the units")
      return unit
    if e.prim == "reshape":
      return self._reshape(name, e, v.shape, e.outs[0].shape, unit, width)
    if e.prim == "concatenate":
      return self._concatenate(name, e, unit, tracked)
    raise self._refuse_read(name, e, "an operation that trace_graph cannot follow")

  def _reshape(self, name, e, src, dst, unit, width) -> _Unit:
    a, outer, inner = unit
    stride = inner * math.prod(src[a + 1 :])  # Flat-index distance between units i and i + 1.
    for b in range(len(dst) - 1, -1, -1):
      below = math.prod(dst[b + 1 :])
      if below <= stride < below * dst[b]:
        if stride % below == 0 and dst[b] % (stride // below * width) == 0:
          new_inner = stride // below
          return _Unit(b, dst[b] // (new_inner * width), new_inner)
        break
    raise self._refuse_read(name, e, f"a reshape {src} -> {dst} that splits the units' axis")

  def _concatenate(self, name, e, unit, tracked) -> _Unit:
    a, outer, inner = unit
    dim = e.params["dimension"]
    units = [tracked.get(id(x)) for x in e.ins]
    if any(u is None for u in units):
      raise self._refuse_read(name, e, "a concatenation with other features")
    if dim != a:
      if any(u != unit for u in units):
        raise self._refuse_read(name, e, "a concatenation of differently arranged units")
      return unit
    if any(u.axis != a or u.inner != 1 for u in units):
      raise self._refuse_read(name, e, "a concatenation that interleaves the units")
    return _Unit(a, sum(u.outer for u in units), 1)  # im2col's patches: channels last.

  def _consumer(self, name, e, v, unit, width) -> Consumer:
    pos = self._kernel_operand(e)
    if pos is None or e.ins[pos] is v:
      raise self._refuse_read(name, e, "a product with another activation (attention-like)")
    leaf = _param_source(e.ins[pos])
    path, kshape = self.paths[leaf], self.shapes[leaf]
    a, outer, inner = unit
    if e.prim == "dot_general":
      (lc, rc), (lb, rb) = e.params["dimension_numbers"]
      data_contract = lc if pos == 1 else rc
      if pos != 1 or lb or rb or list(data_contract) != [a] or list(rc) != [len(e.ins[1].shape) - 2]:
        raise self._refuse_read(
          name, e, f"kernel '{path}' applied other than as x @ kernel over the units' axis"
        )
    else:
      dn = e.params["dimension_numbers"]
      if (
        pos != 1
        or dn.lhs_spec[1] != a
        or (outer, inner) != (1, 1)
        or e.params.get("feature_group_count", 1) != 1
        or dn.rhs_spec[1] != len(kshape) - 2
      ):
        raise self._refuse_read(
          name, e, f"convolution with kernel '{path}' over other than the units' channels"
        )
    positions = outer * inner
    if len(kshape) >= 2 and kshape[-2] == width * positions:
      layout = "channels_first" if inner > 1 else "channels_last"
      if outer > 1 and inner > 1:
        raise self._refuse_read(name, e, "a flatten that interleaves the units with two other axes")
    elif len(kshape) >= 3 and kshape[-2] == width and math.prod(kshape[:-2]) == positions and inner == 1:
      layout = "channels_last"  # A conv kernel applied as patches @ kernel (im2col).
    else:
      raise self._refuse_read(
        name,
        e,
        f"kernel '{path}' of shape {kshape} does not read {width} units x "
        f"{positions} positions on its axis -2",
      )
    bias = self._consumer_bias(e.outs[0], kshape[-1])
    return Consumer(kernel=path, bias=bias, layout=layout)

  def _consumer_bias(self, y, out_width):
    # A bias is added to the product directly (flax's Dense/Conv; im2col reshapes first).
    while len(y.users) == 1 and y.users[0].prim in ("reshape", "convert_element_type"):
      y = y.users[0].outs[0]
    for e in y.users:
      if e.prim == "add":
        other = e.ins[1] if e.ins[0] is y else e.ins[0]
        leaf = _vector_source(other)
        if leaf is not None and self.shapes[leaf] == (out_width,):
          return self.paths[leaf]
    return None


def trace_graph(
  fn: Callable[..., tuple[Any, Mapping[str, jax.Array]]],
  params: Any,
  *args: Any,
  activation: str | Mapping[str, str] | None = None,
  **kwargs: Any,
) -> LayerGraph:
  """The layer graph of ``fn``'s recorded activations, traced from the computation.

  ``fn(params, *args, **kwargs)`` returns ``(output, activations)``, with
  ``activations`` mapping each hidden layer's name to its post-activation
  output (units on the last axis): exactly what a loss function built on
  `cbp_jax.apply_with_activations` (linen) or `cbp_jax.capture_activations`
  (nnx) gets. ``fn`` is traced once with `jax.make_jaxpr`; nothing runs on
  data. Array leaves of ``args``/``kwargs`` are traced, other values are
  passed as they are (``train=True`` and the like).

  For each recorded activation the producing kernel (and its bias and
  per-unit norm parameters), the activation function (for the
  reinitialisation gain) and every consumer kernel (and bias, flatten
  layout) are read off the dataflow. Units that anything else reads (a
  residual add, attention, a concatenation with other features, the output)
  are refused with an error naming the layer, the operation and its source
  line.

  Args:
    fn: the forward function, ``fn(params, *args, **kwargs) -> (output,
      activations)``.
    params: the parameter pytree that the optimizer sees (linen
      ``variables["params"]``, ``nnx.state(model, nnx.Param)``, ...). Only
      shapes and dtypes are read: `jax.ShapeDtypeStruct` leaves (e.g. from
      ``jax.eval_shape(model.init, key, x)``) do, without initialising.
    *args: example inputs (shapes matter, values do not; arrays or
      `jax.ShapeDtypeStruct`).
    activation: overrides the identified activation, for every layer (a
      name) or per layer (``{layer: name}``); names as in
      `cbp_jax.initializers.ACTIVATIONS`.
    **kwargs: keyword inputs of ``fn``.

  Returns:
    A `cbp_jax.LayerGraph`, layers in forward order, named by the keys of
    ``activations``.

  Raises:
    ValueError: for a unit layer that cannot be reset (see above), naming it.

  Example:
    >>> model = cbp_jax.models.MLP(hidden=(8, 8), outputs=2)
    >>> x = jnp.ones((1, 4))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> fn = lambda p, x: cbp_jax.apply_with_activations(model, p, x)
    >>> graph = cbp_jax.trace_graph(fn, params, x)
    >>> [(layer.name, layer.consumers[0].kernel) for layer in graph]
    [('Dense_0', 'Dense_1/kernel'), ('Dense_1', 'Dense_2/kernel')]
  """
  if isinstance(params, Mapping) and "params" in params and len(params) <= 3:
    raise ValueError(
      "trace_graph got a variables dict with a 'params' collection; pass variables['params'] "
      "and close over the other collections in fn"
    )
  index, param_leaves, param_def = tree_paths.flatten_by_path(params)
  paths = [None] * len(param_leaves)
  for path, i in index.items():
    paths[i] = path
  arg_arrays, rebuild = _split_static((args, kwargs))

  def traced(p_leaves, a_leaves):
    a, k = rebuild(a_leaves)
    result = fn(jax.tree.unflatten(param_def, p_leaves), *a, **k)
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], Mapping)):
      raise ValueError(
        "trace_graph: fn must return (output, activations) with activations a dict "
        f"{{layer: h}}, got {type(result).__name__}"
      )
    return result

  closed, out_shape = jax.make_jaxpr(traced, return_shape=True)(list(param_leaves), arg_arrays)
  inputs = [_Value(v.aval, "param", leaf=i) for i, v in enumerate(closed.jaxpr.invars[: len(param_leaves)])]
  inputs += [
    _Value(v.aval, "key" if _is_key(v.aval.dtype) else "data")
    for v in closed.jaxpr.invars[len(param_leaves) :]
  ]
  program = _Program(closed, inputs)

  output_shape, acts_shape = out_shape
  n_output = len(jax.tree.leaves(output_shape))
  act_items = jax.tree_util.tree_flatten_with_path(acts_shape)[0]
  act_values = program.outs[n_output:]
  if len(act_items) != len(act_values):
    raise ValueError("trace_graph: activations must be a flat dict {layer: array}")
  records = {}
  for (path, _), value in zip(act_items, act_values):
    records[tree_paths.path_to_str(path)] = value
  if not records:
    raise ValueError("trace_graph: fn recorded no activations (see cbp_jax.sow_activation)")
  if isinstance(activation, Mapping):
    unknown = sorted(set(activation) - set(records))
    if unknown:
      raise ValueError(
        f"trace_graph: activation names layers {unknown} that fn does not record "
        f"(it records {sorted(records)})"
      )
  tracer = _Tracer(
    program, paths, [tuple(getattr(x, "shape", ())) for x in param_leaves], records, program.outs[:n_output]
  )
  layers = []
  for name in records:
    override = activation.get(name) if isinstance(activation, Mapping) else activation
    layers.append(tracer.layer(name, override))
  producers = {}
  for layer in layers:
    if layer.kernel in producers:
      raise ValueError(
        f"trace_graph: layers '{producers[layer.kernel]}' and '{layer.name}' are both made by "
        f"kernel '{layer.kernel}': record each layer's units once"
      )
    producers[layer.kernel] = layer.name
  layers.sort(key=lambda layer: tracer.producer_order[layer.name])
  return LayerGraph(tuple(layers))
