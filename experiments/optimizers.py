"""The method name -> optax optimizer switch of every SGD/Adam experiment.

An experiment names a method and gives its hyperparameters (the entry
``config["hparams"][method]``, numeric ones maybe traced when variants are
vmapped); `optimizer` builds the chain the same way everywhere:

* ``bp`` / ``linear``: SGD at ``step_size`` (with ``momentum`` when the
  method's hyperparameters have it);
* ``adam``: Adam at ``step_size`` with ``b1``, ``b2``, ``eps``;
* ``l2``: ``add_decayed_weights(weight_decay)`` before SGD (PyTorch SGD's
  ``weight_decay``); the same for every method whose hyperparameters have a
  ``weight_decay`` (but S&P's shrink form);
* ``snp``: Shrink & Perturb after SGD. ``snp_decay="shrink"``: the shrink
  ``hp["shrink"]`` (``1 - step_size * weight_decay``) and the noise after
  plain SGD; ``"gradient"``: the weight decay enters the gradient before SGD
  (and its momentum, as PyTorch's ``weight_decay`` does), then the noise;
* ``cbp``: `cbp_jax.cbp` after SGD, or wrapping it (``reset_optimizer``:
  the optimizer statistics of replaced units restart);
* the newer methods of `experiments.plasticity_methods`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

import cbp_jax
from cbp_jax.methods import shrink_and_perturb
from experiments import plasticity_methods

BASE_METHODS = ("linear", "bp", "adam", "l2", "snp", "cbp")
NAMES = BASE_METHODS + plasticity_methods.NAMES
SNP_DECAYS = ("shrink", "gradient")
# The hyperparameters of ``cbp`` that are `cbp_jax.cbp`'s own arguments.
CBP_ARGUMENTS = (
  "replacement_rate",
  "maturity_threshold",
  "decay_rate",
  "utility",
  "init",
  "count_basis",
  "accumulate",
  "next_bias_correction",
)


def snp_shrink(method: str, hp: Mapping[str, Any]) -> dict:
  """``{"shrink": 1 - step_size * weight_decay}`` for ``snp`` (recorded with its
  runs; the factor `optimizer` applies with ``snp_decay="shrink"``), else ``{}``."""
  return {"shrink": 1.0 - hp["step_size"] * hp["weight_decay"]} if method == "snp" else {}


def base(method: str, hp: Mapping[str, Any], *, snp_decay: str = "shrink") -> optax.GradientTransformation:
  """The gradient step ``method``'s optimizer is built around (no resets, no noise).

  Adam for ``adam``; otherwise SGD at ``hp["step_size"]`` (momentum
  ``hp["momentum"]`` if present and non-zero), after
  ``add_decayed_weights(hp["weight_decay"])`` when ``hp`` has a weight decay
  (not for ``snp`` with ``snp_decay="shrink"``, which shrinks after SGD).
  This is the part a reset restarts the statistics of
  (`cbp_jax.methods.reset_optimizer_for`).
  """
  if method == "adam":
    return optax.adam(hp["step_size"], b1=hp["b1"], b2=hp["b2"], eps=hp["eps"])
  sgd = optax.sgd(hp["step_size"], momentum=hp.get("momentum") or None)
  if "weight_decay" in hp and not (method == "snp" and snp_decay == "shrink"):
    return optax.chain(optax.add_decayed_weights(hp["weight_decay"]), sgd)
  return sgd


def optimizer(
  method: str,
  hp: Mapping[str, Any],
  graph: cbp_jax.LayerGraph | None = None,
  key: jax.Array | None = None,
  *,
  snp_decay: str = "shrink",
  max_replacements_per_step: Any = None,
  init: str = "kaiming",
) -> optax.GradientTransformationExtraArgs:
  """``method``'s optimizer (its update takes ``activations=``).

  Args:
    method: one of `NAMES`.
    hp: the method's hyperparameters: ``step_size`` and the method's own
      (numeric ones may be traced).
    graph: the learner's hidden layers (unit-resetting methods).
    key: the method's PRNG key (S&P's noise, CBP's and the resets' draws).
    snp_decay: how ``snp`` applies its weight decay (module docstring).
    max_replacements_per_step: CBP's static bound on replacements per step
      (needed when ``replacement_rate`` is traced).
    init: distribution of the newer methods' reinitialised weights.

  Returns:
    The optimizer, ``optax.with_extra_args_support``-wrapped where needed.

  Raises:
    ValueError: an unknown ``method`` or ``snp_decay``.
  """
  if snp_decay not in SNP_DECAYS:
    raise ValueError(f"snp_decay must be one of {SNP_DECAYS}, got {snp_decay!r}")
  if method in plasticity_methods.NAMES:
    return plasticity_methods.optimizer(method, hp, graph, key, init=init)
  if method not in BASE_METHODS:
    raise ValueError(f"unknown method {method!r}; expected one of {NAMES}")
  inner = base(method, hp, snp_decay=snp_decay)
  if method == "snp":
    shrink = hp["shrink"] if snp_decay == "shrink" else 1.0
    inner = optax.chain(inner, shrink_and_perturb(shrink, hp["noise_scale"], key=key))
  if method != "cbp":
    return optax.with_extra_args_support(inner)
  kwargs = {k: hp[k] for k in CBP_ARGUMENTS if k in hp}
  if max_replacements_per_step is not None:
    kwargs["max_replacements_per_step"] = max_replacements_per_step
  if hp.get("reset_optimizer", False):
    return cbp_jax.cbp(graph, optimizer=inner, key=key, **kwargs)
  return optax.chain(inner, cbp_jax.cbp(graph, key=key, **kwargs))
