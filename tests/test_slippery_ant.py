"""Slippery Ant experiment: friction as data reaching the physics, schedule, optimisers, a tiny run.

Needs brax and mujoco-mjx (pinned in pyproject's `rl` extra: `pip install -e .[rl]`); skipped with the reason when they are not
importable. Compiling the MJX ant dominates the time (about 20-40 s of CPU per compile).
"""

import functools
import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("mujoco.mjx", reason="mujoco-mjx is not installed: slippery Ant needs it")
pytest.importorskip("brax.envs", reason="brax is not installed: slippery Ant needs it")

from experiments import runner  # noqa: E402
from experiments import slippery_ant as sa  # noqa: E402
from tests.resume_checks import (  # noqa: E402
  assert_interrupt_and_resume_is_bit_for_bit,
  assert_resume_after_sigkill_is_bit_for_bit,
)

EPISODE = 10


@pytest.fixture(scope="module")
def env():
  return sa.SlipperyAnt(episode_length=EPISODE)


def test_friction_reaches_the_physics_as_data_and_episodes_auto_reset(env):
  s0 = env.reset(jax.random.key(0))
  r0 = env.reset(jax.random.key(5))
  actions = jax.random.uniform(jax.random.key(1), (25, env.action_size), minval=-1, maxval=1)

  @jax.jit
  def rollout(friction):
    def body(s, a):
      s, tr = env.step(s, a, friction, r0)
      return s, (tr.next_obs, tr.episode_end, tr.terminated, s.t)

    return jax.lax.scan(body, s0, actions)[1]

  slippery, grippy, grippy_again = rollout(0.02), rollout(2.0), rollout(2.0)
  assert rollout._cache_size() == 1  # friction is an argument, not a constant
  for a, b in zip(grippy, grippy_again):
    np.testing.assert_array_equal(a, b)
  obs_s, obs_g = slippery[0], grippy[0]
  assert obs_s.shape == (25, env.observation_size)
  assert np.all(np.isfinite(obs_s)) and np.all(np.isfinite(obs_g))
  # Same start, same actions: only the friction differs, and so do the trajectories.
  assert float(jnp.max(jnp.abs(obs_s - obs_g))) > 1e-2
  # The replaced model: sliding friction of every geom set, torsional/rolling untouched.
  gf = np.asarray(env.with_friction(0.5).sys.geom_friction)
  orig = np.asarray(env.env.sys.geom_friction)
  np.testing.assert_allclose(gf[:, 0], 0.5)
  np.testing.assert_array_equal(gf[:, 1:], orig[:, 1:])
  # Auto-reset: an episode ends after EPISODE steps (or on termination) and the
  # next step runs from the reset state (episode step counter back to 1).
  for _, end, term, t in (slippery, grippy):
    end, term, t = np.asarray(end), np.asarray(term), np.asarray(t)
    np.testing.assert_array_equal(end.astype(bool), (t == 0))  # t is the state after reset
    assert np.all(term <= end)
    if not term.any():
      np.testing.assert_array_equal(np.flatnonzero(end), [EPISODE - 1, 2 * EPISODE - 1])


def test_friction_schedule_is_log_uniform_and_changes_per_phase():
  c = sa.make_config(num_envs=2, rollout_len=8, change_every=64)
  assert sa.steps_per_update(c) == 16
  phases = np.asarray(sa.phase_of_update(c, jnp.arange(12)))
  np.testing.assert_array_equal(phases, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
  key = sa.seed_key(c, 0)
  fr = np.asarray(jax.vmap(lambda p: sa.friction_of_phase(c, key, p))(jnp.arange(2000)))
  assert fr.min() >= 0.02 and fr.max() <= 2.0
  logs = (np.log(fr) - math.log(0.02)) / (math.log(2.0) - math.log(0.02))
  assert abs(np.mean(logs) - 0.5) < 0.03 and abs(np.mean(logs < 0.25) - 0.25) < 0.04
  assert len(np.unique(fr[:10])) == 10
  # A phase's friction is the same wherever it is computed (update boundaries within a phase).
  assert float(sa.friction_of_phase(c, key, jnp.int32(3))) == float(fr[3])


def test_rate_zero_cbp_group_is_plain_adam():
  """Methods sharing the CBP structure (rate 0) get plain Adam's parameters."""
  c = sa.make_config(hidden=[8, 8])
  nets = sa.make_nets(c, 3)
  params = sa.init_params(nets, jax.random.key(0), 5, 3)
  graph = sa.make_graph(params)
  assert graph.names == ("policy/Dense_0", "policy/Dense_1", "value/Dense_0", "value/Dense_1")
  hp = {k: jnp.float32(v) for k, v in c["hparams"]["l2"].items() if k in sa._TRACED}
  hp["replacement_rate"] = jnp.float32(0.0)
  x = jax.random.normal(jax.random.key(1), (16, 5))

  def loss(p):
    mean, value, acts = sa.forward(nets, p, x)
    return jnp.mean(mean**2) + jnp.mean((value - 1) ** 2) + jnp.sum(p["log_std"] ** 2), acts

  def train(kind):
    tx = sa.make_optimizer(c, kind, hp, graph, jax.random.key(2))

    def step(carry, _):
      p, s = carry
      g, acts = jax.grad(loss, has_aux=True)(p)
      u, s = tx.update(g, s, p, activations=acts)
      return (optax.apply_updates(p, u), s), None

    return jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), None, length=3)[0][0])(params)

  # Equal up to float rounding: two separately compiled programs may fuse differently.
  for a, b in zip(jax.tree.leaves(train("adam")), jax.tree.leaves(train("cbp"))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_config_validation():
  with pytest.raises(ValueError, match="minibatches"):
    sa.make_config(num_envs=3, rollout_len=5, minibatches=16)
  with pytest.raises(ValueError, match="unknown method"):
    sa.make_config(methods=["ppo", "sgd"])
  with pytest.raises(ValueError, match="unknown config entry"):
    sa.make_config(learning_rate=1.0)
  with pytest.raises(ValueError, match="ppo: step_size must be > 0"):
    sa.make_config(hparams={"ppo": {"step_size": 0.0}})
  c = sa.config_from_args(sa.parse_args(["--paper", "--steps", "4096", "--set", "l2.weight_decay=0"]))
  assert (c["seeds"], c["total_steps"], c["hparams"]["l2"]["weight_decay"]) == (30, 4096, 0)
  c = sa.make_config(
    total_steps=1000, num_envs=2, rollout_len=8, minibatches=2, updates_per_point=2, points_per_chunk=3
  )
  assert sa.steps_per_chunk(c) == 96 and sa.num_chunks(c) == 11  # rounded up
  assert sa.method_groups(sa.make_config(methods=["ppo", "cbp", "redo"])) == {
    "cbp": ["ppo", "cbp"],
    "redo": ["redo"],
  }
  assert sa.method_groups(sa.make_config(methods=["ppo", "l2"])) == {"adam": ["ppo", "l2"]}


# The tiny configuration the run tests share (compiled once: `make_batched` caches it).
TINY = dict(
  seeds=2,
  total_steps=128,
  num_envs=2,
  rollout_len=16,
  epochs=2,
  minibatches=2,
  hidden=[8, 8],
  episode_length=8,
  change_every=64,
  updates_per_point=1,
  points_per_chunk=2,
  methods=["ppo", "cbp"],
  hparams={"cbp": {"maturity_threshold": 2, "replacement_rate": 0.05}},
)


def test_tiny_run_end_to_end(tmp_path):
  """Two seeds of PPO and PPO+CBP, vmapped in one compiled program, through the runner."""
  config = sa.make_config(TINY)
  result = sa.run_experiment(config, out_dir=tmp_path, checkpoint_dir=tmp_path / "ckpt", progress=False)
  assert result.status == "complete" and result.chunks_done == 2
  res = runner.load_results(tmp_path / "results.json")
  assert res["experiment"] == "slippery_ant" and res["status"] == "complete"
  assert res["x"] == [32.0, 64.0, 96.0, 128.0]
  assert list(res["metrics"]) == ["ppo", "cbp"]
  for label, named in res["metrics"].items():
    assert set(named) == set(sa.METRIC_NAMES)
    for name, v in named.items():
      assert v.shape == (2, 4), (label, name)
    # Episodes of at most 8 steps: each of the 2 envs ends >= 2 in every 16-step update.
    assert np.all(named["episodes"] >= 4) and np.all(np.isfinite(named["episode_return"]))
    assert np.all((named["dead_fraction"] >= 0) & (named["dead_fraction"] <= 1))
    assert np.all(named["effective_rank"] >= 1) and np.all(named["weight_magnitude"] > 0)
    assert np.all(np.isfinite(named["value_loss"]))
  # Friction: two phases of 64 steps (2 updates), log-uniform in range, shared by the methods.
  fr, ph = res["metrics"]["cbp"]["friction"], res["metrics"]["cbp"]["phase"]
  np.testing.assert_array_equal(ph[0], [0, 0, 1, 1])
  assert np.all((fr >= 0.02) & (fr <= 2.0)) and fr[0, 0] == fr[0, 1] and fr[0, 1] != fr[0, 2]
  np.testing.assert_array_equal(fr, res["metrics"]["ppo"]["friction"])
  assert fr[0, 0] != fr[1, 0]  # seeds draw their own frictions
  # CBP replaced units (rate 0.05 x 32 units x 64 minibatch steps); PPO runs in the same
  # CBP structure with rate 0 and replaces none.
  assert np.all(np.diff(res["metrics"]["cbp"]["replaced_units"], axis=1) >= 0)
  assert res["metrics"]["cbp"]["replaced_units"][:, -1].min() > 0
  np.testing.assert_array_equal(res["metrics"]["ppo"]["replaced_units"], 0)
  assert (tmp_path / "slippery_ant.png").exists() and (tmp_path / "phases.png").exists()
  assert "ph1" in sa.format_summary(res)
  json.loads((tmp_path / "timing.json").read_text())
  assert runner.Checkpoints(tmp_path / "ckpt", experiment=sa.EXPERIMENT.name, config=config).latest() == 2


def test_interrupt_and_resume_is_bit_identical(tmp_path):
  """Stopped after its first chunk and resumed from the checkpoint (MJX state, Adam
  and CBP statistics, keys): the uninterrupted run's results file and final carry."""
  assert_interrupt_and_resume_is_bit_for_bit(
    functools.partial(sa.run_experiment, sa.make_config(TINY), plot=False, progress=False), tmp_path
  )


@pytest.mark.slow
def test_cli_resume_after_sigkill_is_bit_for_bit(tmp_path):
  """SIGKILL the CLI (PPO and PPO+CBP replacing units, the paper's nets, 2 envs x 16-step
  rollouts) after its first checkpoint, then --resume: the uninterrupted run's results,
  byte for byte."""
  args = [
    "--steps",
    "128",
    "--num-envs",
    "2",
    "--rollout-len",
    "16",
    "--updates-per-point",
    "1",
    "--points-per-chunk",
    "1",
    "--change-every",
    "64",
    "--methods",
    "ppo,cbp",
    "--set",
    "cbp.maturity_threshold=2",
    "--set",
    "cbp.replacement_rate=0.01",
    "--no-plot",
  ]
  assert_resume_after_sigkill_is_bit_for_bit(
    [sys.executable, "-m", "experiments.slippery_ant"] + args, tmp_path
  )
