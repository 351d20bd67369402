"""Slowly-changing regression: input stream, LTU target, the loss-of-plasticity effect, determinism."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import runner
from experiments import slowly_changing_regression as scr
from tests.resume_checks import assert_resume_after_sigkill_is_bit_for_bit

# Small enough to compile and run in a few seconds; shared so that the
# compiled program is reused (make_batched memoises per config).
TINY = dict(seeds=2, steps=40_000, bin_size=10_000, bins_per_chunk=2, methods=["bp", "cbp"])


def _bins(config, seed_index, n):
  """The first ``n`` bins of seed ``seed_index``'s stream, concatenated."""
  key = scr.seed_key(config, seed_index)
  step = jax.jit(lambda k, b, s: scr.stream_bin(config, k, b, s))
  state = scr.init_stream(config, key)
  xs, ys = [], []
  for b in range(n):
    x, y, state = step(key, jnp.int32(b), state)
    xs.append(np.asarray(x))
    ys.append(np.asarray(y))
  return np.concatenate(xs), np.concatenate(ys)


@pytest.mark.parametrize("mode", ["redraw", "flip_one"])
def test_input_stream_bits_and_change_points(mode):
  # Change points fall inside bins and on bin edges (T = 300, bins of 1,000).
  config = scr.make_config(bin_size=1000, change_every=300, bins_per_chunk=1, steps=4000, slow_bits_mode=mode)
  x, _ = _bins(config, 0, 4)
  T, f = config["change_every"], config["num_slow_bits"]
  assert x.shape == (4000, 20) and x.dtype == np.float32
  assert set(np.unique(x)) == {0.0, 1.0}
  slow, fast = x[:, :f], x[:, f:]
  # The first 15 bits change only at multiples of T ...
  changed = np.nonzero(np.any(slow[1:] != slow[:-1], axis=1))[0] + 1
  assert all(t % T == 0 for t in changed)
  segments = slow[::T]
  assert len(changed) >= 0.8 * (len(segments) - 1)  # ... and do change at (almost) every one.
  if mode == "flip_one":
    flips = np.sum(segments[1:] != segments[:-1], axis=1)
    np.testing.assert_array_equal(flips, 1)  # Exactly one bit per change point.
  else:
    assert np.mean(segments[1:] != segments[:-1]) == pytest.approx(0.5, abs=0.15)
  # The last 5 bits are fresh coin flips every example.
  assert np.mean(fast) == pytest.approx(0.5, abs=0.03)
  assert np.mean(np.all(fast[1:] == fast[:-1], axis=1)) < 0.1
  # Another seed gets another stream.
  x1, _ = _bins(config, 1, 1)
  assert not np.array_equal(x1, x[:1000])


def test_ltu_target_matches_numpy():
  config = scr.make_config(bin_size=2000, steps=4000, bins_per_chunk=1)
  key = scr.seed_key(config, 3)
  x, y = _bins(config, 3, 2)
  t = {k: np.asarray(v, np.float64) for k, v in scr.make_target(config, key).items()}
  W, b, v, c = t["W"], t["b"], t["v"], t["c"]
  assert W.shape == (20, 100) and b.shape == v.shape == (100,) and c.shape == ()
  for a in (W, b, v, c):
    assert set(np.unique(a)) <= {-1.0, 1.0}
  assert 0.3 < np.mean(W > 0) < 0.7
  # Plain NumPy: S_i = (#negative input weights) + b_i / 2 (the reference's
  # (m - sum_j W_ji + b_i) / 2), theta_i = beta (m + 1) - S_i, fire iff
  # W_i . x + b_i > theta_i, y = v . f + c.
  n_negative = np.sum(W == -1, axis=0)
  theta = 0.7 * 21 - (n_negative + b / 2)
  np.testing.assert_allclose(t["theta"], theta, rtol=0, atol=1e-5)
  x64 = x.astype(np.float64)
  features = np.zeros((x.shape[0], 100))
  for i in range(100):
    pre = x64 @ W[:, i] + b[i]
    features[:, i] = pre > theta[i]
  expected = features @ v + c
  np.testing.assert_array_equal(y, expected.astype(np.float32))
  # The target is not degenerate: it varies, and some features fire.
  assert 0.0 < features.mean() < 0.5 and np.std(expected) > 0.3


def test_config_validation_and_labels():
  with pytest.raises(ValueError, match="multiple of bin_size"):
    scr.make_config(steps=30_000, bin_size=20_000, bins_per_chunk=1)
  with pytest.raises(ValueError, match="unknown method"):
    scr.make_config(methods=["bp", "adam"])
  with pytest.raises(ValueError, match="unknown config entry"):
    scr.make_config(stepsize=0.1)
  with pytest.raises(ValueError, match="not a numeric hyperparameter"):
    scr.make_config(sweep={"cbp": {"utility": ["contribution"]}})
  c = scr.make_config(
    methods=["bp", "snp", "linear"],
    sweep={"bp": {"step_size": [0.01, 0.003]}},
    hparams={"snp": {"weight_decay": 1e-2, "noise_scale": 1e-3}},
  )
  labels = scr.run_labels(c)
  assert list(labels) == ["bp[lr=0.01]", "bp[lr=0.003]", "snp", "linear"]
  assert labels["bp[lr=0.003]"]["step_size"] == 0.003
  assert labels["snp"]["shrink"] == pytest.approx(1 - 0.01 * 1e-2)
  assert c["hparams"]["cbp"]["maturity_threshold"] == 10  # Defaults kept when merging.


def test_loss_of_plasticity_ordering():
  """The paper's effect at a small scale, with the paper's step size 0.01.

  10 seeds x 200k examples (a fifth of the paper's run) suffice: BP's error
  rises fastest early on. Early = first 20k-example bin, late = last 60k.
  With base seeds 0..5 this config gave BP early/late 0.57/0.98, 0.57/0.83,
  0.61/0.80, 0.60/0.99, 0.56/0.92, 0.59/1.04 and CBP late 0.64, 0.57, 0.53,
  0.58, 0.54, 0.61; BP rose on >= 8 of 10 seeds and CBP ended below BP on 10
  of 10 every time. The test uses base seed 0 (deterministic).
  """
  config = scr.make_config(seeds=10, steps=200_000, bins_per_chunk=10, methods=["bp", "cbp"])
  result = scr.run_experiment(config, plot=False, progress=False)
  bp = np.asarray(result.metrics["bp"]["error"], np.float64)
  cbp = np.asarray(result.metrics["cbp"]["error"], np.float64)
  assert bp.shape == cbp.shape == (10, 10)
  bp_early, bp_late = bp[:, 0], bp[:, -3:].mean(axis=1)
  cbp_late = cbp[:, -3:].mean(axis=1)
  assert bp_late.mean() > bp_early.mean() + 0.15
  assert cbp_late.mean() < bp_late.mean() - 0.15
  assert np.sum(bp_late > bp_early) >= 7  # Over most seeds, not just on average.
  assert np.sum(cbp_late < bp_late) >= 7
  # Plasticity correlates move as in the paper: BP's weights grow.
  bp_w = np.asarray(result.metrics["bp"]["weight_magnitude"])
  assert bp_w[:, -1].mean() > bp_w[:, 0].mean()
  assert np.all(np.asarray(result.metrics["cbp"]["replaced_units"])[:, -1] > 0)


def test_same_seed_same_results_file(tmp_path):
  config = scr.make_config(**TINY)
  scr.run_experiment(config, out_dir=tmp_path / "a", plot=False, progress=False)
  scr.run_experiment(config, out_dir=tmp_path / "b", plot=False, progress=False)
  a = (tmp_path / "a" / "results.json").read_bytes()
  assert a == (tmp_path / "b" / "results.json").read_bytes()
  res = json.loads(a)
  assert res["status"] == "complete" and res["x"] == [10000.0, 20000.0, 30000.0, 40000.0]
  for label in ("bp", "cbp"):
    for name in ("error", "dead_fraction", "effective_rank", "weight_magnitude"):
      values = np.array(res["metrics"][label][name], np.float64)
      assert values.shape == (2, 4) and np.all(np.isfinite(values))
  # Different seeds are different runs.
  assert res["metrics"]["bp"]["error"][0] != res["metrics"]["bp"]["error"][1]


def test_interrupt_and_resume_is_bit_identical(tmp_path):
  config = scr.make_config(**TINY)
  scr.run_experiment(config, out_dir=tmp_path / "straight", plot=False, progress=False)

  def stop(done, results):
    if done == 1:
      raise KeyboardInterrupt

  out, ckpt = tmp_path / "resumed", tmp_path / "resumed" / "checkpoints"
  with pytest.raises(KeyboardInterrupt):
    scr.run_experiment(config, out_dir=out, checkpoint_dir=ckpt, plot=False, progress=False, on_chunk=stop)
  partial = runner.load_results(out / "results.json")
  assert partial["status"] == "interrupted" and partial["chunks_done"] == 1
  result = scr.run_experiment(
    config, out_dir=out, checkpoint_dir=ckpt, resume=True, plot=False, progress=False
  )
  assert result.resumed_from == 1
  assert (out / "results.json").read_bytes() == (tmp_path / "straight" / "results.json").read_bytes()
  with pytest.raises(runner.ConfigMismatchError, match="steps: 40000 in the checkpoint"):
    scr.run_experiment(
      {**TINY, "steps": 60_000, "bins_per_chunk": 3},
      out_dir=out,
      checkpoint_dir=ckpt,
      resume=True,
      plot=False,
      progress=False,
    )


def test_make_train_matches_the_chunked_program():
  config = scr.make_config(seeds=2, steps=20_000, bin_size=5_000, bins_per_chunk=2, methods=["bp", "linear"])
  train = jax.jit(jax.vmap(scr.make_train(config)))
  metrics = train(scr.seed_keys(config))
  assert metrics["bp"]["error"].shape == (2, 4)
  # Seed i's key (hence its run) does not depend on how many seeds run.
  more = scr.seed_keys({**config, "seeds": 5})
  np.testing.assert_array_equal(jax.random.key_data(more[:2]), jax.random.key_data(scr.seed_keys(config)))
  chunked = scr.run_experiment(config, plot=False, progress=False)
  for label in ("bp", "linear"):
    np.testing.assert_allclose(metrics[label]["error"], chunked.metrics[label]["error"], rtol=1e-4)
  assert np.all(np.isnan(chunked.metrics["linear"]["dead_fraction"]))


def test_cli_and_plot(tmp_path, capsys):
  args = [
    "--seeds",
    "2",
    "--steps",
    "40000",
    "--bin-size",
    "10000",
    "--bins-per-chunk",
    "2",
    "--methods",
    "bp,cbp",
    "--out",
    str(tmp_path),
  ]
  assert scr.main(args) == 0
  out = capsys.readouterr().out
  assert "early error" in out and "cbp" in out
  assert (tmp_path / "scr.png").read_bytes()[:4] == b"\x89PNG"
  assert (tmp_path / "checkpoints").is_dir()
  assert scr.main(args) == 2  # A checkpoint exists: needs --resume or --fresh.
  assert "--resume" in capsys.readouterr().err
  assert scr.main(args + ["--resume"]) == 0  # Finished already: nothing recomputed.
  assert scr.main(["--seeds", "3"] + args[2:] + ["--resume"]) == 2
  assert "different configuration" in capsys.readouterr().err
  (tmp_path / "checkpoints" / "2" / "meta" / "metadata").write_text("{garbled")
  assert scr.main(args + ["--resume"]) == 2  # A corrupt checkpoint: refused, saying why.
  err = capsys.readouterr().err
  assert "unreadable or corrupt" in err and str(tmp_path / "checkpoints" / "2") in err


@pytest.mark.slow
def test_cli_resume_after_sigkill_is_bit_for_bit(tmp_path):
  """SIGKILL the CLI after its first checkpoint (of 20), then --resume: the
  uninterrupted run's results file, byte for byte."""
  args = [
    "--seeds",
    "2",
    "--steps",
    "100000",
    "--bin-size",
    "5000",
    "--bins-per-chunk",
    "1",
    "--methods",
    "bp,cbp,l2,snp,linear",
    "--no-plot",
  ]
  assert_resume_after_sigkill_is_bit_for_bit(
    [sys.executable, "-m", "experiments.slowly_changing_regression"] + args, tmp_path
  )


def test_demo_refuses_bad_flags_in_one_line(tmp_path, capsys):
  from experiments import demo

  assert demo.main(["--steps", "20000", "--out", str(tmp_path / "demo")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: steps (20000) must be a multiple of bin_size")
  assert "Traceback" not in err and len(err.strip().splitlines()) == 1
  assert not (tmp_path / "demo").exists()  # Refused before any work.
