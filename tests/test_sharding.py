"""Sharded seed sweeps and data-parallel CBP (`cbp_jax.sharding`).

The multi-device checks need several devices, which on a CPU-only machine
means ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` set *before* JAX
initialises. The pytest process has long initialised JAX, so
`test_four_devices` runs them in a subprocess::

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m tests.test_sharding [CHECK ...]

runs them directly (all checks by default).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import cbp_jax
from cbp_jax import sharding

DEVICES = 4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- Shared setup -------------------------------------------------------------


def mlp_setup(key, *, batch, hidden=(16, 12), inputs=10, outputs=3):
  model = cbp_jax.models.MLP(hidden=hidden, outputs=outputs)
  params = model.init(key, jnp.zeros((batch, inputs)))["params"]
  return model, params


def make_step(model, tx):
  """The ordinary single-device training step (nothing sharding-specific)."""

  def step(params, opt_state, x, y):
    def loss_fn(p):
      out, acts = cbp_jax.apply_with_activations(model, p, x)
      return optax.softmax_cross_entropy_with_integer_labels(out, y).mean(), acts

    (loss, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def make_train(steps=24, batch=4, hidden=(12,)):
  """A per-seed ``train(key) -> (params, replaced per layer)`` with CBP."""

  def train(key):
    k_init, k_cbp, k_data = jax.random.split(key, 3)
    model, params = mlp_setup(k_init, batch=batch, hidden=hidden)
    tx = optax.chain(
      optax.sgd(0.05),
      cbp_jax.cbp(
        cbp_jax.graph_from_params(params),
        key=k_cbp,
        replacement_rate=0.05,
        maturity_threshold=4,
        utility="adaptable_contribution",
        max_replacements_per_step=2,
      ),
    )
    step = make_step(model, tx)
    xs = jax.random.normal(k_data, (steps, batch, 10))
    ys = jax.random.randint(jax.random.fold_in(k_data, 1), (steps, batch), 0, 3)

    def body(carry, xy):
      params, opt_state = carry
      params, opt_state, loss = step(params, opt_state, *xy)
      return (params, opt_state), loss

    (params, opt_state), _ = jax.lax.scan(body, (params, tx.init(params)), (xs, ys))
    replaced = {k: v["replaced"] for k, v in cbp_jax.unit_stats(opt_state).items()}
    return params, replaced

  return train


def assert_trees_close(a, b, atol):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


# --- Single-device tests (in process) ---------------------------------------


def test_mesh_spans_all_devices():
  mesh = sharding.make_mesh("seeds")
  assert mesh.axis_names == ("seeds",)
  assert mesh.devices.size == jax.device_count()


def test_sharded_sweep_on_the_available_devices_matches_vmap():
  # Cheap in-process version (CBP itself: `check_sweep` on 4 devices).
  n = jax.device_count() * 2
  keys = jax.random.split(jax.random.key(3), n)
  fn = lambda k, s: (jax.random.normal(k, (3,)) * s, s + 1)
  scales = jnp.arange(n, dtype=jnp.float32)
  ref = jax.vmap(fn)(keys, scales)
  out = sharding.sharded_sweep(fn, keys, scales)
  assert_trees_close(out, ref, atol=0)


def test_errors_name_the_problem():
  mesh = sharding.make_mesh("data")
  with pytest.raises(ValueError, match="scalar"):
    sharding.shard_leading_axis({"a": jnp.zeros(())}, mesh)
  with pytest.raises(ValueError, match="not in the mesh axes"):
    sharding.shard_batch(jnp.zeros((4, 2)), mesh, axis_name="seeds")


def test_four_devices():
  """Runs the multi-device checks below in a subprocess with 4 CPU devices."""
  env = dict(os.environ)
  flags = env.get("XLA_FLAGS", "")
  # Optimisation level 0 only makes XLA:CPU compile faster (LLVM passes); the
  # sharded and unsharded programs compared are compiled alike.
  env["XLA_FLAGS"] = (
    f"{flags} --xla_force_host_platform_device_count={DEVICES} --xla_backend_optimization_level=0"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  result = subprocess.run(
    [sys.executable, "-m", "tests.test_sharding"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
  for name in CHECKS:
    assert f"ok {name}" in result.stdout, result.stdout


# --- Multi-device checks (run with 4 devices, see the module docstring) -----


def check_sweep():
  """A sweep sharded over 4 devices gives the unsharded sweep's results."""
  keys = jax.random.split(jax.random.key(0), 8)
  train = make_train()
  ref = jax.jit(jax.vmap(train))(keys)  # Unsharded: one device.
  mesh = sharding.make_mesh("seeds")
  out = sharding.sharded_sweep(train, keys, mesh=mesh)
  for leaf in jax.tree.leaves(out):
    assert leaf.sharding.spec == P("seeds"), leaf.sharding
    assert len(leaf.sharding.device_set) == DEVICES
    assert {s.data.shape[0] for s in leaf.addressable_shards} == {2}  # 8 seeds / 4 devices.
  assert_trees_close(out, ref, atol=1e-6)
  replaced = np.stack([np.asarray(v) for v in out[1].values()])
  assert (replaced.sum(axis=0) > 0).all(), replaced  # Every seed replaced units.
  with pytest.raises(ValueError, match="multiple of"):
    sharding.shard_leading_axis(jax.random.split(jax.random.key(0), 6), mesh)


def _data_parallel_run(model, params, tx, xs, ys, mesh=None):
  step = make_step(model, tx)
  state = tx.init(params)
  if mesh is None:
    run = jax.jit(step)
  else:
    params, state = sharding.replicate((params, state), mesh)
    run = sharding.data_parallel(step, mesh)
  losses = []
  for x, y in zip(xs, ys):
    if mesh is not None:
      x, y = sharding.shard_batch((x, y), mesh)
      assert x.sharding.spec == P("data")
    params, state, loss = run(params, state, x, y)
    losses.append(float(loss))
    if mesh is not None:
      assert sharding.is_replicated_consistently((params, state, loss)), "replicas diverged"
  return params, state, np.asarray(losses), run


def _compare_data_parallel(model, params, tx, xs, ys, atol, hlo_check=True):
  ref_params, ref_state, ref_losses, _ = _data_parallel_run(model, params, tx, xs, ys)
  mesh = sharding.make_mesh("data")
  dp_params, dp_state, dp_losses, run = _data_parallel_run(model, params, tx, xs, ys, mesh)
  for leaf in jax.tree.leaves((dp_params, dp_state)):
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == DEVICES
  ref_stats = cbp_jax.unit_stats(ref_state)
  dp_stats = cbp_jax.unit_stats(dp_state)
  for name in ref_stats:
    assert int(ref_stats[name]["replaced"]) > 0, name  # The run included replacements,
    assert int(dp_stats[name]["replaced"]) == int(ref_stats[name]["replaced"]), name
    np.testing.assert_array_equal(  # ... of the same units.
      np.asarray(cbp_jax.transform.find_cbp_state(dp_state).last_replaced[name]),
      np.asarray(cbp_jax.transform.find_cbp_state(ref_state).last_replaced[name]),
    )
    np.testing.assert_array_equal(np.asarray(dp_stats[name]["age"]), np.asarray(ref_stats[name]["age"]))
    np.testing.assert_allclose(
      np.asarray(dp_stats[name]["utility"]), np.asarray(ref_stats[name]["utility"]), rtol=1e-4, atol=1e-6
    )
  np.testing.assert_allclose(dp_losses, ref_losses, rtol=1e-5, atol=1e-6)
  assert_trees_close(dp_params, ref_params, atol=atol)
  if not hlo_check:
    return
  # The batch statistics (gradients, activation means) are global: XLA inserted collectives.
  x, y = sharding.shard_batch((xs[0], ys[0]), mesh)
  hlo = run.lower(*sharding.replicate((params, jax.jit(tx.init)(params)), mesh), x, y).compile().as_text()
  assert "all-reduce" in hlo


def check_data_parallel():
  """Data-parallel CBP (wrapping Adam) on 4 devices = one device on the global batch."""
  steps, batch = 10, 16  # 4 examples per device.
  model, params = mlp_setup(jax.random.key(1), batch=batch)
  graph = cbp_jax.graph_from_params(params)
  tx = cbp_jax.cbp(
    graph,
    key=7,
    replacement_rate=0.1,
    maturity_threshold=3,
    utility="adaptable_contribution",
    optimizer=optax.adam(1e-2),
  )
  k = jax.random.key(2)
  xs = jax.random.normal(k, (steps, batch, 10))
  ys = jax.random.randint(jax.random.fold_in(k, 1), (steps, batch), 0, 3)
  _compare_data_parallel(model, params, tx, xs, ys, atol=2e-5)


def check_data_parallel_conv():
  """The same with the paper's ConvNet (conv activations averaged over batch and space)."""
  steps, batch = 3, 8
  model = cbp_jax.models.ConvNet(outputs=2)
  params = model.init(jax.random.key(3), jnp.zeros((batch, 32, 32, 3)))["params"]
  graph = cbp_jax.graph_from_params(params)
  tx = optax.chain(
    optax.sgd(0.05, momentum=0.9),
    cbp_jax.cbp(
      graph,
      key=5,
      replacement_rate=0.05,
      maturity_threshold=1,
      init="default",
      utility="adaptable_contribution",
      count_basis="layer",
    ),
  )
  k = jax.random.key(4)
  xs = jax.random.uniform(k, (steps, batch, 32, 32, 3))
  ys = jax.random.randint(jax.random.fold_in(k, 1), (steps, batch), 0, 2)
  _compare_data_parallel(model, params, tx, xs, ys, atol=2e-5, hlo_check=False)


def check_experiment_shard_seeds():
  """An experiment run with ``shard_seeds`` (the CLI's --shard-seeds) lays its
  seeds over the 4 devices and writes the unsharded run's results; so does a
  sharded resume from a checkpoint."""
  import tempfile

  from experiments import slowly_changing_regression as scr

  config = dict(seeds=4, steps=30_000, bin_size=10_000, bins_per_chunk=1, methods=["bp", "cbp"])
  ref = scr.run_experiment(config, plot=False, progress=False)
  out = scr.run_experiment(config, plot=False, progress=False, shard_seeds=True)
  for leaf in jax.tree.leaves(out.carry):
    assert leaf.sharding.spec[0] == "seeds" and len(leaf.sharding.device_set) == DEVICES, leaf.sharding
  assert_trees_close(out.metrics, ref.metrics, atol=1e-6)
  with tempfile.TemporaryDirectory() as d:

    def stop_after_one(done, _):
      if done == 1:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
      scr.run_experiment(
        config,
        plot=False,
        progress=False,
        shard_seeds=True,
        checkpoint_dir=f"{d}/ckpt",
        on_chunk=stop_after_one,
      )
    resumed = scr.run_experiment(
      config, plot=False, progress=False, shard_seeds=True, checkpoint_dir=f"{d}/ckpt", resume=True
    )
  assert resumed.resumed_from == 1
  assert_trees_close(resumed.metrics, ref.metrics, atol=1e-6)
  with pytest.raises(ValueError, match="multiple of 4"):
    scr.run_experiment({**config, "seeds": 6}, plot=False, progress=False, shard_seeds=True)


CHECKS = {
  "sweep": check_sweep,
  "experiment_shard_seeds": check_experiment_shard_seeds,
  "data_parallel": check_data_parallel,
  "data_parallel_conv": check_data_parallel_conv,
}


def main(names):
  if jax.device_count() != DEVICES:
    raise SystemExit(
      f"need {DEVICES} devices, found {jax.device_count()}: run with "
      f"XLA_FLAGS=--xla_force_host_platform_device_count={DEVICES}"
    )
  for name in names or CHECKS:
    t0 = time.perf_counter()
    CHECKS[name]()
    print(f"ok {name} ({time.perf_counter() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
