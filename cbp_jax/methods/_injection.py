"""Plasticity injection (Nikishin et al., NeurIPS 2023), as a pure function pair.

Nikishin, Oh, Ostrovski, Lyle, Pascanu, Dabney and Barreto, *Deep
Reinforcement Learning with Plasticity Injection*, NeurIPS 2023. At an
injection point the chosen layers ``theta`` (typically the head) are
frozen, and a freshly initialised copy ``theta'`` and a frozen twin
``theta'_0`` of it are added:

    ``f(x) = f_theta(x) + (f_theta'(x) - f_theta'_0(x))``

At injection ``theta' = theta'_0``, so the bracket is exactly 0 and the
output unchanged; afterwards only ``theta'`` (and the layers that were not
injected) learn. Inject a nonlinear part (a hidden layer with the head), as
the paper does: for a single linear layer under SGD, ``theta' - theta'_0``
receives exactly the updates ``theta`` would have had, so the function is the
same as without the injection.

Everything has static shapes, so an injection can happen inside a compiled
run (``lax.scan``, ``jax.vmap`` over seeds): `injectable` builds the
three-part parameter tree once, before training, `injection_optimizer`
masks the updates by a flag in its state, and `inject` flips the flag and
draws the fresh copy, a pure function usable under `jax.lax.cond`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cbp_jax import tree_paths


class InjectedParams(NamedTuple):
  """Parameters of a network with plasticity injection.

  Attributes:
    base: the network's parameters; the injected leaves among them are
      frozen after the injection.
    fresh: ``{path: array}``, the trainable copy of the injected leaves.
    anchor: ``{path: array}``, the frozen twin of ``fresh``.
  """

  base: Any
  fresh: dict[str, jax.Array]
  anchor: dict[str, jax.Array]


class InjectionState(NamedTuple):
  """State of `injection_optimizer`.

  Attributes:
    injected: bool scalar, whether the injection has happened.
    inner_state: the wrapped optimizer's state.
  """

  injected: jax.Array
  inner_state: optax.OptState


def _injected_paths(params: Any, paths: str | Sequence[str]) -> list[str]:
  """Leaf paths at or under ``paths`` (a ValueError names an unknown one)."""
  paths = [paths] if isinstance(paths, str) else list(paths)
  index, _, _ = tree_paths.flatten_by_path(params)
  out = []
  for path in paths:
    if not isinstance(path, str) or not path.strip("/"):
      raise ValueError(f"injectable: paths must be non-empty strings like 'Dense_2', got {path!r}")
    path = path.strip("/")
    hits = [n for n in index if n == path or n.startswith(path + "/")]
    if not hits:
      raise ValueError(
        f"injectable: no parameter at or under path '{path}' (known: {', '.join(sorted(index)[:16])})"
      )
    out.extend(h for h in hits if h not in out)
  return out


def _with_leaves(base: Any, leaves: dict[str, jax.Array]) -> Any:
  """``base`` with the leaves named in ``leaves`` replaced."""
  index, flat, treedef = tree_paths.flatten_by_path(base)
  flat = list(flat)
  for path, value in leaves.items():
    flat[index[path]] = value
  return jax.tree.unflatten(treedef, flat)


def injectable(params: Any, paths: str | Sequence[str]) -> InjectedParams:
  """The parameter tree to train, ready for an injection of the layers under ``paths``.

  Before `inject` the fresh copy and its twin equal the injected leaves, so
  `injection_apply` computes exactly ``f(params)``.

  Args:
    params: the network's parameters.
    paths: module or leaf paths to inject, "/"-joined (``"Dense_2"``).

  Returns:
    The `InjectedParams`.

  Raises:
    ValueError: naming a path with no parameter under it.
  """
  names = _injected_paths(params, paths)
  index, flat, _ = tree_paths.flatten_by_path(params)
  copies = {n: jnp.array(flat[index[n]], copy=True) for n in names}
  return InjectedParams(base=params, fresh=copies, anchor=dict(copies))


def injection_apply(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """``apply(injected, *args) = f(base) + (f(base with fresh) - f(base with anchor))``.

  ``apply_fn(params, *args, **kwargs)`` is the network (e.g.
  ``lambda p, x: model.apply({"params": p}, x)``); its output may be any
  pytree of arrays. The network runs three times; to inject only a head on
  a large trunk, pass the head's apply over the trunk's features instead.

  Returns:
    The apply function of `InjectedParams`.
  """

  def apply(injected: InjectedParams, *args, **kwargs):
    out = apply_fn(injected.base, *args, **kwargs)
    new = apply_fn(_with_leaves(injected.base, injected.fresh), *args, **kwargs)
    old = apply_fn(_with_leaves(injected.base, injected.anchor), *args, **kwargs)
    # a + (b - b) == a exactly: the output is bitwise unchanged at injection.
    return jax.tree.map(lambda o, n, a: o + (n - a), out, new, old)

  return apply


def injection_optimizer(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
  """Wraps ``optimizer`` for `InjectedParams`: frozen parameters get zero updates.

  Before the injection the base network learns and the fresh copy and its
  twin are frozen; after it (`inject`) the injected base leaves are frozen
  and the fresh copy learns; the twin never does. Frozen entries get zero
  gradients into ``optimizer`` (its statistics of them stay as they were)
  and zero updates out of it (so weight decay or momentum cannot move
  them).

  Args:
    optimizer: any optax optimizer.

  Returns:
    An `optax.GradientTransformation` whose state is an `InjectionState`.

  Example:
    >>> model, x = cbp_jax.models.MLP(hidden=(8, 8), outputs=2), jnp.ones((1, 4))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> apply = cbp_jax.methods.injection_apply(lambda p, x: model.apply({"params": p}, x))
    >>> tx = cbp_jax.methods.injection_optimizer(optax.adam(1e-3))
    >>> p = cbp_jax.methods.injectable(params, ["Dense_1", "Dense_2"])
    >>> state = tx.init(p)
    >>> # ... at the injection step (a traced condition works):
    >>> p, state = cbp_jax.methods.inject(p, state, model.init(jax.random.key(1), x)["params"])
    >>> bool(jnp.array_equal(apply(p, x), model.apply({"params": params}, x)))
    True
  """
  inner = optax.with_extra_args_support(optimizer)

  def masks(params: InjectedParams, injected: jax.Array) -> InjectedParams:
    index, flat, treedef = tree_paths.flatten_by_path(params.base)
    base = [jnp.ones((), bool)] * len(flat)
    for path in params.fresh:
      base[index[path]] = ~injected
    return InjectedParams(
      base=jax.tree.unflatten(treedef, base),
      fresh={p: injected for p in params.fresh},
      anchor={p: jnp.zeros((), bool) for p in params.anchor},
    )

  def init_fn(params):
    if not isinstance(params, InjectedParams):
      raise ValueError(
        "injection_optimizer: init needs InjectedParams (cbp_jax.methods.injectable(params, "
        f"paths)), got {type(params).__name__}"
      )
    try:
      inner_state = inner.init(params)
    except ValueError as e:
      raise ValueError(
        "injection_optimizer: the wrapped optimizer cannot be initialised on InjectedParams "
        "(cbp, redo, regrama and snr resolve a layer graph of the plain network, which the "
        "injected one no longer is; wrap a plain optax optimizer): " + str(e)
      ) from e
    return InjectionState(injected=jnp.zeros((), bool), inner_state=inner_state)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("injection_optimizer: update needs params (tx.update(grads, state, params))")
    keep = masks(params, state.injected)
    zero = lambda u, m: jnp.where(m, u, jnp.zeros_like(u))
    updates = jax.tree.map(zero, updates, keep)
    updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    return jax.tree.map(zero, updates, keep), InjectionState(state.injected, inner_state)

  return optax.GradientTransformation(init_fn, update_fn)


def inject(
  params: InjectedParams, opt_state: InjectionState, fresh_params: Any, when: bool | jax.Array = True
) -> tuple[InjectedParams, InjectionState]:
  """Plasticity injection: freeze the injected layers, add a fresh copy and its frozen twin.

  The fresh copy and its twin both take the injected leaves' values from
  ``fresh_params`` (e.g. ``model.init(new_key, x)["params"]``), so the
  output is unchanged; the optimizer state's flag is set. Pure and
  jittable: ``when`` may be traced (the injection step of a scanned run),
  and with ``when`` False both are returned unchanged. One injection per
  run: once injected, a further call changes nothing (a second injection
  would need the first fresh copy folded into the frozen part, which a sum
  of networks cannot express in place).

  Args:
    params: the `InjectedParams` being trained.
    opt_state: the `injection_optimizer` state (outermost).
    fresh_params: a parameter tree like ``params.base`` with the new values.
    when: whether to inject now.

  Returns:
    ``(params, opt_state)`` after the injection.

  Raises:
    ValueError: if ``opt_state`` is not an `InjectionState`, or
      ``fresh_params`` lacks an injected leaf or has another shape there.
  """
  if not isinstance(opt_state, InjectionState):
    raise ValueError(
      "inject: opt_state must be the state of injection_optimizer (outermost), got "
      f"{type(opt_state).__name__}"
    )
  index, flat, _ = tree_paths.flatten_by_path(fresh_params)
  new = {}
  for path, old in params.fresh.items():
    if path not in index or jnp.shape(flat[index[path]]) != jnp.shape(old):
      got = jnp.shape(flat[index[path]]) if path in index else "missing"
      raise ValueError(f"inject: fresh_params['{path}'] must have shape {jnp.shape(old)}, got {got}")
    new[path] = flat[index[path]].astype(old.dtype)
  now = jnp.asarray(when, bool) & ~opt_state.injected
  pick = lambda n, o: jnp.where(now, n, o)
  fresh = {p: pick(new[p], params.fresh[p]) for p in new}
  anchor = {p: pick(new[p], params.anchor[p]) for p in new}
  return (
    InjectedParams(params.base, fresh, anchor),
    InjectionState(opt_state.injected | now, opt_state.inner_state),
  )


class InjectionRecipe(NamedTuple):
  """The four pieces of `plasticity_injection`, bound to one network and optimizer.

  Attributes:
    prepare: ``prepare(params)`` -> `InjectedParams` (`injectable` with the paths).
    apply: the network on `InjectedParams` (`injection_apply`).
    optimizer: the masked optimizer (`injection_optimizer`).
    inject: ``inject(params, opt_state, fresh_params, when=True)`` (`inject`).
  """

  prepare: Callable[[Any], InjectedParams]
  apply: Callable[..., Any]
  optimizer: optax.GradientTransformation
  inject: Callable[..., tuple[InjectedParams, InjectionState]]


def plasticity_injection(
  apply_fn: Callable[..., Any], optimizer: optax.GradientTransformation, paths: str | Sequence[str]
) -> InjectionRecipe:
  """Plasticity injection (Nikishin et al., NeurIPS 2023) of the layers under ``paths``, as one recipe.

  Bundles `injectable`, `injection_apply`, `injection_optimizer` and `inject`
  (see the module docstring for the rule): train ``recipe.prepare(params)``
  with ``recipe.apply`` and ``recipe.optimizer``, and call ``recipe.inject``
  at the injection point (a traced ``when`` works inside `jax.lax.scan`).

  Args:
    apply_fn: the network, ``apply_fn(params, *args)``.
    optimizer: any optax optimizer.
    paths: module or leaf paths to inject; include a hidden layer with the head.

  Returns:
    An `InjectionRecipe`.

  Raises:
    ValueError: if ``paths`` is empty or not strings (an unknown path is
      named by ``prepare``).

  Example:
    >>> model, x = cbp_jax.models.MLP(hidden=(8, 8), outputs=2), jnp.ones((1, 4))
    >>> recipe = cbp_jax.methods.plasticity_injection(
    ...     lambda p, x: model.apply({"params": p}, x), optax.sgd(0.1), ["Dense_1", "Dense_2"])
    >>> p = recipe.prepare(model.init(jax.random.key(0), x)["params"])
    >>> state = recipe.optimizer.init(p)
    >>> p, state = recipe.inject(p, state, model.init(jax.random.key(1), x)["params"])
    >>> recipe.apply(p, x).shape
    (1, 2)
  """
  names = [paths] if isinstance(paths, str) else list(paths)
  if not names or not all(isinstance(n, str) and n.strip("/") for n in names):
    raise ValueError(f"plasticity_injection: paths must be non-empty strings like 'Dense_2', got {paths!r}")
  return InjectionRecipe(
    prepare=lambda params: injectable(params, names),
    apply=injection_apply(apply_fn),
    optimizer=injection_optimizer(optimizer),
    inject=inject,
  )
