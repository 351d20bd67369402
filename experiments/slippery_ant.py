"""Slippery Ant (Dohare et al., Nature 2024): PPO with and without CBP, whole run compiled.

The problem (SPEC "Experiments"; reference: ``lop/rl`` and its ``cfg/sant`` configs)
-----------------------------------------------------------------------------------
* Environment: Brax's ``ant`` on the MJX backend (MuJoCo physics in JAX;
  brax 0.14.2, mujoco / mujoco-mjx 3.17.0): 27 observations, 8 torques,
  reward = forward velocity + 1 (alive) - 0.5 |a|^2, termination when the
  torso leaves z in [0.2, 1.0], episodes truncated at ``episode_length``
  (1,000) steps.
* Slipperiness: the sliding friction coefficient of every geom (the
  reference rewrites the default geom friction of the XML, i.e. all geoms)
  is redrawn log-uniformly in ``friction_range`` = [0.02, 2] every
  ``change_every`` environment steps (the paper: 2M). Phase ``k`` of seed
  ``s`` uses ``exp(U(log 0.02, log 2))`` drawn from ``fold_in(key_s, k)``;
  phase 0 is random too (as in the reference). The friction is **data**: the
  compiled program computes it from the update index and writes it into the
  MJX model (``sys.replace(geom_friction=...)``) for every step, so nothing
  is recompiled and all seeds/methods run in one program. It changes at the
  first update boundary at or after each multiple of ``change_every``;
  episodes running then continue under the new friction (the reference
  changes it at the next episode end).
* Agent (the reference's PPO, ``lop/algos/rl/ppo.py``): Gaussian policy,
  mean from a ``27-256-256-8`` ReLU MLP, state-independent log std (a
  parameter, initially 0); value net ``27-256-256-1`` ReLU; both `lecun`
  uniform (``cbp_jax.models.MLP(init_scheme="lecun")``, biases 0). Raw
  Gaussian actions go to the environment (MuJoCo clips the torques to
  [-1, 1]; the control cost sees the raw action, as in Gym's Ant-v3).
  ``steps_per_update = num_envs * rollout_len`` = 2,048 transitions per
  update, GAE (gamma 0.99, lambda 0.95), advantages normalised over the
  batch, ``epochs`` = 10 passes of ``minibatches`` = 16 minibatches (128),
  loss = clipped surrogate (eps 0.2) + value MSE (weight 1, no entropy
  bonus), no gradient clipping (the reference's max norm is 1e9), one Adam
  over the policy and value parameters. Truncated episodes bootstrap from the
  value of their last observation (``bootstrap_truncation``; False treats the
  time limit as terminal, as the reference's Gym loop did). The PPO pieces
  live in `experiments.ppo`.
* Methods (the reference's ``cfg/sant`` and ``cfg/ant/redo.yml``):
  ``ppo`` (Adam 1e-4, betas 0.9/0.999), ``ppo_ns`` (Adam betas 0.99/0.99,
  the paper's "non-stationary" Adam), ``l2`` (betas 0.99, weight decay
  1e-3: PyTorch Adam ``weight_decay``, i.e. ``add_decayed_weights`` before
  Adam, on every parameter), ``cbp`` (betas 0.99, weight decay 1e-4, CBP
  rate 1e-4, maturity 10,000, decay 0.99, ``contribution`` utility, `lecun`
  init, accumulated counts as the reference's MLP GnT), ``redo`` (betas
  0.99, weight decay 1e-4, `cbp_jax.methods.redo` with tau 0.1 every 100
  minibatch updates, lecun init).
* CBP runs after every minibatch update, as the reference's ``gen_and_test``:
  ``cbp_jax.cbp(graph, ..., optimizer=adam_chain)`` (wrapping form, so Adam's
  moments of replaced units restart), with the activations of that
  minibatch's forward pass (``cbp_jax.apply_with_activations``). The graph is
  **one** `cbp_jax.LayerGraph` over both networks: `graph_from_params` of
  each net's params, paths prefixed ``policy/`` and ``value/``. CBP's
  statistics, counts and choices are per layer, so this is exactly two
  independent CBPs (the reference's ``pol_gnt`` and ``val_gnt``) sharing the
  one Adam they both must reset, as in the reference; one transform keeps
  one optimizer state and one key. ReDo is wired the same way.

Implementation notes
--------------------
* Methods that share a structure are vmapped together: when ``cbp`` is
  among the methods, ``ppo``/``ppo_ns``/``l2`` run through the same
  ``cbp(...)`` wrapper with replacement rate 0 (their updates are then plain
  Adam's, up to float rounding: CBP only edits updates of replaced units;
  their ``replaced_units`` is 0 rather than NaN);
  ``redo`` is its own group. Without ``cbp`` they are plain Adam. Betas,
  learning rate and weight decay are traced per method.
* All methods of one seed share initial weights, reset states, action noise
  keys, minibatch orders and the friction sequence (paired comparison);
  seed ``i`` uses ``fold_in(key(seed), i)``.
* Program structure (purejaxrl style): `make_train` returns a pure per-seed
  ``train(key)``; `make_chunked` the per-seed ``init(key)`` and
  ``chunk(carry, chunk_index)``; `EXPERIMENT` declares them to
  `experiments.protocol`, whose `run_experiment` vmaps them over seeds and
  drives them with `experiments.runner.run` (progress line, results JSON
  after every chunk, orbax checkpoints, ``--resume``). Every method's
  hyperparameters are ``config["hparams"][method]``, the Adam step size under
  ``step_size``; no sweeps (the methods are the vmapped axis).

Recorded per point (``updates_per_point`` updates): ``episode_return`` (mean
return of the episodes that ended in it; NaN if none), ``episodes``,
``friction``, ``phase``, ``dead_fraction`` (hidden units of both nets never
active on the point's last rollout batch), ``dormant_fraction`` (ReDo score
<= 0.1), ``effective_rank`` (policy's last hidden layer on that batch),
``weight_magnitude`` (mean |w| of all kernels of both nets),
``policy_loss``/``value_loss``/``approx_kl`` (means over the point's
minibatches) and ``replaced_units`` (cumulative, CBP and ReDo).

Usage::

  python -m experiments.slippery_ant --out results/slippery_ant          # reduced (< 20 min here)
  python -m experiments.slippery_ant --paper --out results/slippery_ant_paper
  python -m experiments.slippery_ant --out results/slippery_ant --resume  # continue a run
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cbp_jax
from cbp_jax import metrics as metrics_lib
from experiments import ppo, protocol, runner

METHODS = ("ppo", "ppo_ns", "l2", "cbp", "redo")
DESCRIPTIONS = {
  "ppo": "PPO (Adam betas 0.9, 0.999)",
  "ppo_ns": "PPO, Adam betas (0.99, 0.99)",
  "l2": "PPO+L2",
  "cbp": "PPO+CBP+L2",
  "redo": "PPO+ReDo",
}

HPARAMS: dict[str, dict[str, Any]] = {
  "ppo": {"step_size": 1e-4, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.0},
  "ppo_ns": {"step_size": 1e-4, "b1": 0.99, "b2": 0.99, "eps": 1e-8, "weight_decay": 0.0},
  "l2": {"step_size": 1e-4, "b1": 0.99, "b2": 0.99, "eps": 1e-8, "weight_decay": 1e-3},
  "cbp": {
    "step_size": 1e-4,
    "b1": 0.99,
    "b2": 0.99,
    "eps": 1e-8,
    "weight_decay": 1e-4,
    "replacement_rate": 1e-4,
    "maturity_threshold": 10_000,
    "decay_rate": 0.99,
    "utility": "contribution",
    "init": "lecun",
    "accumulate": True,
    "next_bias_correction": True,
  },
  "redo": {
    "step_size": 1e-4,
    "b1": 0.99,
    "b2": 0.99,
    "eps": 1e-8,
    "weight_decay": 1e-4,
    "tau": 0.1,
    "period": 100,
    "init": "lecun",
  },
}
_TRACED = ("step_size", "b1", "b2", "eps", "weight_decay")  # Per-method arrays (vmapped).

# The reduced configuration: under 20 minutes on 2 (shared) CPU cores for all
# five methods, 1 seed: 100 updates (204,800 steps) per method, friction
# redrawn every 40,960 steps (5 phases) instead of every 2M. CBP's units
# mature after 10,000 minibatch steps (63 updates), so it replaces units in
# the last 37 updates only. Everything else
# (network, optimiser, PPO and CBP settings) is the paper's. It is a smoke
# run of the whole pipeline: far too short for loss of plasticity to appear.
DEFAULT_CONFIG: dict[str, Any] = {
  "seed": 0,
  "seeds": 1,
  "total_steps": 204_800,  # environment steps per run (rounded up to whole chunks)
  "num_envs": 16,
  "rollout_len": 128,  # steps_per_update = 16 * 128 = 2048
  "epochs": 10,
  "minibatches": 16,
  "gamma": 0.99,
  "gae_lambda": 0.95,
  "clip_eps": 0.2,
  "max_grad_norm": 0.0,  # 0: no clipping (the reference's 1e9)
  "normalize_advantages": True,
  "bootstrap_truncation": True,
  "hidden": [256, 256],
  "episode_length": 1000,
  "change_every": 40_960,  # environment steps between friction redraws
  "friction_range": [0.02, 2.0],
  "updates_per_point": 4,
  "points_per_chunk": 5,
  "dormant_tau": 0.1,
  "methods": ["ppo", "ppo_ns", "l2", "cbp", "redo"],
  "hparams": HPARAMS,
  "sweep": {},
}

# The paper's run: 50M steps, friction redrawn every 2M steps, one
# environment with 2,048-step rollouts (the reference's buffer), 30 seeds.
PAPER_OVERRIDES: dict[str, Any] = {
  "seeds": 30,
  "total_steps": 50_000_000,
  "num_envs": 1,
  "rollout_len": 2048,
  "change_every": 2_000_000,
  "updates_per_point": 10,
  "points_per_chunk": 25,
}


# ---------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------


# The PPO learner's entries that count something (continual MinAtar checks them too).
LEARNER_INTS = (
  "total_steps",
  "num_envs",
  "rollout_len",
  "epochs",
  "minibatches",
  "episode_length",
  "change_every",
  "updates_per_point",
  "points_per_chunk",
)


def validate_config(c: Mapping[str, Any]) -> None:
  """Raises ValueError naming the first inconsistent entry (the common entries
  are checked by the protocol)."""
  need = runner.require
  runner.require_positive_ints(c, LEARNER_INTS)
  lo, hi = c["friction_range"]
  need(0 < lo <= hi, f"friction_range must be 0 < low <= high, got {c['friction_range']}")
  validate_learner(c, HPARAMS)


def validate_learner(c: Mapping[str, Any], defaults: Mapping[str, Mapping[str, Any]]) -> None:
  """The checks of the PPO learner's entries (batching, PPO settings, ``hidden``,
  ``dormant_tau`` and every method's hyperparameters, ``defaults`` giving each
  method's names); raises ValueError naming the first bad one."""
  need = runner.require
  need(
    steps_per_update(c) % c["minibatches"] == 0,
    f"minibatches ({c['minibatches']}) must divide num_envs * rollout_len ({steps_per_update(c)})",
  )
  need(0 < c["gamma"] <= 1 and 0 <= c["gae_lambda"] <= 1, "gamma must be in (0, 1], gae_lambda in [0, 1]")
  need(c["clip_eps"] > 0, f"clip_eps must be > 0, got {c['clip_eps']}")
  need(c.get("entropy_coef", 0.0) >= 0, f"entropy_coef must be >= 0, got {c.get('entropy_coef')}")
  need(c["max_grad_norm"] >= 0, f"max_grad_norm must be >= 0 (0: off), got {c['max_grad_norm']}")
  need(
    len(c["hidden"]) >= 1 and all(isinstance(h, int) and h >= 1 for h in c["hidden"]),
    f"hidden must be a non-empty list of positive ints, got {c['hidden']}",
  )
  need(c["dormant_tau"] >= 0, "dormant_tau must be >= 0")
  need(
    not c["sweep"],
    "no sweeps: the methods are the vmapped axis (set hparams, one config "
    f"per value), got sweep {c['sweep']}",
  )
  for m in defaults:
    hp = c["hparams"][m]
    need(set(hp) == set(defaults[m]), f"hparams.{m} must have exactly {sorted(defaults[m])}")
    need(hp["step_size"] > 0, f"{m}: step_size must be > 0")
    need(0 <= hp["b1"] < 1 and 0 <= hp["b2"] < 1, f"{m}: b1, b2 must be in [0, 1)")
    need(hp["eps"] > 0, f"{m}: eps must be > 0")
    need(hp["weight_decay"] >= 0, f"{m}: weight_decay must be >= 0")
  cb = c["hparams"]["cbp"]
  need(0 <= cb["replacement_rate"] <= 1, "cbp: replacement_rate must be in [0, 1]")
  need(0 <= cb["decay_rate"] < 1, "cbp: decay_rate must be in [0, 1)")
  need(cb["maturity_threshold"] >= 0, "cbp: maturity_threshold must be >= 0")
  rd = c["hparams"]["redo"]
  need(rd["tau"] >= 0, "redo: tau must be >= 0")
  need(isinstance(rd["period"], int) and rd["period"] >= 1, "redo: period must be an int >= 1")


def steps_per_update(config: Mapping[str, Any]) -> int:
  return config["num_envs"] * config["rollout_len"]


def updates_per_chunk(config: Mapping[str, Any]) -> int:
  return config["updates_per_point"] * config["points_per_chunk"]


def steps_per_chunk(config: Mapping[str, Any]) -> int:
  return steps_per_update(config) * updates_per_chunk(config)


def num_chunks(config: Mapping[str, Any]) -> int:
  """Chunks in the run: ``total_steps`` rounded up to whole chunks."""
  return -(-config["total_steps"] // steps_per_chunk(config))


# ---------------------------------------------------------------------------
# Keys and the friction schedule.
# ---------------------------------------------------------------------------


seed_key = runner.seed_key
seed_keys = runner.seed_keys


def phase_of_update(config: Mapping[str, Any], update: jax.Array) -> jax.Array:
  """Friction phase of update ``update`` (0-based): the phase holding its first step."""
  return (update.astype(jnp.int32) * steps_per_update(config)) // config["change_every"]


def friction_of_phase(config: Mapping[str, Any], key: jax.Array, phase: jax.Array) -> jax.Array:
  """The seed's sliding friction in phase ``phase``: log-uniform in ``friction_range``."""
  lo, hi = config["friction_range"]
  u = jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, 0), phase), ())
  return jnp.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))).astype(jnp.float32)


# ---------------------------------------------------------------------------
# The environment: Brax ant (MJX) with friction passed as data.
# ---------------------------------------------------------------------------


class EnvState(NamedTuple):
  """One environment's state: the Brax state, the episode's step and return."""

  brax: Any
  t: jax.Array
  ret: jax.Array


class Transition(NamedTuple):
  obs: jax.Array
  next_obs: jax.Array  # the observation the step produced (before any reset)
  reward: jax.Array
  terminated: jax.Array
  episode_end: jax.Array
  episode_return: jax.Array  # the finished episode's return where episode_end, else 0


_ENV_CACHE: dict[str, Any] = {}


def brax_ant(backend: str = "mjx"):
  """Brax's ``ant`` environment (memoised; brax is imported here, not at module import)."""
  if backend not in _ENV_CACHE:
    import warnings

    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      from brax import envs

      _ENV_CACHE[backend] = envs.get_environment("ant", backend=backend)
  return _ENV_CACHE[backend]


class SlipperyAnt:
  """Brax ant whose sliding friction is an argument of `step`.

  Episodes end on termination (unhealthy) or after ``episode_length`` steps;
  `step` then swaps in the ``reset_state`` it is given (auto-reset).
  """

  def __init__(self, episode_length: int = 1000, backend: str = "mjx"):
    self.env = brax_ant(backend)
    self.episode_length = episode_length
    self.observation_size = int(self.env.observation_size)
    self.action_size = int(self.env.action_size)

  def with_friction(self, friction: jax.Array):
    """A shallow copy of the Brax env whose system has sliding friction ``friction``.

    Works on traced values: the MJX model is a pytree and ``geom_friction``
    one of its arrays, so this is data inside the compiled program.
    """
    sys_ = self.env.sys
    gf = jnp.asarray(sys_.geom_friction)
    gf = gf.at[:, 0].set(jnp.asarray(friction, gf.dtype))
    env = copy.copy(self.env)
    env.sys = sys_.replace(geom_friction=gf)
    return env

  def reset(self, key: jax.Array) -> EnvState:
    s = self.env.reset(key)
    return EnvState(brax=s, t=jnp.zeros((), jnp.int32), ret=jnp.zeros((), jnp.float32))

  def observation(self, state: EnvState, friction: jax.Array) -> jax.Array:
    """The observation the agent acts on (the friction is not observed)."""
    del friction
    return state.brax.obs

  def start_update(self, state: EnvState, friction: jax.Array, reset_state: EnvState) -> EnvState:
    """The state an update's rollout starts from: ``state`` itself (a new
    friction takes effect mid-episode)."""
    del friction, reset_state
    return state

  def step(
    self, state: EnvState, action: jax.Array, friction: jax.Array, reset_state: EnvState
  ) -> tuple[EnvState, Transition]:
    """One step under ``friction``; auto-resets to ``reset_state`` at an episode's end."""
    s = self.with_friction(friction).step(state.brax, action)
    t = state.t + 1
    ret = state.ret + s.reward
    terminated = s.done > 0.5
    end = terminated | (t >= self.episode_length)
    tr = Transition(
      obs=state.brax.obs,
      next_obs=s.obs,
      reward=s.reward,
      terminated=terminated.astype(jnp.float32),
      episode_end=end.astype(jnp.float32),
      episode_return=jnp.where(end, ret, 0.0),
    )
    new = EnvState(brax=s, t=t, ret=ret)
    new = jax.tree.map(lambda r, n: jnp.where(end, r, n), reset_state, new)
    return new, tr


# ---------------------------------------------------------------------------
# Networks, graph and optimisers.
# ---------------------------------------------------------------------------


NETS = ("policy", "value")


def make_nets(config: Mapping[str, Any], action_size: int):
  hidden = tuple(config["hidden"])
  return {
    "policy": cbp_jax.models.MLP(hidden=hidden, outputs=action_size, init_scheme="lecun"),
    "value": cbp_jax.models.MLP(hidden=hidden, outputs=1, init_scheme="lecun"),
  }


class GaussianPolicy:
  """The policy head of slippery Ant: a diagonal Gaussian around the policy
  net's output, with a state-independent log std (parameter ``log_std``,
  initially 0). `_Group` asks its head for the extra parameters, samples and
  log-likelihoods, so another experiment can bring another head (a
  categorical one for discrete actions)."""

  def extra_params(self, action_size: int) -> dict:
    return {"log_std": jnp.zeros((action_size,), jnp.float32)}

  def sample(self, params, out: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(action, log_prob)`` for the policy net's output ``out``."""
    action = out + jnp.exp(params["log_std"]) * jax.random.normal(key, out.shape)
    return action, self.log_prob(params, out, action)

  def log_prob(self, params, out: jax.Array, action: jax.Array) -> jax.Array:
    return ppo.gaussian_log_prob(out, params["log_std"], action)


GAUSSIAN = GaussianPolicy()


def init_params(nets, key: jax.Array, obs_size: int, action_size: int, policy=GAUSSIAN) -> dict:
  x = jnp.zeros((1, obs_size), jnp.float32)
  kp, kv = jax.random.split(key)
  return {
    "policy": nets["policy"].init(kp, x)["params"],
    "value": nets["value"].init(kv, x)["params"],
    **policy.extra_params(action_size),
  }


def _prefixed(graph: cbp_jax.LayerGraph, prefix: str) -> list[cbp_jax.Layer]:
  def p(path):
    return None if path is None else f"{prefix}/{path}"

  return [
    dataclasses.replace(
      layer,
      name=p(layer.name),
      kernel=p(layer.kernel),
      bias=p(layer.bias),
      norm=p(layer.norm),
      consumers=tuple(dataclasses.replace(c, kernel=p(c.kernel), bias=p(c.bias)) for c in layer.consumers),
    )
    for layer in graph
  ]


def make_graph(params: Mapping[str, Any]) -> cbp_jax.LayerGraph:
  """One layer graph over both nets: each net's `graph_from_params`, paths prefixed
  ``policy/`` / ``value/`` (layer names too, e.g. ``policy/Dense_0``)."""
  layers = []
  for net in NETS:
    layers += _prefixed(cbp_jax.graph_from_params(params[net]), net)
  return cbp_jax.LayerGraph(layers)


def forward(nets, params, obs):
  """Policy mean, value and the hidden activations ``{"policy/Dense_0": h, ...}``.

  ``obs`` is ``(..., obs_size)``; outputs keep its leading axes.
  """
  lead = obs.shape[:-1]
  flat = obs.reshape(-1, obs.shape[-1])  # The MLP flattens everything after axis 0.
  mean, acts_p = cbp_jax.apply_with_activations(nets["policy"], params["policy"], flat)
  value, acts_v = cbp_jax.apply_with_activations(nets["value"], params["value"], flat)
  acts = {
    **{f"policy/{k}": v.reshape(lead + v.shape[-1:]) for k, v in acts_p.items()},
    **{f"value/{k}": v.reshape(lead + v.shape[-1:]) for k, v in acts_v.items()},
  }
  return mean.reshape(lead + mean.shape[-1:]), value[:, 0].reshape(lead), acts


def group_kind(config: Mapping[str, Any], method: str) -> str:
  """Which optimiser structure ``method`` runs in (see the module docstring)."""
  if method == "redo":
    return "redo"
  return "cbp" if "cbp" in config["methods"] else "adam"


def method_groups(config: Mapping[str, Any]) -> dict[str, list[str]]:
  """``{kind: [methods]}`` in config order; each group is one vmapped program part."""
  groups: dict[str, list[str]] = {}
  for m in config["methods"]:
    groups.setdefault(group_kind(config, m), []).append(m)
  return groups


def _group_hparams(config, methods) -> dict[str, jax.Array]:
  hp = {k: jnp.asarray([config["hparams"][m][k] for m in methods], jnp.float32) for k in _TRACED}
  cb = config["hparams"]["cbp"]
  hp["replacement_rate"] = jnp.asarray(
    [cb["replacement_rate"] if m == "cbp" else 0.0 for m in methods], jnp.float32
  )
  return hp


def make_optimizer(
  config: Mapping[str, Any], kind: str, hp: Mapping[str, jax.Array], graph: cbp_jax.LayerGraph, key: jax.Array
) -> optax.GradientTransformationExtraArgs:
  """The optimiser of one method (``hp``: its traced hyperparameters)."""
  parts = []
  if config["max_grad_norm"] > 0:
    parts.append(optax.clip_by_global_norm(config["max_grad_norm"]))
  parts += [
    optax.add_decayed_weights(hp["weight_decay"]),
    optax.adam(hp["step_size"], b1=hp["b1"], b2=hp["b2"], eps=hp["eps"]),
  ]
  adam = optax.chain(*parts)
  if kind == "adam":
    return optax.with_extra_args_support(adam)
  if kind == "redo":
    r = config["hparams"]["redo"]
    return cbp_jax.methods.redo(
      graph, key=key, tau=r["tau"], period=r["period"], init=r["init"], optimizer=adam
    )
  c = config["hparams"]["cbp"]
  width = max(config["hidden"])
  bound = min(width, math.ceil(c["replacement_rate"] * width) + 1)
  return cbp_jax.cbp(
    graph,
    key=key,
    replacement_rate=hp["replacement_rate"],
    maturity_threshold=c["maturity_threshold"],
    decay_rate=c["decay_rate"],
    utility=c["utility"],
    init=c["init"],
    accumulate=c["accumulate"],
    next_bias_correction=c["next_bias_correction"],
    optimizer=adam,
    max_replacements_per_step=bound,
  )


def replaced_units(kind: str, opt_state: Any) -> jax.Array:
  """Units replaced so far (all layers of both nets)."""
  if kind == "cbp":
    return sum(s["replaced"] for s in cbp_jax.unit_stats(opt_state).values()).astype(jnp.float32)
  if kind == "redo":
    return sum(opt_state.replaced_total.values()).astype(jnp.float32)
  return jnp.full((), jnp.nan, jnp.float32)


# ---------------------------------------------------------------------------
# One PPO update (rollout, GAE, epochs of minibatch steps with CBP inside).
# ---------------------------------------------------------------------------


class Learner(NamedTuple):
  params: Any
  opt_state: Any
  env: EnvState  # batched over num_envs


def ppo_loss(nets, params, batch, clip_eps, policy=GAUSSIAN, entropy_coef: float = 0.0):
  """Reference PPO loss: clipped surrogate + value MSE (weight 1), and activations.

  ``entropy_coef > 0`` subtracts that multiple of the policy's mean entropy
  (``policy.entropy``; the reference's slippery-Ant PPO has no entropy bonus).
  """
  out, value, acts = forward(nets, params, batch["obs"])
  logp = policy.log_prob(params, out, batch["action"])
  p_loss, info = ppo.clipped_surrogate_loss(logp, batch["log_prob"], batch["advantage"], clip_eps)
  v_loss = ppo.value_loss(value, batch["return"])
  aux = {"policy_loss": p_loss, "value_loss": v_loss, "approx_kl": info.approx_kl}
  loss = p_loss + v_loss
  if entropy_coef:
    aux["entropy"] = jnp.mean(policy.entropy(out))
    loss = loss - entropy_coef * aux["entropy"]
  return loss, (acts, aux)


class _Group:
  """One optimiser structure and the methods that run in it (vmapped).

  ``env`` needs ``reset(key)``, ``observation(state, task)``,
  ``start_update(state, task, reset_state)`` and ``step(state, action, task,
  reset_state) -> (state, Transition)``, ``observation_size`` and
  ``action_size``; ``task`` is whatever `update` is given (slippery Ant: the
  friction). ``policy`` is the action distribution (`GaussianPolicy`).
  """

  def __init__(self, config, kind, methods, env, nets, graph, policy=GAUSSIAN):
    self.config, self.kind, self.methods = config, kind, methods
    self.env, self.nets, self.graph, self.policy = env, nets, graph, policy
    self.hp = _group_hparams(config, methods)

  def tx(self, hp, key):
    return make_optimizer(self.config, self.kind, hp, self.graph, key)

  def init(self, key, hp) -> Learner:
    c, env = self.config, self.env
    params = init_params(
      self.nets, jax.random.fold_in(key, 1), env.observation_size, env.action_size, self.policy
    )
    opt_state = self.tx(hp, jax.random.fold_in(key, 2)).init(params)
    env_state = jax.vmap(env.reset)(jax.random.split(jax.random.fold_in(key, 3), c["num_envs"]))
    return Learner(params, opt_state, env_state)

  def update(self, learner: Learner, hp, key, task):
    """One PPO update; returns the learner, per-update sums and the rollout's observations."""
    c, env, nets, policy = self.config, self.env, self.nets, self.policy
    params = learner.params
    k_reset, k_act, k_epochs = jax.random.split(key, 3)
    reset_states = jax.vmap(env.reset)(jax.random.split(k_reset, c["num_envs"]))

    def act_step(env_state, k):
      obs = jax.vmap(env.observation, in_axes=(0, None))(env_state, task)
      out, value, _ = forward(nets, params, obs)
      action, logp = policy.sample(params, out, k)
      env_state, tr = jax.vmap(env.step, in_axes=(0, 0, None, 0))(env_state, action, task, reset_states)
      return env_state, (tr, action, logp, value)

    start = jax.vmap(env.start_update, in_axes=(0, None, 0))(learner.env, task, reset_states)
    env_state, (tr, actions, logps, values) = jax.lax.scan(
      act_step, start, jax.random.split(k_act, c["rollout_len"])
    )
    _, next_values, _ = forward(nets, params, tr.next_obs)
    terminal = tr.terminated if c["bootstrap_truncation"] else tr.episode_end
    adv, rets = ppo.gae(
      tr.reward, values, next_values, terminal, tr.episode_end, gamma=c["gamma"], lam=c["gae_lambda"]
    )
    if c["normalize_advantages"]:
      adv = ppo.normalize_advantages(adv)
    n = steps_per_update(c)
    batch = {
      "obs": tr.obs.reshape(n, -1),
      "action": actions.reshape((n,) + actions.shape[2:]),
      "log_prob": logps.reshape(n),
      "advantage": adv.reshape(n),
      "return": rets.reshape(n),
    }

    tx = self.tx(hp, jax.random.key(0))  # The optimiser's own key lives in its state.

    def minibatch_step(carry, idx):
      params, opt_state = carry
      mb = jax.tree.map(lambda a: a[idx], batch)
      grads, (acts, aux) = jax.grad(
        lambda p: ppo_loss(nets, p, mb, c["clip_eps"], policy, c.get("entropy_coef", 0.0)), has_aux=True
      )(params)
      updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
      return (optax.apply_updates(params, updates), opt_state), aux

    def epoch(carry, k):
      idx = ppo.minibatch_indices(k, n, c["minibatches"])
      return jax.lax.scan(minibatch_step, carry, idx)

    (params, opt_state), aux = jax.lax.scan(
      epoch, (params, learner.opt_state), jax.random.split(k_epochs, c["epochs"])
    )
    sums = {
      "return_sum": jnp.sum(tr.episode_return),
      "episodes": jnp.sum(tr.episode_end),
      **{k: jnp.mean(v) for k, v in aux.items()},
    }
    return Learner(params, opt_state, env_state), sums, batch["obs"]

  def probe(self, learner: Learner, obs) -> dict[str, jax.Array]:
    """Plasticity correlates of both nets on a batch of observations."""
    c = self.config
    _, _, acts = forward(self.nets, learner.params, obs)
    hs = list(acts.values())
    units = sum(h.shape[-1] for h in hs)
    dead = sum(metrics_lib.dead_unit_fraction(h) * h.shape[-1] for h in hs) / units
    dormant = sum(metrics_lib.dormant_fraction(h, c["dormant_tau"]) * h.shape[-1] for h in hs) / units
    last = f"policy/Dense_{len(c['hidden']) - 1}"
    weights = {net: learner.params[net] for net in NETS}
    return {
      "dead_fraction": dead,
      "dormant_fraction": dormant,
      "effective_rank": metrics_lib.effective_rank(acts[last]),
      "weight_magnitude": metrics_lib.weight_magnitude(weights)["overall"],
      "replaced_units": replaced_units(self.kind, learner.opt_state),
    }


# ---------------------------------------------------------------------------
# The compiled program.
# ---------------------------------------------------------------------------


def point_metrics(
  groups: list[_Group], learners: Mapping[str, Learner], sums: Mapping[str, Any], obs: Mapping[str, jax.Array]
) -> dict[str, dict[str, jax.Array]]:
  """``{method: {name: scalar}}`` of one point: the mean return of the episodes
  that ended in it (NaN if none), their count, the plasticity correlates of
  the learners after it (`_Group.probe` on the last update's observations)
  and the PPO losses averaged over its updates.

  Args:
    groups: the method groups.
    learners, sums, obs: per group kind, the learners after the point, the
      per-update sums (leaves ``(updates, methods)``) and the observations of
      each update (``(updates, methods, batch, obs_size)``).
  """
  out = {}
  for g in groups:
    s = sums[g.kind]
    probed = jax.vmap(g.probe)(learners[g.kind], obs[g.kind][-1])
    episodes = jnp.sum(s["episodes"], axis=0)
    ret = jnp.where(episodes > 0, jnp.sum(s["return_sum"], axis=0) / jnp.maximum(episodes, 1), jnp.nan)
    for v, m in enumerate(g.methods):
      out[m] = {
        "episode_return": ret[v],
        "episodes": episodes[v],
        **{
          k: probed[k][v]
          for k in (
            "dead_fraction",
            "dormant_fraction",
            "effective_rank",
            "weight_magnitude",
            "replaced_units",
          )
        },
        **{k: jnp.mean(s[k][:, v]) for k in ("policy_loss", "value_loss", "approx_kl")},
      }
  return out


METRIC_NAMES = (
  "episode_return",
  "episodes",
  "friction",
  "phase",
  "dead_fraction",
  "dormant_fraction",
  "effective_rank",
  "weight_magnitude",
  "policy_loss",
  "value_loss",
  "approx_kl",
  "replaced_units",
)


def make_chunked(config: Mapping[str, Any], env: SlipperyAnt | None = None):
  """Per-seed ``init(key) -> carry`` and ``chunk(carry, chunk_index) -> (carry, metrics)``.

  The carry is a flat tuple of arrays (zero-size MJX leaves left out, so that
  orbax can checkpoint it). ``metrics`` is ``{label: {name: array(points_per_chunk,)}}`` (names:
  `METRIC_NAMES`). Vmap both over seed keys.
  """
  config = runner.normalize_config(config)
  EXPERIMENT.validate_config(config)
  env = env or SlipperyAnt(config["episode_length"])
  nets = make_nets(config, env.action_size)
  shapes = jax.eval_shape(
    lambda k: init_params(nets, k, env.observation_size, env.action_size), jax.random.key(0)
  )
  graph = make_graph(shapes)
  groups = [_Group(config, kind, ms, env, nets, graph) for kind, ms in method_groups(config).items()]
  upp, ppc = config["updates_per_point"], config["points_per_chunk"]

  def init(key):
    return {"key": key, "learners": {g.kind: jax.vmap(g.init, in_axes=(None, 0))(key, g.hp) for g in groups}}

  def one_update(carry, update):
    key = carry["key"]
    phase = phase_of_update(config, update)
    friction = friction_of_phase(config, key, phase)
    k = jax.random.fold_in(jax.random.fold_in(key, 4), update)  # Shared by all methods.
    learners, sums, obs = {}, {}, {}
    for g in groups:
      learners[g.kind], sums[g.kind], obs[g.kind] = jax.vmap(g.update, in_axes=(0, 0, None, None))(
        carry["learners"][g.kind], g.hp, k, friction
      )
    return {"key": key, "learners": learners}, (sums, obs, friction, phase)

  def one_point(carry, point):
    updates = point * upp + jnp.arange(upp, dtype=jnp.int32)
    carry, (sums, obs, friction, phase) = jax.lax.scan(one_update, carry, updates)
    out = point_metrics(groups, carry["learners"], sums, obs)
    out = {
      m: {
        k: {**out[m], "friction": friction[-1], "phase": phase[-1]}[k].astype(jnp.float32)
        for k in METRIC_NAMES
      }
      for m in config["methods"]
    }
    return carry, out

  chunk = runner.scan_points(one_point, ppc)

  # The MJX data hold zero-size arrays (absent constraint types), which orbax
  # refuses to checkpoint: the carry the runner sees is the tuple of the
  # non-empty leaves; the empty ones are rebuilt from their static shapes.
  abstract = jax.eval_shape(init, jax.random.key(0))
  leaves, treedef = jax.tree.flatten(abstract)
  empty = {i: (leaf.shape, leaf.dtype) for i, leaf in enumerate(leaves) if leaf.size == 0}

  def pack(carry):
    return tuple(x for i, x in enumerate(jax.tree.leaves(carry)) if i not in empty)

  def unpack(packed):
    it = iter(packed)
    return jax.tree.unflatten(
      treedef, [jnp.zeros(*empty[i]) if i in empty else next(it) for i in range(len(leaves))]
    )

  def packed_init(key):
    return pack(init(key))

  def packed_chunk(packed, chunk_index):
    carry, metrics = chunk(unpack(packed), chunk_index)
    return pack(carry), metrics

  return packed_init, packed_chunk


def phase_returns(results: Mapping[str, Any], tail: float = 0.5) -> dict[str, np.ndarray]:
  """``{label: (seeds, phases)}``: mean episode return over the last ``tail``
  fraction of each friction phase's points (NaN where a phase has none)."""
  out = {}
  for label, named in results["metrics"].items():
    ret = np.asarray(named["episode_return"], np.float64)
    phase = np.asarray(named["phase"], np.float64)[0]
    phases = np.unique(phase[np.isfinite(phase)]).astype(int)
    table = np.full((ret.shape[0], len(phases)), np.nan)
    for j, p in enumerate(phases):
      cols = np.flatnonzero(phase == p)
      cols = cols[int(len(cols) * (1 - tail)) :] if len(cols) > 1 else cols
      with np.errstate(all="ignore"), _quiet():
        table[:, j] = np.nanmean(ret[:, cols], axis=1)
    out[label] = table
  return out


class _quiet:
  def __enter__(self):
    import warnings

    self._w = warnings.catch_warnings()
    self._w.__enter__()
    warnings.simplefilter("ignore", RuntimeWarning)

  def __exit__(self, *a):
    self._w.__exit__(*a)


def format_summary(results: Mapping[str, Any]) -> str:
  """Per method: mean return (second half of each phase) per friction phase, and
  the final correlates."""
  table = phase_returns(results)
  first = next(iter(results["metrics"].values()))
  phase = np.asarray(first["phase"], np.float64)[0]
  fr = np.asarray(first["friction"], np.float64)
  frictions = [float(fr[0][np.flatnonzero(phase == p)[0]]) for p in np.unique(phase)]
  w = max([len("method")] + [len(k) for k in table])
  head = "  ".join(f"ph{j}({f:.2f})".rjust(11) for j, f in enumerate(frictions))
  lines = [
    f"{'method':<{w}}  {head}  {'dead':>6}  {'dormant':>7}  {'eff.rank':>8}  {'|w|':>6}  {'replaced':>8}"
  ]
  for label, t in table.items():
    named = results["metrics"][label]
    last = {
      k: float(np.nanmean(np.asarray(named[k], np.float64)[:, -1]))
      for k in ("dead_fraction", "dormant_fraction", "effective_rank", "weight_magnitude", "replaced_units")
    }
    with _quiet():
      row = "  ".join(f"{v:11.1f}" for v in np.nanmean(t, axis=0))
    lines.append(
      f"{label:<{w}}  {row}  {last['dead_fraction']:6.3f}  "
      f"{last['dormant_fraction']:7.3f}  {last['effective_rank']:8.1f}  "
      f"{last['weight_magnitude']:6.4f}  {last['replaced_units']:8.0f}"
    )
  return "\n".join(lines)


def plot_results(results: Mapping[str, Any] | str | Path, out_dir: str | Path) -> list[Path]:
  """``slippery_ant.png`` (return and correlates over steps, phase changes
  marked) and ``phases.png`` (mean return per friction phase)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  if not isinstance(results, Mapping):
    results = runner.load_results(results)
  out_dir = Path(out_dir)
  paths = [
    runner.plot_results(
      results,
      out_dir / "slippery_ant.png",
      metrics=("episode_return", "dead_fraction", "effective_rank", "weight_magnitude"),
      title=f"slippery Ant, PPO ({runner.BAND_LABEL} over {results['config']['seeds']} seeds)",
    )
  ]
  table = phase_returns(results)
  first = next(iter(results["metrics"].values()))
  phase = np.asarray(first["phase"], np.float64)[0]
  fr = np.asarray(first["friction"], np.float64)[0]
  frictions = [fr[np.flatnonzero(phase == p)[0]] for p in np.unique(phase)]
  fig, ax = plt.subplots(figsize=(7, 3.4))
  for i, (label, t) in enumerate(table.items()):
    mean, se = runner.mean_and_stderr(t)
    xs = np.arange(len(mean))
    ax.errorbar(
      xs + 0.08 * (i - len(table) / 2),
      mean,
      yerr=se,
      marker="o",
      ms=3,
      capsize=2,
      color=f"C{i % 10}",
      label=label,
    )
  ax.set_xticks(range(len(frictions)), [f"{j}\n{f:.2f}" for j, f in enumerate(frictions)], fontsize=7)
  ax.set_xlabel("friction phase (friction)")
  ax.set_ylabel("episode return (2nd half of phase)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  path = out_dir / "phases.png"
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return paths + [path]


def benchmark(config: Mapping[str, Any], *, chunks: int = 2) -> dict[str, float]:
  """Environment steps per second of ``config`` (all methods, seeds), after compiling
  (`env_steps_benchmark`)."""
  return env_steps_benchmark(make_batched, make_config(config), chunks=chunks)


def env_steps_benchmark(make_batched, config: Mapping[str, Any], *, chunks: int = 2) -> dict[str, float]:
  """Environment steps per second of a PPO experiment's compiled chunk
  (`experiments.runner.time_chunks`; ``config`` complete).

  Returns ``{"compile_s", "seconds_per_chunk", "env_steps_per_s"}`` where
  ``env_steps_per_s`` counts every method's and seed's steps.
  """
  compile_s, per = runner.time_chunks(make_batched, config, chunks=chunks)
  work = steps_per_chunk(config) * config["seeds"] * len(config["methods"])
  return {"compile_s": compile_s, "seconds_per_chunk": per, "env_steps_per_s": work / per}


# ---------------------------------------------------------------------------
# The experiment: the protocol runs it (configs, CLI, chunked run, results).
# ---------------------------------------------------------------------------


def _add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument(
    "--benchmark",
    action="store_true",
    help="print environment steps/s (PPO alone and PPO+CBP alone) and exit",
  )


def _benchmark_command(args: argparse.Namespace, config: Mapping[str, Any], _) -> int | None:
  """``--benchmark``: environment steps/s of PPO alone and PPO+CBP alone; None without it."""
  if not args.benchmark:
    return None
  for methods in (["ppo"], ["cbp"]):
    b = benchmark({**config, "methods": methods})
    print(
      f"{'+'.join(methods)}: {b['env_steps_per_s']:,.0f} env steps/s "
      f"({config['seeds']} seeds, {b['seconds_per_chunk']:.1f} s per chunk of "
      f"{steps_per_chunk(config):,} steps/run, compile {b['compile_s']:.0f} s)"
    )
  return 0


PPO_FLAGS = (
  protocol.flag("--steps", "total_steps", type=int, help="environment steps per run (rounded up to chunks)"),
  protocol.flag("--change-every", "change_every", type=int, help="environment steps between task changes"),
  protocol.flag("--num-envs", "num_envs", type=int),
  protocol.flag("--rollout-len", "rollout_len", type=int),
  protocol.flag("--updates-per-point", "updates_per_point", type=int),
  protocol.flag(
    "--points-per-chunk",
    "points_per_chunk",
    type=int,
    help="metric points per compiled chunk: progress/partial-results/checkpoint granularity",
  ),
)


def ppo_experiment(**kwargs: Any) -> protocol.Experiment:
  """The protocol declaration of a PPO experiment on this learner (points of
  ``updates_per_point`` updates; ``x`` counts environment steps)."""
  return protocol.Experiment(
    points_per_chunk="points_per_chunk",
    x_label="environment steps",
    x_step=lambda c: steps_per_update(c) * c["updates_per_point"],
    work_per_run_chunk=steps_per_chunk,
    work_label="env-steps",
    squeeze_single=False,
    **kwargs,
  )


EXPERIMENT = ppo_experiment(
  name="slippery_ant",
  short="slippery_ant",
  title="Slippery Ant: PPO with and without CBP on Brax/MJX, compiled and vmapped.",
  defaults=DEFAULT_CONFIG,
  methods=METHODS,
  make_chunked=make_chunked,
  num_chunks=num_chunks,
  validate=validate_config,
  summary=format_summary,
  plot=plot_results,
  plots=("slippery_ant.png", "phases.png"),
  run_info=lambda m, hp: {"description": DESCRIPTIONS[m]},
  presets={
    "paper": (
      "the paper's run: 30 seeds x 50M steps, friction every 2M, one env with 2048-step rollouts",
      PAPER_OVERRIDES,
    )
  },
  flags=PPO_FLAGS,
  add_arguments=_add_arguments,
  command=_benchmark_command,
  describe=lambda c, _: (
    f"slippery ant: {c['seeds']} seeds x "
    f"{num_chunks(c) * steps_per_chunk(c):,} steps, friction every "
    f"{c['change_every']:,}, runs {', '.join(EXPERIMENT.run_labels(c))}"
  ),
)

(make_config, run_labels, make_train, make_batched, run_experiment, parse_args, config_from_args, main) = (
  EXPERIMENT.entry_points()
)


if __name__ == "__main__":
  sys.exit(main())
