"""Continual MinAtar: the task schedule, the game switch reaching the environments, the
categorical head, a tiny run, resume bit for bit, and independent vmapped seeds.

Needs gymnax (pyproject's `minatar` extra: `pip install -e .[minatar]`); skipped with the reason
when it is not importable.
"""

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("gymnax", reason="gymnax is not installed: continual MinAtar needs it")

from experiments import continual_minatar as cm  # noqa: E402
from experiments import runner  # noqa: E402
from tests.resume_checks import (  # noqa: E402
  assert_interrupt_and_resume_is_bit_for_bit,
  assert_resume_after_sigkill_is_bit_for_bit,
)

GAMES = ["Breakout", "SpaceInvaders"]


@pytest.fixture(scope="module")
def env():
  return cm.MinAtarStream(GAMES, episode_length=30)


def test_task_schedule_by_hand():
  """2 games x 2 permutations, tasks every 100 steps, 48-step updates: the task of
  each update is the one holding its first step, cycling 0, 1, 2, 3, 0, ..."""
  c = cm.make_config(games=GAMES, permutations=2, num_envs=4, rollout_len=12, minibatches=4, change_every=100)
  assert cm.num_tasks(c) == 4
  key, size = jax.random.key(3), 600
  tasks = [cm.task_of_update(c, key, jnp.int32(u), size) for u in range(20)]
  # First steps 0, 48, 96, 144, ...: phase = first_step // 100.
  phases = [(u * 48) // 100 for u in range(20)]
  assert [int(t.phase) for t in tasks] == phases
  assert [int(t.index) for t in tasks] == [p % 4 for p in phases]
  assert [int(t.game) for t in tasks] == [p % 4 % 2 for p in phases]
  by_task = {}
  for t in tasks:
    perm = np.asarray(t.permutation)
    assert sorted(perm.tolist()) == list(range(size))  # a permutation
    if int(t.index) < 2:
      np.testing.assert_array_equal(perm, np.arange(size))  # permutation 0: identity
    else:
      assert np.mean(perm == np.arange(size)) < 0.05
    # A task keeps its permutation whenever it comes back.
    np.testing.assert_array_equal(by_task.setdefault(int(t.index), perm), perm)
  np.testing.assert_array_equal(by_task[2], by_task[3])  # one permutation per index
  other = cm.task_of_update(c, jax.random.key(4), jnp.int32(5), size)
  assert int(other.index) == 2 and not np.array_equal(np.asarray(other.permutation), by_task[2])


def test_the_active_game_is_the_one_stepped(env):
  """The task's game index picks the game: only its state moves, its observation
  (padded to 6 channels, permuted) is what the agent sees, and a new task restarts
  every episode."""
  assert env.channels == 6 and env.observation_size == 600 and env.action_size == 6
  s0 = env.start_update(env.reset(jax.random.key(0)), _task(0, 0), env.reset(jax.random.key(1)))
  reset = env.reset(jax.random.key(2))
  step = jax.jit(env.step)
  breakout, space = step(s0, jnp.int32(3), _task(0, 0), reset), step(s0, jnp.int32(3), _task(1, 1), reset)
  for played, (new, tr) in ((0, breakout), (1, space)):
    idle = 1 - played
    assert _same(new.games[idle], s0.games[idle])  # the other game did not move
    assert not _same(new.games[played], s0.games[played])
    assert int(new.t) == 1
    obs = np.asarray(tr.next_obs).reshape(10, 10, 6)
    raw = np.asarray(env.envs[played].get_obs(new.games[played]))
    np.testing.assert_array_equal(obs[..., : raw.shape[-1]], raw)
    assert not obs[..., raw.shape[-1] :].any()  # padding channels are empty
  # Breakout: "right" (3) moves the paddle from column 4 to 5.
  assert int(breakout[0].games[0].pos) == 5
  # A permuted task: the agent sees the observation's entries permuted.
  perm = jax.random.permutation(jax.random.key(7), 600).astype(jnp.int32)
  np.testing.assert_array_equal(
    env.observation(s0, _task(0, 0, perm)), np.asarray(env.observation(s0, _task(0, 0)))[np.asarray(perm)]
  )
  # start_update: same task keeps the state, another task starts from the reset state.
  kept = env.start_update(breakout[0], _task(0, 0), reset)
  assert _same(kept, breakout[0])
  fresh = env.start_update(breakout[0], _task(1, 1), reset)
  assert int(fresh.task) == 1 and int(fresh.t) == 0 and _same(fresh.games, reset.games)


def test_episodes_end_and_auto_reset(env):
  """Episodes end at a terminal state or after ``episode_length`` (30) steps; the
  return is reported on the last step, which swaps in the reset state."""
  s = env.start_update(env.reset(jax.random.key(0)), _task(1, 1), env.reset(jax.random.key(1)))
  reset = env.reset(jax.random.key(2))

  def body(s, a):
    s, tr = env.step(s, a, _task(1, 1), reset)
    return s, (tr, s.t)

  actions = jax.random.randint(jax.random.key(3), (80,), 0, 6)
  _, (tr, t) = jax.jit(lambda s: jax.lax.scan(body, s, actions))(s)
  end, term = np.asarray(tr.episode_end), np.asarray(tr.terminated)
  reward, ret, t = np.asarray(tr.reward), np.asarray(tr.episode_return), np.asarray(t)
  assert end.sum() >= 2
  length, total = 0, 0.0
  for i in range(80):
    length, total = length + 1, total + reward[i]
    assert end[i] == (term[i] or length == 30), i  # truncated exactly at 30
    if end[i]:
      np.testing.assert_allclose(ret[i], total, rtol=1e-6)
      assert t[i] == 0  # reset after the end
      length, total = 0, 0.0
    else:
      assert ret[i] == 0 and t[i] == length


def test_categorical_head():
  logits = jnp.asarray([[0.0, 1.0, 2.0, -1.0, 0.5, 0.0], [0.0] * 6])
  head = cm.CATEGORICAL
  action = jnp.asarray([2, 4], jnp.int32)
  ref = np.asarray(logits) - np.log(np.exp(np.asarray(logits)).sum(-1, keepdims=True))
  np.testing.assert_allclose(head.log_prob(None, logits, action), ref[[0, 1], [2, 4]], rtol=1e-6)
  np.testing.assert_allclose(head.entropy(logits)[1], np.log(6.0), rtol=1e-6)
  a, logp = head.sample(None, logits, jax.random.key(0))
  np.testing.assert_allclose(logp, ref[[0, 1], np.asarray(a)], rtol=1e-6)
  draws, _ = head.sample(None, jnp.broadcast_to(logits[0], (20000, 6)), jax.random.key(1))
  freq = np.bincount(np.asarray(draws), minlength=6) / 20000
  np.testing.assert_allclose(freq, np.exp(ref[0]), atol=0.015)


def test_config_validation():
  with pytest.raises(ValueError, match="games"):
    cm.make_config(games=["Pong"])
  with pytest.raises(ValueError, match="minibatches"):
    cm.make_config(num_envs=3, rollout_len=5, minibatches=4)
  with pytest.raises(ValueError, match="unknown method"):
    cm.make_config(methods=["ppo", "dqn"])
  with pytest.raises(ValueError, match="permutations"):
    cm.make_config(permutations=0)
  with pytest.raises(ValueError, match="no sweeps"):
    cm.make_config(sweep={"ppo": {"step_size": [1e-4, 3e-4]}})
  with pytest.warns(DeprecationWarning, match="use 'hparams.l2.step_size'"):
    assert cm.make_config(hparams={"l2": {"lr": 1e-3}})["hparams"]["l2"]["step_size"] == 1e-3
  c = cm.config_from_args(
    cm.parse_args(["--tiny", "--games", "Breakout,Freeway", "--set", "cbp.step_size=1e-3"])
  )
  assert c["games"] == ["Breakout", "Freeway"] and c["hparams"]["cbp"]["step_size"] == 1e-3
  assert c["hparams"]["cbp"]["maturity_threshold"] == 1  # --tiny's, merged with the defaults
  c = cm.make_config()
  assert cm.steps_per_update(c) == 512 and cm.num_chunks(c) == 8
  assert c["change_every"] % cm.steps_per_update(c) == 0


# The tiny configuration the run tests share (compiled once: `make_batched` caches it).
TINY = dict(
  seeds=2,
  games=GAMES,
  total_steps=256,
  num_envs=2,
  rollout_len=16,
  epochs=1,
  minibatches=2,
  hidden=[8, 8],
  episode_length=12,
  change_every=64,
  updates_per_point=1,
  points_per_chunk=4,
  methods=["ppo", "cbp"],
  hparams={"cbp": {"maturity_threshold": 2, "replacement_rate": 0.05}},
)


def test_tiny_run_end_to_end(tmp_path):
  """Two seeds of PPO and PPO+CBP through the runner: tasks switch every 2 updates."""
  config = cm.make_config(TINY)
  result = cm.run_experiment(config, out_dir=tmp_path, progress=False)
  assert result.status == "complete" and result.chunks_done == 2
  res = runner.load_results(tmp_path / "results.json")
  assert res["experiment"] == "continual_minatar" and list(res["metrics"]) == ["ppo", "cbp"]
  assert res["x"] == [32.0 * i for i in range(1, 9)]
  for named in res["metrics"].values():
    assert set(named) == set(cm.METRIC_NAMES)
    assert all(v.shape == (2, 8) for v in named.values())
    # Episodes of at most 12 steps: each env ends at least once per 16-step update.
    assert np.all(named["episodes"] >= 2) and np.all(np.isfinite(named["episode_return"]))
    np.testing.assert_array_equal(named["phase"], [[0, 0, 1, 1, 2, 2, 3, 3]] * 2)
    np.testing.assert_array_equal(named["game"], [[0, 0, 1, 1, 0, 0, 1, 1]] * 2)
    assert np.all((named["dormant_fraction"] >= 0) & (named["dormant_fraction"] <= 1))
    assert np.all(named["effective_rank"] >= 1) and np.all(named["weight_magnitude"] > 0)
  assert res["metrics"]["cbp"]["replaced_units"][:, -1].min() > 0
  np.testing.assert_array_equal(res["metrics"]["ppo"]["replaced_units"], 0)
  table, tasks = cm.task_returns(res)
  assert tasks.tolist() == [0, 1, 0, 1] and table["cbp"].shape == (2, 4)
  assert "SpaceI" in cm.format_summary(res)
  assert (tmp_path / "continual_minatar.png").exists() and (tmp_path / "tasks.png").exists()
  json.loads((tmp_path / "timing.json").read_text())


def test_interrupt_and_resume_is_bit_identical(tmp_path):
  """Stopped after its first chunk and resumed from the checkpoint (game states, Adam
  and CBP statistics, keys): the uninterrupted run's results file and final carry."""
  assert_interrupt_and_resume_is_bit_for_bit(
    functools.partial(cm.run_experiment, cm.make_config(TINY), plot=False, progress=False), tmp_path
  )


def test_vmapped_seeds_are_independent():
  """In the vmapped program, a seed's results depend on its own carry only: changing
  seed 1's carry leaves seed 0's bits alone, and seed 1 given seed 0's carry
  reproduces seed 0 exactly."""
  config = cm.make_config(TINY)
  init, chunk = cm.make_batched(config)
  carry = init(cm.seed_keys(config))
  base_carry, base = chunk(carry, jnp.int32(0))
  other = init(jax.random.split(jax.random.key(99), 2))
  mixed = jax.tree.map(lambda a, o: a.at[1].set(o[1]), carry, other)
  copied = jax.tree.map(lambda a: a.at[1].set(a[0]), carry)
  mixed_carry, mixed_out = chunk(mixed, jnp.int32(0))
  copied_carry, copied_out = chunk(copied, jnp.int32(0))
  for a, b, c, d in zip(
    jax.tree.leaves((base_carry, base)),
    jax.tree.leaves((mixed_carry, mixed_out)),
    jax.tree.leaves((copied_carry, copied_out)),
    jax.tree.leaves((base_carry, base)),
  ):
    a, b, c, d = (_bits(x) for x in (a, b, c, d))
    np.testing.assert_array_equal(a[0], b[0])  # seed 0 untouched
    np.testing.assert_array_equal(c[1], d[0])  # a copy of seed 0 is seed 0
  assert not np.array_equal(
    _bits(base["cbp"]["episode_return"])[1], _bits(mixed_out["cbp"]["episode_return"])[1]
  )


@pytest.mark.slow
def test_cli_resume_after_sigkill_is_bit_for_bit(tmp_path):
  """SIGKILL the CLI after its first checkpoint, then --resume: the uninterrupted
  run's results, byte for byte."""
  args = ["--tiny", "--methods", "ppo,cbp", "--points-per-chunk", "1", "--no-plot"]
  assert_resume_after_sigkill_is_bit_for_bit(
    [sys.executable, "-m", "experiments.continual_minatar"] + args, tmp_path
  )


def _task(index, game, perm=None):
  perm = jnp.arange(600, dtype=jnp.int32) if perm is None else perm
  return cm.Task(phase=jnp.int32(index), index=jnp.int32(index), game=jnp.int32(game), permutation=perm)


def _bits(x):
  x = jnp.asarray(x)
  return np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)


def _same(a, b) -> bool:
  return all(np.array_equal(_bits(x), _bits(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
