"""The plasticity probes a classification experiment records at each probe point.

Shared by `experiments.permuted_mnist` and `experiments.continual_imagenet`
(one call per learner per probe point, inside the compiled program, vmapped
over variants and seeds like the rest of it). From `cbp_jax.metrics`:

* ``trainability``: `trainability_probe` from a copy of the learner's
  parameters: plain SGD (``step_size``, ``trainability_steps`` full-batch
  steps) on a fresh task, uniformly random labels on the first ``size`` probe
  inputs; the fraction of its cross-entropy removed. ``trainability_loss`` is
  the loss after. ``trainability_fresh_init`` and
  ``trainability_loss_fresh_init``: the same probe (same inputs, same labels)
  from a fresh initialisation of the same network, the reference a fully
  plastic network reaches. A trained network's confident predictions start
  the fresh task far above chance loss (``ln(classes)``) and the first steps
  remove that excess, so compare the losses after the probe, not the
  fractions removed, with the fresh network's (which starts at chance).
* ``hessian_top_eigenvalue``: `top_hessian_eigenvalue` of the cross-entropy
  on the first ``size`` probe examples (their true labels),
  ``hessian_iterations`` Lanczos steps.
* ``drift`` and ``drift/<layer>``: `parameter_drift` from the seed's initial
  parameters (every kernel, overall and per layer).
* ``output_churn`` and ``prediction_churn``: `output_churn` /
  `prediction_churn` of the logits on a fixed held-out batch since the
  previous probe point (the first one: since initialisation).

The probe settings are a config entry ``probes`` (`DEFAULT_PROBES`); with
``enabled`` false none of this is computed or recorded.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from cbp_jax import metrics as metrics_lib
from experiments import runner

DEFAULT_PROBES: dict[str, Any] = {
  "enabled": True,
  "size": 128,  # probe examples for the trainability probe and the Hessian
  "trainability_steps": 20,
  "trainability_step_size": 0.1,
  "hessian_iterations": 8,
  "heldout_size": 256,  # held-out inputs for the churn
}

# Key streams of a probe point's key.
_LABELS, _FRESH, _LANCZOS = range(3)


def validate(probes: Mapping[str, Any]) -> None:
  """Raises ValueError naming the first bad ``probes`` entry."""
  runner.require(
    isinstance(probes.get("enabled"), bool),
    f"probes.enabled must be true or false, got {probes.get('enabled')!r}",
  )
  runner.require_positive_ints(probes, ("size", "trainability_steps", "hessian_iterations", "heldout_size"))
  lr = probes["trainability_step_size"]
  runner.require(
    isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0,
    f"probes.trainability_step_size must be a number > 0, got {lr!r}",
  )


def cross_entropy(apply_logits: Callable[[Any, jax.Array], jax.Array]):
  """``loss(params, x, labels)``: mean softmax cross-entropy of ``apply_logits(params, x)``."""

  def loss(params, x, labels):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(apply_logits(params, x), labels))

  return loss


def probe_labels(probes: Mapping[str, Any], key: jax.Array, num_classes: int) -> jax.Array:
  """The fresh task's random labels, int32 ``(size,)`` (one draw per probe point, shared by all learners)."""
  return jax.random.randint(jax.random.fold_in(key, _LABELS), (probes["size"],), 0, num_classes)


def trainability(
  probes: Mapping[str, Any], apply_logits: Callable, params: Any, x: jax.Array, labels: jax.Array
) -> dict[str, jax.Array]:
  """`cbp_jax.metrics.trainability_probe` on ``(x[:size], labels)``: ``{"trainability", "trainability_loss"}``."""
  out = metrics_lib.trainability_probe(
    cross_entropy(apply_logits),
    params,
    x[: probes["size"]],
    labels,
    optax.sgd(probes["trainability_step_size"]),
    probes["trainability_steps"],
  )
  return {"trainability": out["loss_reduction"], "trainability_loss": out["loss_after"]}


def learner_probes(
  probes: Mapping[str, Any],
  apply_logits: Callable,
  params: Any,
  init_params: Any,
  x: jax.Array,
  y: jax.Array,
  labels: jax.Array,
  key: jax.Array,
  heldout_before: jax.Array,
  heldout_x: jax.Array,
) -> tuple[dict, jax.Array]:
  """Every probe of one learner at one probe point.

  Args:
    probes: the config's ``probes`` entry.
    apply_logits: ``apply_logits(params, x) -> logits``.
    params, init_params: the learner's parameters now and at initialisation.
    x, y: the probe examples (at least ``size``) and their true labels.
    labels: `probe_labels` of this probe point.
    key: this probe point's key (shared by the learners).
    heldout_before: the held-out batch's logits at the previous probe point.
    heldout_x: the held-out inputs.

  Returns:
    ``(metrics, heldout_logits)``: the names of the module docstring (but
    the fresh-initialisation ones, see `fresh_trainability`), and this probe
    point's held-out logits, for the next one's churn.
  """
  n = probes["size"]
  loss = cross_entropy(apply_logits)
  out = trainability(probes, apply_logits, params, x, labels)
  out["hessian_top_eigenvalue"] = metrics_lib.top_hessian_eigenvalue(
    lambda p: loss(p, x[:n], y[:n]), params, jax.random.fold_in(key, _LANCZOS), probes["hessian_iterations"]
  )
  for name, value in metrics_lib.parameter_drift(params, init_params).items():
    out["drift" if name == "overall" else f"drift/{name.removesuffix('/kernel')}"] = value
  heldout = apply_logits(params, heldout_x)
  out["output_churn"] = metrics_lib.output_churn(heldout_before, heldout)
  out["prediction_churn"] = metrics_lib.prediction_churn(heldout_before, heldout)
  return out, heldout


def fresh_trainability(
  probes: Mapping[str, Any],
  apply_logits: Callable,
  init: Callable[[jax.Array], Any],
  x: jax.Array,
  labels: jax.Array,
  key: jax.Array,
) -> dict[str, jax.Array]:
  """The reference: `trainability` of ``init(key')``, a fresh draw of the network's
  parameters for this probe point, on the same fresh task, as
  ``{"trainability_fresh_init", "trainability_loss_fresh_init"}``."""
  out = trainability(probes, apply_logits, init(jax.random.fold_in(key, _FRESH)), x, labels)
  return {f"{name}_fresh_init": value for name, value in out.items()}


def plotted(results: Mapping[str, Any]) -> tuple[str, ...]:
  """The probe panels of an experiment's figure: trainability and curvature, when recorded."""
  present = {n for named in results["metrics"].values() for n in named}
  return tuple(n for n in ("trainability", "hessian_top_eigenvalue") if n in present)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """``--no-probes`` (skip the probes) and ``--probe-steps`` (trainability steps)."""
  parser.add_argument(
    "--no-probes",
    action="store_true",
    help="do not compute the plasticity probes (trainability, Hessian, drift, churn)",
  )
  parser.add_argument(
    "--probe-steps",
    type=int,
    help=f"SGD steps of the trainability probe (default {DEFAULT_PROBES['trainability_steps']})",
  )


def overrides_from_args(args: argparse.Namespace) -> dict:
  """The ``probes`` config entries `add_arguments`' flags give (``{}`` for none)."""
  probes: dict[str, Any] = {}
  if args.no_probes:
    probes["enabled"] = False
  if args.probe_steps is not None:
    probes["trainability_steps"] = args.probe_steps
  return {"probes": probes} if probes else {}
