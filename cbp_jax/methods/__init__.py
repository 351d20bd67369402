"""The methods CBP is compared with, as Optax transforms and tree helpers.

Every method composes in `optax.chain` and keeps its state in the optimizer
state, so a whole training step stays one pure, jittable, vmappable function:

* `l2`: weight decay toward 0 (``optax.add_decayed_weights``);
* `l2_init`: weight decay toward the initial parameters (Kumar et al. 2023);
* `shrink_and_perturb`: scale the parameters and add Gaussian noise
  (Ash & Adams 2020), placed last in a chain;
* `redo`: reinitialise tau-dormant units every ``period`` steps (Sokar et al.
  2023), with the same reset kernel as `cbp_jax.cbp` (`cbp_jax.reset`);
* `reset_layers` / `reset_optimizer_for`: task-boundary resets (e.g. the
  output layer per task in continual ImageNet);
* `upgd` / `scale_by_upgd`: utility-based perturbed gradient descent
  (Elsayed & Mahmood 2024);
* `regrama`: reset units of small incoming gradient on ReDo's schedule
  (Liu et al. 2025);
* `snr`: self-normalized resets of units whose silence is improbable under
  their own firing rate (Farias & Jozefiak 2025);
* `hare_tortoise`: a slow EMA copy and periodic resets of the fast weights
  to it (Lee et al. 2024);
* `plasticity_injection` (`injectable` / `injection_apply` /
  `injection_optimizer` / `inject`): plasticity injection (Nikishin et al. 2023).

Each method lives in its own private module (``_l2``, ``_l2_init``,
``_shrink_perturb``, ``_redo``, ``_task_resets``, ``_upgd``, ``_regrama``,
``_snr``, ``_hare_tortoise``, ``_injection``), re-exported here. ReDo, ReGraMa
and SNR share their machinery (``_scored_reset``) and the reset kernel of
`cbp_jax.cbp` (`cbp_jax.reset`). LayerNorm + weight decay (Lyle et al.
2024) needs no transform: ``cbp_jax.models.MLP(..., layer_norm=True)`` with
`l2` before the optimizer (or ``optax.adamw``).
"""

from cbp_jax.methods._hare_tortoise import HareTortoiseState, hare_tortoise, tortoise_params
from cbp_jax.methods._injection import (
  InjectedParams,
  InjectionRecipe,
  InjectionState,
  inject,
  injectable,
  injection_apply,
  injection_optimizer,
  plasticity_injection,
)
from cbp_jax.methods._l2 import l2
from cbp_jax.methods._l2_init import L2InitState, l2_init
from cbp_jax.methods._redo import redo
from cbp_jax.methods._regrama import gradient_scores, regrama
from cbp_jax.methods._scored_reset import RedoState, SnrState, replaced_total
from cbp_jax.methods._shrink_perturb import ShrinkPerturbState, shrink_and_perturb
from cbp_jax.methods._snr import snr, streak_log_probability, update_firing
from cbp_jax.methods._task_resets import reset_layers, reset_optimizer_for
from cbp_jax.methods._upgd import ScaleByUpgdState, scale_by_upgd, scaled_utilities, upgd
from cbp_jax.methods._upgd import utilities as upgd_utilities

# The public names, also those of the private per-method modules (the API
# reference documents what is listed here).
__all__ = [
  "gradient_scores",
  "hare_tortoise",
  "HareTortoiseState",
  "inject",
  "injectable",
  "InjectedParams",
  "injection_apply",
  "injection_optimizer",
  "InjectionRecipe",
  "InjectionState",
  "l2",
  "plasticity_injection",
  "l2_init",
  "L2InitState",
  "redo",
  "RedoState",
  "regrama",
  "replaced_total",
  "reset_layers",
  "reset_optimizer_for",
  "scale_by_upgd",
  "ScaleByUpgdState",
  "scaled_utilities",
  "shrink_and_perturb",
  "ShrinkPerturbState",
  "snr",
  "SnrState",
  "streak_log_probability",
  "tortoise_params",
  "update_firing",
  "upgd",
  "upgd_utilities",
]
