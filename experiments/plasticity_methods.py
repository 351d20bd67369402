"""The 2023-2025 plasticity methods as the experiments run them, in one place.

The slowly-changing regression, permuted MNIST and the benchmark select these
by name next to their own BP/L2/S&P/CBP learners; this module builds each
one's optimizer from SGD the same way everywhere, so that their settings
and their use of `cbp_jax.methods` cannot drift apart:

* ``upgd``: `cbp_jax.methods.upgd` in place of SGD (its own step size);
* ``redo`` / ``regrama`` / ``snr``: SGD, then the unit-reset transform;
* ``hare_tortoise``: SGD, then `cbp_jax.methods.hare_tortoise`;
* ``ln_wd``: LayerNorm in the learner (`cbp_jax.models.MLP(layer_norm=True)`)
  and L2 before SGD (Lyle et al. 2024);
* ``injection``: plasticity injection of the last hidden layer and the
  output layer once, at a chosen point of the run (SGD through
  `cbp_jax.methods.injection_optimizer`).

Numeric settings may arrive traced (vmapped variants).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

import cbp_jax
from cbp_jax import methods as methods_lib

NAMES = ("upgd", "redo", "regrama", "snr", "hare_tortoise", "ln_wd", "injection")

# Settings (the authors' where they published one for a comparable problem,
# else marked user-chosen in README's method table). "at" of the injection is
# the experiment's own unit (task or bin), set by each experiment.
DEFAULTS: dict[str, dict[str, Any]] = {
  "upgd": {"beta_utility": 0.999, "sigma": 0.01, "weight_decay": 0.0},
  "redo": {"tau": 0.025, "period": 1000},
  "regrama": {"tau": 0.025, "period": 1000},
  "snr": {"eta": 0.01},
  "hare_tortoise": {"decay": 0.999, "reset_period": 1000},
  "ln_wd": {"weight_decay": 1e-4},
  "injection": {},
}


def layer_norm(method: str) -> bool:
  """Whether ``method``'s learner has LayerNorm."""
  return method == "ln_wd"


def layer_graph(model: Any, params: Any, x: jax.Array, activation: str = "relu") -> cbp_jax.LayerGraph:
  """The hidden layers of an MLP learner (``params`` may be shapes).

  Read from the parameters (`cbp_jax.graph_from_params`) as the experiments
  always have, except with LayerNorm: ``jax.eval_shape`` returns the
  parameter dict with sorted keys, where the norms' places cannot be read, so
  that graph is traced from the forward pass (`cbp_jax.trace_graph`).
  """
  if not getattr(model, "layer_norm", False):
    return cbp_jax.graph_from_params(params, activation=activation)
  return cbp_jax.trace_graph(lambda p, x: cbp_jax.apply_with_activations(model, p, x), params, x)


def optimizer(
  method: str,
  hp: Mapping[str, Any],
  graph: cbp_jax.LayerGraph,
  key: jax.Array,
  *,
  init: str = "kaiming",
  sgd: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
  """``method``'s optimizer around SGD of step ``hp["step_size"]`` (update takes ``activations=``).

  Args:
    method: one of `NAMES`.
    hp: ``step_size`` and the method's numeric settings (`DEFAULTS`), maybe traced.
    graph: the learner's hidden layers.
    key: the method's PRNG key.
    init: distribution of reinitialised units' incoming weights.
    sgd: the base optimizer (default ``optax.sgd(hp["step_size"])``; UPGD
      replaces it).
  """
  sgd = optax.sgd(hp["step_size"]) if sgd is None else sgd
  if method == "upgd":
    tx = methods_lib.upgd(
      hp["step_size"],
      key=key,
      beta_utility=hp["beta_utility"],
      sigma=hp["sigma"],
      weight_decay=hp["weight_decay"],
    )
  elif method == "redo":
    tx = optax.chain(
      sgd, methods_lib.redo(graph, key=key, tau=hp["tau"], period=_int(hp["period"]), init=init)
    )
  elif method == "regrama":
    tx = optax.chain(
      sgd, methods_lib.regrama(graph, key=key, tau=hp["tau"], period=_int(hp["period"]), init=init)
    )
  elif method == "snr":
    tx = optax.chain(sgd, methods_lib.snr(graph, key=key, eta=hp["eta"], init=init))
  elif method == "hare_tortoise":
    tx = optax.chain(sgd, methods_lib.hare_tortoise(hp["decay"], _int(hp["reset_period"])))
  elif method == "ln_wd":
    tx = optax.chain(methods_lib.l2(hp["weight_decay"]), sgd)
  elif method == "injection":
    tx = methods_lib.injection_optimizer(sgd)
  else:
    raise ValueError(f"unknown method {method!r}; expected one of {NAMES}")
  return optax.with_extra_args_support(tx)


def _int(x: Any) -> Any:
  """An int setting that a vmapped sweep passes as float32: back to int32 (exact below 2**24)."""
  return x if isinstance(x, int) else jnp.asarray(x).astype(jnp.int32)


# --- Plasticity injection of the last layers ---------------------------------


def injected_layers(params: Any) -> list[str]:
  """The layers an MLP's injection replaces: the last hidden layer and the output layer.

  Injecting only a linear output layer trained by SGD would change nothing:
  the fresh copy minus its frozen twin receives exactly the updates the
  layer itself would have had. With a hidden layer in the copy the fresh
  part is a new nonlinear function, as the paper's injected heads are.
  """
  dense = sorted((k for k in params if k.startswith("Dense_")), key=lambda k: int(k.split("_")[1]))
  return dense[-2:]


def injectable(params: Any) -> methods_lib.InjectedParams:
  """``params`` ready for an injection of `injected_layers`."""
  return methods_lib.injectable(params, injected_layers(params))


def apply_with_activations(model: Any, params: Any, x: jax.Array) -> tuple[jax.Array, dict]:
  """`cbp_jax.apply_with_activations` for plain or injected params.

  The activations are the base network's (with the injected layers frozen
  after the injection); the output is `cbp_jax.methods.injection_apply`'s sum.
  """
  if not isinstance(params, methods_lib.InjectedParams):
    return cbp_jax.apply_with_activations(model, params, x)
  _, acts = cbp_jax.apply_with_activations(model, params.base, x)
  # injection_apply runs the base network again; XLA may merge the two
  # identical passes. The benchmark measures what it costs.
  apply = methods_lib.injection_apply(lambda p, x: model.apply({"params": p}, x))
  return apply(params, x), acts


def inject(
  model: Any, learner: tuple[Any, Any], key: jax.Array, x: jax.Array, when: jax.Array
) -> tuple[Any, Any]:
  """Injects `injected_layers` of ``learner = (params, opt_state)`` when ``when`` (traced) holds."""
  params, opt_state = learner
  fresh = model.init(key, x)["params"]
  return methods_lib.inject(params, opt_state, fresh, when=when)


def plain_params(params: Any) -> Any:
  """The parameters the probes measure: the base network of injected params."""
  return params.base if isinstance(params, methods_lib.InjectedParams) else params
