"""Continual MinAtar: PPO with and without CBP on a stream of gymnax games, whole run compiled.

The problem
-----------
* Environments: gymnax's MinAtar games (``gymnax`` 1.0.1, JAX-native, the
  ``minatar`` extra), 10x10 grids with 4-10 binary channels.
* Tasks: one shared network plays a cycle of ``games`` (the game-switching
  protocol of Abbas et al., "Loss of plasticity in continual deep
  reinforcement learning", CoLLAs 2023), optionally each under
  ``permutations`` fixed observation permutations. Task ``i`` of the cycle
  is game ``i % len(games)`` under permutation ``i // len(games)``
  (permutation 0 is the identity, the others a seed's own random permutation
  of the observation vector); ``num_tasks = len(games) * permutations``. The
  task changes every ``change_every`` environment steps (at the first update
  boundary at or after each multiple) and the cycle repeats, so every task is
  revisited: **phase** ``p`` (the ``p``-th task period) plays task
  ``p % num_tasks``. All environments restart their episodes when the task
  changes (the unfinished episodes of the old task are not counted).
* Shared interface: every game takes MinAtar's full action set (6 actions:
  no-op, left, up, right, down, fire; a game ignores the ones it does not
  use, as in Abbas et al.), and observations are padded with empty channels
  to the largest channel count of ``games`` and flattened (``100 * channels``
  inputs). The game runs as data: a `jax.lax.switch` on the task's game
  index, which is the same for every seed and method (it depends on the
  update index only), so under `jax.vmap` it stays a branch and each step
  runs one game.
* Agent: the experiments' PPO (`experiments.slippery_ant`'s learner, whose
  pieces are `experiments.ppo`) with a categorical policy head
  (`CategoricalPolicy`) and the usual PPO settings of JAX PPO on MinAtar
  (purejaxrl/cleanrl style): ReLU MLPs ``hidden`` (policy and value nets,
  `lecun` init), GAE (0.99, 0.95), advantages normalised, clipped surrogate
  (0.2) + value MSE - 0.01 entropy, gradients clipped to global norm 0.5,
  Adam lr 5e-4, no learning-rate annealing (the stream has no end).
  Episodes are truncated at ``episode_length`` steps and bootstrap from their
  last observation.
* Methods: ``ppo`` (Adam), ``l2`` (Adam + weight decay 1e-3, PyTorch style),
  ``cbp`` (CBP + L2 1e-4: `cbp_jax.cbp` wrapping the Adam chain, contribution
  utility, replacement rate 1e-4 per minibatch step, maturity 100 minibatch
  steps: the Ant's rate, a maturity this short run reaches), ``redo``
  (`cbp_jax.methods.redo`, tau 0.1 every 100 minibatch steps, L2 1e-4). CBP
  and ReDo run after every minibatch update on its activations, as in
  slippery Ant; `ppo` and `l2` share CBP's structure with rate 0 (plain Adam).
  All methods of one seed share initial weights, permutations, episode keys
  and minibatch orders (paired comparison); seed ``i`` uses
  ``fold_in(key(seed), i)``.

Recorded per point (``updates_per_point`` updates): ``episode_return`` (mean
return of the episodes that ended in it; NaN if none), ``episodes``,
``phase``, ``task``, ``game``, and the plasticity correlates of slippery Ant
(``dead_fraction``, ``dormant_fraction``, ``effective_rank`` of the policy's
last hidden layer, ``weight_magnitude``, cumulative ``replaced_units``) and
the PPO losses. Per task: `task_returns` (mean return in the second half of
each phase, by task and visit).

Usage::

  python -m experiments.continual_minatar --out results/continual_minatar     # reduced (8 seeds)
  python -m experiments.continual_minatar --out results/continual_minatar --resume
  python -m experiments.continual_minatar --benchmark 32,128        # env steps/s, PPO and PPO+CBP
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments import protocol, runner
from experiments import slippery_ant as learner_lib

GAMES = ("Asterix", "Breakout", "Freeway", "SpaceInvaders", "Seaquest")
FULL_ACTIONS = 6  # MinAtar's full action set: n, l, u, r, d, f.
METHODS = ("ppo", "l2", "cbp", "redo")
DESCRIPTIONS = {"ppo": "PPO", "l2": "PPO+L2", "cbp": "PPO+CBP+L2", "redo": "PPO+ReDo+L2"}

_ADAM = {"step_size": 5e-4, "b1": 0.9, "b2": 0.999, "eps": 1e-8}
HPARAMS: dict[str, dict[str, Any]] = {
  "ppo": {**_ADAM, "weight_decay": 0.0},
  "l2": {**_ADAM, "weight_decay": 1e-3},
  "cbp": {
    **_ADAM,
    "weight_decay": 1e-4,
    "replacement_rate": 1e-4,
    "maturity_threshold": 100,
    "decay_rate": 0.99,
    "utility": "contribution",
    "init": "lecun",
    "accumulate": True,
    "next_bias_correction": True,
  },
  "redo": {**_ADAM, "weight_decay": 1e-4, "tau": 0.1, "period": 100, "init": "lecun"},
}

# The reduced configuration (the pilot in README chose it): the two games
# PPO learns fastest here (Breakout and Space Invaders; Asterix did not move
# in 100k steps), alternating every 16,384 steps (32 updates), 8 phases, so
# each game is visited 4 times; four methods, 8 seeds (29 min on the shared
# 2-core machine at load 15-25; --seeds 32 is 4x the work).
DEFAULT_CONFIG: dict[str, Any] = {
  "seed": 0,
  "seeds": 8,
  "games": ["Breakout", "SpaceInvaders"],
  "permutations": 1,
  "total_steps": 131_072,  # environment steps per run (rounded up to whole chunks)
  "change_every": 16_384,  # environment steps per task
  "num_envs": 8,
  "rollout_len": 64,  # steps_per_update = 512
  "epochs": 4,
  "minibatches": 4,
  "gamma": 0.99,
  "gae_lambda": 0.95,
  "clip_eps": 0.2,
  "entropy_coef": 0.01,
  "max_grad_norm": 0.5,
  "normalize_advantages": True,
  "bootstrap_truncation": True,
  "hidden": [64, 64],
  "episode_length": 1000,
  "updates_per_point": 4,
  "points_per_chunk": 8,
  "dormant_tau": 0.1,
  "methods": list(METHODS),
  "hparams": HPARAMS,
  "sweep": {},
}

# A tiny smoke configuration (tests, `--tiny`).
TINY_OVERRIDES: dict[str, Any] = {
  "seeds": 2,
  "total_steps": 1024,
  "change_every": 256,
  "num_envs": 4,
  "rollout_len": 16,
  "epochs": 1,
  "minibatches": 2,
  "hidden": [8, 8],
  "updates_per_point": 2,
  "points_per_chunk": 4,
  "episode_length": 40,
  "hparams": {"cbp": {"replacement_rate": 0.05, "maturity_threshold": 1}, "redo": {"period": 2}},
}


# ---------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------


def validate_config(c: Mapping[str, Any]) -> None:
  """Raises ValueError naming the first inconsistent entry (the common entries
  are checked by the protocol)."""
  need = runner.require
  runner.require_positive_ints(c, learner_lib.LEARNER_INTS + ("permutations",))
  need(
    isinstance(c["games"], (list, tuple)) and len(c["games"]) >= 1 and all(g in GAMES for g in c["games"]),
    f"games must be a non-empty list from {list(GAMES)}, got {c['games']}",
  )
  learner_lib.validate_learner(c, HPARAMS)


steps_per_update = learner_lib.steps_per_update
updates_per_chunk = learner_lib.updates_per_chunk
steps_per_chunk = learner_lib.steps_per_chunk
num_chunks = learner_lib.num_chunks


def num_tasks(config: Mapping[str, Any]) -> int:
  return len(config["games"]) * config["permutations"]


# ---------------------------------------------------------------------------
# The task schedule.
# ---------------------------------------------------------------------------


class Task(NamedTuple):
  """What an update plays: its phase, task, game and observation permutation."""

  phase: jax.Array  # int32: the task period the update is in (0, 1, 2, ...)
  index: jax.Array  # int32: phase % num_tasks
  game: jax.Array  # int32: index into config["games"]
  permutation: jax.Array  # int32 (observation_size,): the agent sees obs[permutation]


def phase_of_update(config: Mapping[str, Any], update: jax.Array) -> jax.Array:
  """Task period of update ``update`` (0-based): the period holding its first step."""
  return (jnp.asarray(update, jnp.int32) * steps_per_update(config)) // config["change_every"]


def permutation_of(config: Mapping[str, Any], key: jax.Array, index: jax.Array, size: int) -> jax.Array:
  """The seed's observation permutation ``index`` (0: the identity)."""
  drawn = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(key, 5), index), size)
  return jnp.where(index == 0, jnp.arange(size), drawn).astype(jnp.int32)


def task_of_update(
  config: Mapping[str, Any], key: jax.Array, update: jax.Array, observation_size: int
) -> Task:
  """The task update ``update`` of seed ``key`` plays (see the module docstring)."""
  phase = phase_of_update(config, update)
  index = phase % num_tasks(config)
  games = len(config["games"])
  return Task(
    phase=phase,
    index=index,
    game=index % games,
    permutation=permutation_of(config, key, index // games, observation_size),
  )


# ---------------------------------------------------------------------------
# The environment: MinAtar games behind one interface.
# ---------------------------------------------------------------------------


class EnvState(NamedTuple):
  """One environment: every game's gymnax state, the task it plays, the
  episode's step and return, and its key for the games' randomness."""

  games: tuple
  task: jax.Array
  t: jax.Array
  ret: jax.Array
  key: jax.Array


def _gymnax():
  try:
    import gymnax
  except ImportError as e:
    raise ImportError(
      "continual_minatar needs gymnax: pip install -e .[minatar] (gymnax 1.0.1; see README)"
    ) from e
  return gymnax


class MinAtarStream:
  """``games`` (gymnax MinAtar, full action set) with observations padded to one
  size and flattened, the game and permutation chosen by a `Task` (data).

  Episodes end at a game's terminal state or after ``episode_length`` steps;
  `step` then swaps in the ``reset_state`` it is given (auto-reset), and
  `start_update` restarts every episode when the task has changed.
  """

  def __init__(self, games: tuple[str, ...] | list[str], episode_length: int = 1000):
    gymnax = _gymnax()
    self.games = tuple(games)
    made = [gymnax.make(f"{g}-MinAtar", use_minimal_action_set=False) for g in self.games]
    self.envs = [env for env, _ in made]
    self.params = [params for _, params in made]
    self.channels = max(env.obs_shape[-1] for env in self.envs)
    self.episode_length = episode_length
    self.observation_size = 10 * 10 * self.channels
    self.action_size = FULL_ACTIONS

  def _flat(self, obs: jax.Array) -> jax.Array:
    pad = self.channels - obs.shape[-1]
    return jnp.pad(obs.astype(jnp.float32), ((0, 0), (0, 0), (0, pad))).reshape(-1)

  def _observe(self, g: int, games: tuple) -> jax.Array:
    return self._flat(self.envs[g].get_obs(games[g]))

  def raw_observation(self, state: EnvState, game: jax.Array) -> jax.Array:
    """Game ``game``'s padded, flattened observation (not permuted)."""
    return jax.lax.switch(
      game, [functools.partial(self._observe, g) for g in range(len(self.games))], state.games
    )

  def observation(self, state: EnvState, task: Task) -> jax.Array:
    return self.raw_observation(state, task.game)[task.permutation]

  def reset(self, key: jax.Array) -> EnvState:
    """Fresh episodes of every game; ``task`` -1 (no task yet)."""
    games = tuple(
      env.reset_env(jax.random.fold_in(key, g), params)[1]
      for g, (env, params) in enumerate(zip(self.envs, self.params))
    )
    return EnvState(
      games=games,
      task=jnp.full((), -1, jnp.int32),
      t=jnp.zeros((), jnp.int32),
      ret=jnp.zeros((), jnp.float32),
      key=jax.random.fold_in(key, len(self.games)),
    )

  def start_update(self, state: EnvState, task: Task, reset_state: EnvState) -> EnvState:
    """``state``, or ``reset_state`` if ``state`` played another task."""
    fresh = state.task != task.index
    state = jax.tree.map(lambda r, s: jnp.where(fresh, r, s), reset_state, state)
    return state._replace(task=task.index)

  def step(
    self, state: EnvState, action: jax.Array, task: Task, reset_state: EnvState
  ) -> tuple[EnvState, learner_lib.Transition]:
    """One step of the task's game; auto-resets to ``reset_state`` at an episode's end."""
    k_step, k_next = jax.random.split(state.key)

    def play(g, games):
      obs, s, reward, terminated, _ = self.envs[g].step_env(k_step, games[g], action, self.params[g])
      return (
        games[:g] + (s,) + games[g + 1 :],
        self._flat(obs),
        jnp.asarray(reward, jnp.float32),
        jnp.asarray(terminated, jnp.bool_),
      )

    games, next_obs, reward, terminated = jax.lax.switch(
      task.game, [functools.partial(play, g) for g in range(len(self.games))], state.games
    )
    t = state.t + 1
    ret = state.ret + reward
    end = terminated | (t >= self.episode_length)
    tr = learner_lib.Transition(
      obs=self.observation(state, task),
      next_obs=next_obs[task.permutation],
      reward=reward,
      terminated=terminated.astype(jnp.float32),
      episode_end=end.astype(jnp.float32),
      episode_return=jnp.where(end, ret, 0.0),
    )
    new = EnvState(games=games, task=state.task, t=t, ret=ret, key=k_next)
    new = jax.tree.map(lambda r, n: jnp.where(end, r, n), reset_state, new)
    return new._replace(task=state.task, key=k_next), tr


# ---------------------------------------------------------------------------
# The policy head.
# ---------------------------------------------------------------------------


class CategoricalPolicy:
  """A softmax policy over the policy net's outputs (the logits)."""

  def extra_params(self, action_size: int) -> dict:
    del action_size
    return {}

  def sample(self, params, logits: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(action, log_prob)``, actions int32."""
    del params
    action = jax.random.categorical(key, logits).astype(jnp.int32)
    return action, self.log_prob(None, logits, action)

  def log_prob(self, params, logits: jax.Array, action: jax.Array) -> jax.Array:
    del params
    logp = jax.nn.log_softmax(logits)
    return jnp.take_along_axis(logp, action[..., None].astype(jnp.int32), axis=-1)[..., 0]

  def entropy(self, logits: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


CATEGORICAL = CategoricalPolicy()


# ---------------------------------------------------------------------------
# The compiled program.
# ---------------------------------------------------------------------------


METRIC_NAMES = (
  "episode_return",
  "episodes",
  "phase",
  "task",
  "game",
  "dead_fraction",
  "dormant_fraction",
  "effective_rank",
  "weight_magnitude",
  "policy_loss",
  "value_loss",
  "approx_kl",
  "replaced_units",
)


def make_chunked(config: Mapping[str, Any], env: MinAtarStream | None = None):
  """Per-seed ``init(key) -> carry`` and ``chunk(carry, chunk_index) -> (carry, metrics)``.

  ``metrics`` is ``{label: {name: array(points_per_chunk,)}}`` (names:
  `METRIC_NAMES`). Vmap both over seed keys.
  """
  config = runner.normalize_config(config)
  EXPERIMENT.validate_config(config)
  env = env or MinAtarStream(config["games"], config["episode_length"])
  nets = learner_lib.make_nets(config, env.action_size)
  shapes = jax.eval_shape(
    lambda k: learner_lib.init_params(nets, k, env.observation_size, env.action_size, CATEGORICAL),
    jax.random.key(0),
  )
  graph = learner_lib.make_graph(shapes)
  groups = [
    learner_lib._Group(config, kind, ms, env, nets, graph, CATEGORICAL)
    for kind, ms in learner_lib.method_groups(config).items()
  ]
  upp = config["updates_per_point"]

  def init(key):
    return {"key": key, "learners": {g.kind: jax.vmap(g.init, in_axes=(None, 0))(key, g.hp) for g in groups}}

  def one_update(carry, update):
    key = carry["key"]
    task = task_of_update(config, key, update, env.observation_size)
    k = jax.random.fold_in(jax.random.fold_in(key, 4), update)  # Shared by all methods.
    learners, sums, obs = {}, {}, {}
    for g in groups:
      learners[g.kind], sums[g.kind], obs[g.kind] = jax.vmap(g.update, in_axes=(0, 0, None, None))(
        carry["learners"][g.kind], g.hp, k, task
      )
    return {"key": key, "learners": learners}, (sums, obs, task)

  def one_point(carry, point):
    updates = point * upp + jnp.arange(upp, dtype=jnp.int32)
    carry, (sums, obs, task) = jax.lax.scan(one_update, carry, updates)
    out = learner_lib.point_metrics(groups, carry["learners"], sums, obs)
    schedule = {"phase": task.phase[-1], "task": task.index[-1], "game": task.game[-1]}
    out = {
      m: {k: {**out[m], **schedule}[k].astype(jnp.float32) for k in METRIC_NAMES} for m in config["methods"]
    }
    return carry, out

  return init, runner.scan_points(one_point, config["points_per_chunk"])


seed_keys = runner.seed_keys


# ---------------------------------------------------------------------------
# Running, summaries, plots.
# ---------------------------------------------------------------------------


def task_returns(results: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """``({label: (seeds, phases)}, task_of_phase)``: mean return in the second half
  of each phase (`experiments.slippery_ant.phase_returns`) and the task each
  phase played."""
  table = learner_lib.phase_returns(results)
  first = next(iter(results["metrics"].values()))
  phase = np.asarray(first["phase"], np.float64)[0]
  task = np.asarray(first["task"], np.float64)[0]
  return table, np.asarray([task[np.flatnonzero(phase == p)[0]] for p in np.unique(phase)], int)


def task_name(config: Mapping[str, Any], task: int) -> str:
  games = config["games"]
  name = games[task % len(games)]
  return name if config["permutations"] == 1 else f"{name}/p{task // len(games)}"


def format_summary(results: Mapping[str, Any]) -> str:
  """Per method: mean return per phase (second half), the first and last visit
  of each task, and the final plasticity correlates."""
  table, tasks = task_returns(results)
  config = results["config"]
  w = max([len("method")] + [len(k) for k in table])
  lines = ["mean return in the second half of each phase (task in brackets):"]
  lines.append(
    f"{'method':<{w}}  "
    + "  ".join(f"{j}[{task_name(config, t)[:6]}]".rjust(11) for j, t in enumerate(tasks))
  )
  for label, t in table.items():
    with learner_lib._quiet():
      lines.append(f"{label:<{w}}  " + "  ".join(f"{v:11.2f}" for v in np.nanmean(t, axis=0)))
  lines.append(
    f"{'method':<{w}}  {'dead':>6}  {'dormant':>7}  {'eff.rank':>8}  {'|w|':>6}  "
    f"{'replaced':>8}   (last point, mean over seeds)"
  )
  for label in table:
    named = results["metrics"][label]
    last = {
      k: float(np.nanmean(np.asarray(named[k], np.float64)[:, -1]))
      for k in ("dead_fraction", "dormant_fraction", "effective_rank", "weight_magnitude", "replaced_units")
    }
    lines.append(
      f"{label:<{w}}  {last['dead_fraction']:6.3f}  {last['dormant_fraction']:7.3f}  "
      f"{last['effective_rank']:8.1f}  {last['weight_magnitude']:6.4f}  "
      f"{last['replaced_units']:8.0f}"
    )
  return "\n".join(lines)


def plot_results(results: Mapping[str, Any] | str | Path, out_dir: str | Path) -> list[Path]:
  """``continual_minatar.png`` (return and correlates over steps) and
  ``tasks.png`` (return per task at each visit, one panel per task)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  if not isinstance(results, Mapping):
    results = runner.load_results(results)
  out_dir = Path(out_dir)
  config = results["config"]
  paths = [
    runner.plot_results(
      results,
      out_dir / "continual_minatar.png",
      metrics=("episode_return", "dead_fraction", "effective_rank", "weight_magnitude"),
      title=f"continual MinAtar ({' / '.join(config['games'])}), PPO "
      f"(mean +- s.e. over {config['seeds']} seeds)",
    )
  ]
  table, tasks = task_returns(results)
  ids = sorted(set(tasks.tolist()))
  fig, axes = plt.subplots(1, len(ids), figsize=(3.6 * len(ids), 3.2), squeeze=False)
  for ax, t in zip(axes[0], ids):
    cols = np.flatnonzero(tasks == t)
    for i, (label, tab) in enumerate(table.items()):
      mean, se = runner.mean_and_stderr(tab[:, cols])
      ax.errorbar(
        np.arange(len(cols)) + 0.05 * (i - len(table) / 2),
        mean,
        yerr=se,
        marker="o",
        ms=3,
        capsize=2,
        color=f"C{i % 10}",
        label=label,
      )
    ax.set_title(task_name(config, t), fontsize=9)
    ax.set_xlabel("visit")
    ax.set_xticks(range(len(cols)))
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("episode return (2nd half of visit)")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  path = out_dir / "tasks.png"
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return paths + [path]


def benchmark(config: Mapping[str, Any], *, chunks: int = 2) -> dict[str, float]:
  """Environment steps per second of ``config`` (all methods and seeds), after compiling:
  ``{"compile_s", "seconds_per_chunk", "env_steps_per_s"}``
  (`experiments.slippery_ant.env_steps_benchmark`)."""
  return learner_lib.env_steps_benchmark(make_batched, make_config(config), chunks=chunks)


# ---------------------------------------------------------------------------
# The experiment: the protocol runs it (configs, CLI, chunked run, results).
# ---------------------------------------------------------------------------


def _add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument(
    "--benchmark",
    type=runner.parse_ints,
    metavar="SEEDS,...",
    help="print environment steps/s of PPO alone and PPO+CBP alone at each of "
    "these seed counts (e.g. 32,128), one chunk of --points-per-chunk points "
    "each after compiling, and exit",
  )


def _benchmark_command(args: argparse.Namespace, config: Mapping[str, Any], _) -> int | None:
  """``--benchmark SEEDS,...``: environment steps/s of PPO alone and PPO+CBP alone
  at each seed count; None without it."""
  if not args.benchmark:
    return None
  for seeds in args.benchmark:
    for methods in (["ppo"], ["cbp"]):
      b = benchmark({**config, "seeds": seeds, "methods": methods}, chunks=1)
      print(
        f"{DESCRIPTIONS[methods[0]]}: {b['env_steps_per_s']:,.0f} env steps/s "
        f"({seeds} seeds, {b['seconds_per_chunk']:.1f} s per chunk of "
        f"{steps_per_chunk(config):,} steps/run, compile {b['compile_s']:.0f} s)",
        flush=True,
      )
  return 0


def _describe(config: Mapping[str, Any], _) -> str:
  return (
    f"continual MinAtar: {config['seeds']} seeds x "
    f"{num_chunks(config) * steps_per_chunk(config):,} steps, tasks "
    f"{[task_name(config, t) for t in range(num_tasks(config))]} every "
    f"{config['change_every']:,} steps, runs {', '.join(EXPERIMENT.run_labels(config))}"
  )


EXPERIMENT = learner_lib.ppo_experiment(
  name="continual_minatar",
  short="continual_minatar",
  title="Continual MinAtar: PPO with and without CBP on a cycle of gymnax games.",
  defaults=DEFAULT_CONFIG,
  methods=METHODS,
  make_chunked=make_chunked,
  num_chunks=num_chunks,
  validate=validate_config,
  summary=format_summary,
  plot=plot_results,
  plots=("continual_minatar.png", "tasks.png"),
  run_info=lambda m, hp: {"description": DESCRIPTIONS[m]},
  presets={"tiny": ("a seconds-long smoke run", TINY_OVERRIDES)},
  flags=(
    protocol.flag(
      "--games", "games", type=runner.split_names, help=f"comma-separated, from {','.join(GAMES)}"
    ),
    protocol.flag(
      "--permutations", "permutations", type=int, help="observation permutations per game (1: none)"
    ),
    *learner_lib.PPO_FLAGS,
  ),
  add_arguments=_add_arguments,
  command=_benchmark_command,
  describe=_describe,
)

(make_config, run_labels, make_train, make_batched, run_experiment, parse_args, config_from_args, main) = (
  EXPERIMENT.entry_points()
)


if __name__ == "__main__":
  sys.exit(main())
