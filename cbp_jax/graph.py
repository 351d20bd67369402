"""Which parameters make and read each hidden unit.

A *hidden layer* is a set of units. Unit ``i`` of a layer is produced by slice
``i`` of the last axis of a kernel (Dense ``(in, n)`` or Conv ``(kh, kw, c, n)``)
and its bias, optionally passed through a normalisation layer whose per-unit
scale and offset belong to the unit too. It is read by one or more *consumers*:
kernels whose axis ``-2`` indexes their inputs (Dense ``(n * P, out)``, Conv
``(kh, kw, n, out)``). A consumer behind a flatten sees every unit at ``P``
spatial positions; ``layout`` says how flatten interleaved them.

`LayerGraph` is the explicit, declarative form; `cbp_jax.trace_graph` reads it
from the computation (any architecture); `graph_from_params` infers it from
parameter names for plain sequential stacks of Dense/Conv layers.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx

from cbp_jax import initializers, tree_paths

# `resolve` and the Resolved* records are the library's own plumbing (the transforms'
# view of a graph in one parameter tree), not part of the API.
__all__ = [
  "Consumer",
  "graph_from_params",
  "LAYOUTS",
  "Layer",
  "LayerGraph",
]


LAYOUTS = ("channels_last", "channels_first")


@dataclasses.dataclass(frozen=True)
class Consumer:
  """A kernel that reads a hidden layer's units on its axis ``-2``.

  Attributes:
    kernel: path of the consumer's kernel, e.g. ``"Dense_1/kernel"``.
    bias: path of the consumer's bias (absorbs the contribution of a removed
      unit, see step 7 of the Semantics page), or None.
    layout: how a flatten between the layer and this consumer ordered its
      inputs when the kernel's axis ``-2`` has ``n * P`` entries:
      ``"channels_last"`` (NHWC flattened, input ``p * n + i``, flax's default)
      or ``"channels_first"`` (input ``i * P + p``).
  """

  kernel: str
  bias: str | None = None
  layout: str = "channels_last"

  def __post_init__(self):
    if self.layout not in LAYOUTS:
      raise ValueError(f"Consumer '{self.kernel}': layout must be one of {LAYOUTS}, got {self.layout!r}")


@dataclasses.dataclass(frozen=True)
class Layer:
  """One hidden layer: the parameters that make its units and their readers.

  Attributes:
    name: the layer's name, also the key of its activation in the
      ``activations`` dict (by default the producing module's path).
    kernel: path of the producing kernel; units are its last axis.
    bias: path of the producing bias, or None.
    consumers: the kernels that read the units (at least one).
    norm: path of a normalisation module between producer and activation
      (LayerNorm/BatchNorm) whose ``scale``/``bias`` parameters and ``mean``/
      ``var`` batch statistics are per unit, or None.
    activation: the hidden activation, used for the initialisation gain.
  """

  name: str
  kernel: str
  bias: str | None
  consumers: tuple[Consumer, ...]
  norm: str | None = None
  activation: str = "relu"

  def __post_init__(self):
    object.__setattr__(self, "consumers", tuple(self.consumers))
    if not self.consumers:
      raise ValueError(f"Layer '{self.name}': needs at least one consumer")
    if not all(isinstance(c, Consumer) for c in self.consumers):
      raise ValueError(f"Layer '{self.name}': consumers must be Consumer objects, got {self.consumers!r}")
    initializers.gain(self.activation)  # Fails early on an unknown name.

  @property
  def norm_scale(self) -> str | None:
    return None if self.norm is None else f"{self.norm}/scale"

  @property
  def norm_offset(self) -> str | None:
    return None if self.norm is None else f"{self.norm}/bias"


@dataclasses.dataclass(frozen=True)
class LayerGraph:
  """The hidden layers that CBP (or ReDo) maintains, in forward order."""

  layers: tuple[Layer, ...]

  def __post_init__(self):
    object.__setattr__(self, "layers", tuple(self.layers))
    if not self.layers:
      raise ValueError("LayerGraph needs at least one hidden layer")
    names = [layer.name for layer in self.layers]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
      raise ValueError(f"LayerGraph: duplicate layer names {duplicates}")

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(layer.name for layer in self.layers)

  def __iter__(self):
    return iter(self.layers)

  def __len__(self):
    return len(self.layers)


@dataclasses.dataclass(frozen=True)
class ResolvedConsumer:
  """A consumer with its leaf indices and geometry in one parameter tree."""

  kernel: int
  bias: int | None
  positions: int  # P: how many inputs of the kernel read each unit.
  layout: str


@dataclasses.dataclass(frozen=True)
class ResolvedLayer:
  """A layer with leaf indices into a flattened parameter tree."""

  layer: Layer
  width: int
  kernel: int
  bias: int | None
  norm_scale: int | None
  norm_offset: int | None
  consumers: tuple[ResolvedConsumer, ...]
  fan_in: int
  fan_out: int

  @property
  def name(self) -> str:
    """The layer's name: the key of its activations and of its state entries."""
    return self.layer.name


def _shape(leaf: Any) -> tuple[int, ...]:
  return tuple(getattr(leaf, "shape", ()))


def resolve(graph: LayerGraph, params: Any) -> tuple[tuple[ResolvedLayer, ...], list[Any], Any]:
  """Checks ``graph`` against ``params`` and returns leaf indices per layer.

  Shapes are static under `jax.jit`, so this runs at trace time and every
  mismatch is reported before any computation.

  Args:
    graph: the layer graph.
    params: the parameter pytree (linen dict, nnx State, ...).

  Returns:
    ``(layers, leaves, treedef)``: the resolved layers and the flattened tree.

  Raises:
    ValueError: naming the layer and parameter whose path or shape is wrong.
  """
  if not isinstance(graph, LayerGraph):
    raise ValueError(f"expected a cbp_jax.LayerGraph, got {type(graph).__name__}")
  index, leaves, treedef = tree_paths.flatten_by_path(params)
  resolved = []
  for layer in graph:
    what = f"layer '{layer.name}'"
    k = tree_paths.lookup(index, layer.kernel, what)
    kshape = _shape(leaves[k])
    if len(kshape) < 2 or kshape[-1] == 0:
      raise ValueError(
        f"{what}: kernel '{layer.kernel}' must have at least 2 axes and "
        f"units on its last axis, got shape {kshape}"
      )
    width = kshape[-1]
    if math.prod(kshape[:-1]) == 0:
      raise ValueError(f"{what}: kernel '{layer.kernel}' has no inputs, got shape {kshape}")

    def vector(path, role):
      if path is None:
        return None
      i = tree_paths.lookup(index, path, what)
      if _shape(leaves[i]) != (width,):
        raise ValueError(
          f"{what}: {role} '{path}' must have shape ({width},) to match the "
          f"kernel's {width} units, got {_shape(leaves[i])}"
        )
      return i

    bias = vector(layer.bias, "bias")
    scale = offset = None
    if layer.norm is not None:
      has_scale = layer.norm_scale in index
      has_offset = layer.norm_offset in index
      if not (has_scale or has_offset):
        raise ValueError(f"{what}: norm '{layer.norm}' has neither 'scale' nor 'bias' parameters in the tree")
      scale = vector(layer.norm_scale, "norm scale") if has_scale else None
      offset = vector(layer.norm_offset, "norm offset") if has_offset else None

    consumers = []
    for c in layer.consumers:
      ck = tree_paths.lookup(index, c.kernel, what)
      cshape = _shape(leaves[ck])
      if len(cshape) < 2 or cshape[-2] % width or 0 in cshape:
        raise ValueError(
          f"{what}: consumer kernel '{c.kernel}' must read the {width} units "
          f"on axis -2 (a multiple of {width} inputs), got shape {cshape}"
        )
      cb = None
      if c.bias is not None:
        cb = tree_paths.lookup(index, c.bias, what)
        if _shape(leaves[cb]) != (cshape[-1],):
          raise ValueError(
            f"{what}: consumer bias '{c.bias}' must have shape "
            f"({cshape[-1]},) to match '{c.kernel}', got {_shape(leaves[cb])}"
          )
      consumers.append(ResolvedConsumer(ck, cb, cshape[-2] // width, c.layout))

    receptive = math.prod(kshape[:-2])
    resolved.append(
      ResolvedLayer(
        layer=layer,
        width=width,
        kernel=k,
        bias=bias,
        norm_scale=scale,
        norm_offset=offset,
        consumers=tuple(consumers),
        fan_in=math.prod(kshape[:-1]),
        fan_out=width * receptive,
      )
    )
  return tuple(resolved), leaves, treedef


# --- Inference for sequential stacks -------------------------------------


def _modules(tree: Any, prefix: tuple[str, ...] = ()) -> Iterable[tuple[tuple[str, ...], Mapping]]:
  """Yields (path, module) for every mapping that holds array leaves, in order.

  Mappings are walked in their own iteration order (linen: creation order),
  not jax's sorted order, so ``Dense_10`` comes after ``Dense_9``.
  """
  if isinstance(tree, Mapping):
    items = list(tree.items())
  elif isinstance(tree, Sequence) and not isinstance(tree, str):
    items = list(enumerate(tree))
  else:
    return
  if any(hasattr(v, "shape") for _, v in items):
    yield prefix, tree
    return
  for key, value in items:
    yield from _modules(value, prefix + (tree_paths.key_to_str(key),))


_AUTONAME = re.compile(r"^([A-Za-z][A-Za-z0-9]*)_(\d+)$")
_TRACE_HINT = (
  "Trace the graph from the computation instead: "
  "cbp_jax.trace_graph(fn, params, x) with fn(params, x) -> (output, activations)"
)


def _check_only_params(params: Any) -> None:
  """Refuses an nnx state that holds more than parameters (e.g. BatchStat)."""
  variables = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  others = sorted(
    {type(v).__name__ for v in variables if isinstance(v, nnx.Variable) and not isinstance(v, nnx.Param)}
  )
  if others:
    raise ValueError(
      f"graph_from_params got an nnx state holding {others} besides parameters; pass "
      "nnx.state(model, nnx.Param)"
    )


def _in_call_order(params: Any, modules: list) -> list:
  """The sibling modules in the order the model calls them, or a ValueError.

  The order is read from names that carry it: list indices (``layers/0``,
  ``layers/1``: ordered numerically) or linen's automatic names
  ``{Type}_{i}`` in the dict's own order, with each type's indices
  increasing. Custom names carry no order (nnx states, restored checkpoints
  and ``jax.tree.map`` return dicts with sorted keys), so they are refused.
  """
  names = [path[-1] if path else "" for path, _ in modules]
  if all(n.isdigit() for n in names):
    return sorted(modules, key=lambda m: int(m[0][-1]))
  if isinstance(params, nnx.State):
    raise ValueError(
      "graph_from_params: nnx.state sorts attribute names, so the call order of "
      f"{names} cannot be read from it. {_TRACE_HINT}"
    )
  parsed = [_AUTONAME.match(n) for n in names]
  custom = [n for n, m in zip(names, parsed) if m is None]
  if custom:
    raise ValueError(
      f"graph_from_params: module names {custom} do not show the call order (dicts may come "
      f"back with sorted keys). {_TRACE_HINT}"
    )
  last: dict[str, tuple[int, str]] = {}
  for name, m in zip(names, parsed):
    kind, i = m.group(1), int(m.group(2))
    if kind in last and last[kind][0] >= i:
      raise ValueError(
        f"graph_from_params: '{name}' comes after '{last[kind][1]}' in the parameter dict, so "
        f"its keys were reordered (sorted as strings?) and the call order cannot be read. "
        f"{_TRACE_HINT}"
      )
    last[kind] = (i, name)
  return modules


def graph_from_params(params: Any, *, activation: str = "relu") -> LayerGraph:
  """Infers the layer graph of a plain sequential stack from its parameters.

  Prefer `cbp_jax.trace_graph`, which reads the graph from the computation.
  Parameters alone cannot show a skip connection (``x + f(x)`` has the same
  parameters as ``f(x)``), so this function *assumes* a plain stack: use it
  only for models without residual connections. It refuses wherever the
  parameter dict cannot show the call order: custom module names, nnx states
  (their attribute names come sorted; list-indexed ``nnx.List`` layers are
  fine), keys reordered as strings (``Dense_10`` before ``Dense_2``), a norm
  after the last weight layer.

  Recognises sibling modules, in order, each either a weight layer (a
  ``kernel`` of 2+ axes and optional ``bias``: Dense or Conv) or a norm layer
  (only 1-D ``scale``/``bias``: LayerNorm, BatchNorm). Every weight layer but
  the last is a hidden layer read by the next weight layer; a norm right after
  a weight layer belongs to its units. A flatten between a conv and a dense
  layer is recognised from the shapes (the dense kernel reads ``P`` positions
  per channel, flax's channels-last order).

  Args:
    params: a parameter pytree (e.g. ``variables["params"]`` of a linen model
      or ``nnx.state(model, nnx.Param)``).
    activation: hidden activation of every layer (initialisation gain).

  Returns:
    A `LayerGraph` whose layer names are the producing modules' paths.

  Raises:
    ValueError: for anything that is not such a stack (residual blocks,
      modules at different depths, mismatched shapes) or whose order the
      names cannot show, naming the module. Use `cbp_jax.trace_graph` (or
      declare a `LayerGraph`) for those.

  Example:
    >>> params = cbp_jax.models.MLP(hidden=(8, 8), outputs=2).init(
    ...     jax.random.key(0), jnp.ones((1, 4)))["params"]
    >>> cbp_jax.graph_from_params(params).names
    ('Dense_0', 'Dense_1')
  """
  if isinstance(params, Mapping) and "params" in params and len(params) <= 3:
    raise ValueError(
      "graph_from_params got a variables dict with a 'params' collection; pass variables['params']"
    )
  _check_only_params(params)
  modules = list(_modules(params))
  if not modules:
    raise ValueError("graph_from_params: the tree holds no parameter modules")
  parents = {path[:-1] for path, _ in modules}
  if len(parents) > 1:
    names = ", ".join("/".join(p) for p, _ in modules)
    raise ValueError(
      "graph_from_params infers only sequential stacks of sibling layers; "
      f"these modules sit at different places: {names}. Declare a "
      "cbp_jax.LayerGraph explicitly (e.g. for residual blocks)"
    )

  modules = _in_call_order(params, modules)
  entries = []  # (kind, name, module)
  for path, module in modules:
    name = "/".join(path)
    keys = set(module)
    if "kernel" in keys and len(_shape(module["kernel"])) >= 2 and keys <= {"kernel", "bias"}:
      entries.append(("weight", name, module))
    elif keys and keys <= {"scale", "bias"} and all(len(_shape(module[k])) == 1 for k in keys):
      entries.append(("norm", name, module))
    else:
      shapes = {k: _shape(v) for k, v in module.items()}
      raise ValueError(
        f"graph_from_params cannot classify module '{name}' with parameters "
        f"{shapes}: expected a Dense/Conv kernel (+bias) or a norm's "
        "scale/bias. Declare a cbp_jax.LayerGraph explicitly"
      )

  weights = [i for i, e in enumerate(entries) if e[0] == "weight"]
  if len(weights) < 2:
    raise ValueError(
      "graph_from_params needs at least two weight layers (a hidden layer "
      f"and its consumer), found {len(weights)}"
    )
  if weights[0] != 0:
    raise ValueError(f"graph_from_params: module '{entries[0][1]}' comes before the first weight layer")

  if weights[-1] != len(entries) - 1:
    raise ValueError(
      f"graph_from_params: norm '{entries[-1][1]}' comes after the last weight layer "
      f"'{entries[weights[-1]][1]}', so the call order cannot be read from the parameter "
      "dict (were its keys sorted?). Use cbp_jax.trace_graph(fn, params, x)"
    )
  layers = []
  for producer_pos, consumer_pos in zip(weights, weights[1:]):
    _, name, module = entries[producer_pos]
    width = _shape(module["kernel"])[-1]
    if width == 0:
      raise ValueError(
        f"graph_from_params: layer '{name}' has width 0 (kernel shape {_shape(module['kernel'])})"
      )
    between = entries[producer_pos + 1 : consumer_pos]
    if len(between) > 1:
      raise ValueError(
        f"graph_from_params: more than one norm between '{name}' and '{entries[consumer_pos][1]}'"
      )
    norm = between[0][1] if between else None
    if norm is not None:
      for k, v in between[0][2].items():
        if _shape(v) != (width,):
          raise ValueError(
            f"graph_from_params: norm '{norm}' parameter '{k}' has shape "
            f"{_shape(v)}, expected ({width},) for layer '{name}'"
          )
    _, consumer_name, consumer = entries[consumer_pos]
    inputs = _shape(consumer["kernel"])[-2]
    if inputs % width:
      raise ValueError(
        f"graph_from_params: '{consumer_name}/kernel' reads {inputs} inputs, "
        f"not a multiple of the {width} units of '{name}'"
      )
    layers.append(
      Layer(
        name=name,
        kernel=f"{name}/kernel",
        bias=f"{name}/bias" if "bias" in module else None,
        consumers=(
          Consumer(
            kernel=f"{consumer_name}/kernel", bias=f"{consumer_name}/bias" if "bias" in consumer else None
          ),
        ),
        norm=norm,
        activation=activation,
      )
    )
  return LayerGraph(tuple(layers))
