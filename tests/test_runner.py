"""The shared experiment runner: chunk loop, results file, Ctrl-C, checkpoints, plots."""

import argparse
import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import runner
from tests.resume_checks import assert_resume_after_sigkill_is_bit_for_bit

REPO = Path(__file__).resolve().parents[1]
POINTS = 3
SEEDS = 4


def toy_chunk(carry, index):
  """A random walk per seed; records the walk's value and its square."""
  key, x = carry["key"], carry["x"]

  def point(c, j):
    key, x = c
    key, sub = jax.vmap(jax.random.split, out_axes=1)(key)
    x = x + jax.vmap(jax.random.normal)(sub) + index.astype(jnp.float32)
    return (key, x), {"walk": x, "square": x * x}

  (key, x), pts = jax.lax.scan(point, (key, x), jnp.arange(POINTS))
  metrics = {"a": {"value": pts["walk"].T, "square": pts["square"].T}, "b": {"value": -pts["walk"].T}}
  return {"key": key, "x": x}, metrics


def toy_carry(seed=0):
  return {"key": jax.random.split(jax.random.key(seed), SEEDS), "x": jnp.zeros((SEEDS,))}


def run_toy(tmp_path, chunks=4, config=None, **kw):
  kw.setdefault("progress", runner.Progress("toy", chunks, stream=None))
  return runner.run(
    toy_chunk,
    toy_carry(),
    num_chunks=chunks,
    config=config or {"n": chunks, "tag": "toy"},
    experiment="toy",
    points_per_chunk=POINTS,
    x_step=10.0,
    x_label="steps",
    runs={"a": {"method": "A"}, "b": {"method": "B"}},
    out_dir=tmp_path,
    **kw,
  )


def test_results_file_schema_and_contents(tmp_path):
  result = run_toy(tmp_path, chunks=4)
  res = json.loads((tmp_path / "results.json").read_text())
  assert res["schema"] == runner.SCHEMA
  assert res["status"] == "complete" and res["chunks_done"] == res["num_chunks"] == 4
  assert res["config"] == {"n": 4, "tag": "toy"}
  assert res["x"] == [10.0 * (i + 1) for i in range(4 * POINTS)]
  assert list(res["runs"]) == ["a", "b"] and list(res["metrics"]) == ["a", "b"]
  value = np.array(res["metrics"]["a"]["value"])
  assert value.shape == (SEEDS, 4 * POINTS)
  np.testing.assert_array_equal(np.array(res["metrics"]["b"]["value"]), -value)
  np.testing.assert_allclose(np.array(res["metrics"]["a"]["square"]), value**2, rtol=1e-6)
  np.testing.assert_array_equal(result.metrics["a"]["value"], value.astype(np.float32))
  # The same computation as one scan: chunks concatenate in order.
  carry, parts = toy_carry(), []
  for i in range(4):
    carry, m = jax.jit(toy_chunk)(carry, jnp.int32(i))
    parts.append(np.asarray(m["a"]["value"]))
  np.testing.assert_array_equal(np.concatenate(parts, axis=-1), value.astype(np.float32))
  timing = json.loads((tmp_path / "timing.json").read_text())
  assert timing["chunks_done"] == 4 and len(timing["chunk_seconds"]) == 4


def test_compiles_once_for_all_chunks(tmp_path):
  traces = []

  def counted(carry, index):
    traces.append(1)
    return toy_chunk(carry, index)

  runner.run(
    counted,
    toy_carry(),
    num_chunks=5,
    config={},
    experiment="toy",
    points_per_chunk=POINTS,
    out_dir=tmp_path,
    progress=runner.Progress("toy", 5, stream=None),
  )
  assert len(traces) == 1


def test_results_written_after_every_chunk(tmp_path):
  seen = []

  def on_chunk(done, results):
    on_disk = json.loads((tmp_path / "results.json").read_text())
    seen.append(
      (done, on_disk["status"], len(on_disk["x"]), np.array(on_disk["metrics"]["a"]["value"]).shape)
    )
    assert on_disk == json.loads(json.dumps(results))

  run_toy(tmp_path, chunks=3, on_chunk=on_chunk)
  assert seen == [
    (1, "running", 3, (SEEDS, 3)),
    (2, "running", 6, (SEEDS, 6)),
    (3, "complete", 9, (SEEDS, 9)),
  ]


def test_keyboard_interrupt_leaves_valid_partial_results(tmp_path):
  def on_chunk(done, results):
    if done == 2:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    run_toy(tmp_path, chunks=5, on_chunk=on_chunk)
  res = runner.load_results(tmp_path / "results.json")
  assert res["status"] == "interrupted" and res["chunks_done"] == 2
  assert res["metrics"]["a"]["value"].shape == (SEEDS, 2 * POINTS)
  assert len(res["x"]) == 2 * POINTS
  full = run_toy(tmp_path / "full", chunks=5)
  np.testing.assert_array_equal(res["metrics"]["a"]["value"], full.metrics["a"]["value"][:, : 2 * POINTS])


def test_resume_is_bit_identical(tmp_path):
  run_toy(tmp_path / "straight", chunks=5, checkpoint_dir=tmp_path / "straight_ckpt")

  def stop_at_3(done, results):
    if done == 3:
      raise KeyboardInterrupt

  out = tmp_path / "resumed"
  with pytest.raises(KeyboardInterrupt):
    run_toy(out, chunks=5, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=1, on_chunk=stop_at_3)
  result = run_toy(out, chunks=5, checkpoint_dir=tmp_path / "ckpt", resume=True)
  assert result.resumed_from == 3 and len(result.chunk_seconds) == 2
  straight = (tmp_path / "straight" / "results.json").read_bytes()
  assert (out / "results.json").read_bytes() == straight
  # The restored carry holds working PRNG keys.
  assert jax.dtypes.issubdtype(result.carry["key"].dtype, jax.dtypes.prng_key)


def test_resume_with_checkpoint_every_two(tmp_path):
  def stop_at_3(done, results):
    if done == 3:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    run_toy(
      tmp_path / "r", chunks=5, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=2, on_chunk=stop_at_3
    )
  result = run_toy(tmp_path / "r", chunks=5, checkpoint_dir=tmp_path / "ckpt", resume=True)
  assert result.resumed_from == 2  # The last checkpoint; chunk 3 is recomputed.
  straight = run_toy(tmp_path / "s", chunks=5)
  assert (tmp_path / "r" / "results.json").read_bytes() == (tmp_path / "s" / "results.json").read_bytes()
  np.testing.assert_array_equal(result.metrics["a"]["value"], straight.metrics["a"]["value"])


def test_resume_refuses_a_different_config(tmp_path):
  run_toy(tmp_path, chunks=2, config={"n": 2, "lr": 0.01}, checkpoint_dir=tmp_path / "ckpt")
  with pytest.raises(runner.ConfigMismatchError) as err:
    run_toy(tmp_path, chunks=2, config={"n": 2, "lr": 0.03}, checkpoint_dir=tmp_path / "ckpt", resume=True)
  assert "lr: 0.01 in the checkpoint, 0.03 now" in str(err.value)
  with pytest.raises(runner.ConfigMismatchError, match="extra: absent in the checkpoint"):
    run_toy(
      tmp_path,
      chunks=2,
      config={"n": 2, "lr": 0.01, "extra": 1},
      checkpoint_dir=tmp_path / "ckpt",
      resume=True,
    )


# --- Corrupt checkpoints -------------------------------------------------------
#
# A toy whose carry also holds random bits (incompressible, so orbax stores them
# as they are and a flipped bit cannot be noticed by any decoder: only the
# checksum can).

BITS = 2048


def bits_chunk(carry, index):
  walk, metrics = toy_chunk({"key": carry["key"], "x": carry["x"]}, index)
  bits = carry["bits"] * jnp.uint32(1664525) + jnp.uint32(1013904223)
  high = jnp.mean((bits >> 16).astype(jnp.float32), axis=1, keepdims=True)
  metrics["a"]["bits"] = jnp.broadcast_to(high, (SEEDS, POINTS))
  return {**walk, "bits": bits}, metrics


def bits_carry(seed=0):
  return {**toy_carry(seed), "bits": jax.random.bits(jax.random.key(seed + 1), (SEEDS, BITS), jnp.uint32)}


def run_bits(out, chunks=3, **kw):
  kw.setdefault("progress", runner.Progress("bits", chunks, stream=None))
  return runner.run(
    bits_chunk,
    bits_carry(),
    num_chunks=chunks,
    config={"n": chunks, "tag": "bits"},
    experiment="bits",
    points_per_chunk=POINTS,
    runs={"a": {}, "b": {}},
    out_dir=out,
    **kw,
  )


@pytest.fixture(scope="module")
def straight_bits(tmp_path_factory):
  """results.json of an uninterrupted 3-chunk run, without checkpoints."""
  out = tmp_path_factory.mktemp("straight_bits")
  run_bits(out)
  return (out / "results.json").read_bytes()


def _data_file(step_dir, array):
  """The file of a checkpoint holding ``array``'s bytes, and their offset in it."""
  raw = np.asarray(array).tobytes()
  for path in sorted(step_dir.rglob("*")):
    if path.is_file() and (at := path.read_bytes().find(raw)) >= 0:
      return path, at
  raise AssertionError(f"no file of {step_dir} holds the array's bytes")


def _truncate(path, at=None):
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])


def _flip(path, at):
  data = bytearray(path.read_bytes())
  data[at] ^= 0x04
  path.write_bytes(bytes(data))


def _garble(path, at=None):
  data = bytearray(path.read_bytes())
  data[len(data) // 3 : len(data) // 3 + 8] = b"\xff" * 8
  path.write_bytes(bytes(data))


def _delete(path, at=None):
  path.unlink()


# orbax's reader threads may report "Event loop is closed" after a failed read.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
  "target, damage, reason",
  [
    ("bits", _truncate, "its arrays cannot be read"),
    ("bits", _flip, "checksum does not match"),  # silent bit rot: only the checksum sees it
    ("bits", _delete, "its arrays cannot be read"),
    ("tree", _flip, "its arrays cannot be read"),  # orbax's own index (CRC-checked)
    ("state/_METADATA", _delete, "its arrays cannot be read"),
    ("meta/metadata", _garble, "its record cannot be read"),
  ],
)
def test_corrupt_checkpoint_is_refused_saying_why(tmp_path, straight_bits, target, damage, reason):
  out, ckpt = tmp_path / "out", tmp_path / "ckpt"
  result = run_bits(out, checkpoint_dir=ckpt)  # Keeps the checkpoints of chunks 2 and 3.
  step = ckpt / "3"
  if target == "bits":
    path, at = _data_file(step, result.carry["bits"])
    at += 4 * (SEEDS * BITS // 2) + 1  # A bit in the middle of the array.
  elif target == "tree":
    (path,), at = list((step / "state" / "d").iterdir()), 40
  else:
    path, at = step / target, None
  damage(path, at)
  with pytest.raises(runner.CorruptCheckpointError) as err:
    run_bits(out, checkpoint_dir=ckpt, resume=True)
  message = str(err.value)
  assert f"refusing to resume from {step} (chunk 3)" in message
  assert "unreadable or corrupt" in message and reason in message
  assert f"Delete {step} to resume from the previous checkpoint (chunk 2)" in message
  assert f"delete {ckpt} (and drop --resume) to start afresh" in message
  # Doing what it says: without the damaged checkpoint, the previous one resumes
  # to the uninterrupted run's results, bit for bit.
  shutil.rmtree(step)
  resumed = run_bits(out, checkpoint_dir=ckpt, resume=True)
  assert resumed.resumed_from == 2 and len(resumed.chunk_seconds) == 1
  assert (out / "results.json").read_bytes() == straight_bits


def test_corrupt_only_checkpoint_says_to_start_afresh(tmp_path):
  ckpt = tmp_path / "ckpt"
  result = run_bits(tmp_path, chunks=1, checkpoint_dir=ckpt)
  path, at = _data_file(ckpt / "1", result.carry["bits"])
  _flip(path, at + 7)
  with pytest.raises(
    runner.CorruptCheckpointError, match="There is no earlier checkpoint: delete .* to start afresh"
  ):
    run_bits(tmp_path, chunks=1, checkpoint_dir=ckpt, resume=True)


def test_checksums_and_leaf_specs_are_recorded_and_checked(tmp_path):
  ckpt = tmp_path / "ckpt"
  result = run_bits(tmp_path, chunks=1, checkpoint_dir=ckpt)
  meta_file = ckpt / "1" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  bits = np.asarray(result.carry["bits"])
  assert ["<u4", [SEEDS, BITS]] in meta["leaves"]["carry"]
  assert len(meta["checksums"]["carry"]) == len(meta["checksums"]["metrics"]) == 64
  # The recorded checksum is of exactly the saved arrays (keys as key data).
  leaves = [
    jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
    for x in jax.tree.leaves(result.carry)
  ]
  assert runner.checksum(leaves) == meta["checksums"]["carry"]
  assert runner.checksum([bits[:, ::-1]]) != runner.checksum([bits])
  # A carry of other shapes is refused as a code change, not as corruption.
  with pytest.raises(
    runner.ConfigMismatchError,
    match=r"carry leaf 0: \['<u4', \[4, 2048\]\] in the checkpoint, "
    r"\['<u4', \[4, 8\]\] now",
  ):
    runner.run(
      bits_chunk,
      {**bits_carry(), "bits": jnp.zeros((SEEDS, 8), jnp.uint32)},
      num_chunks=1,
      config={"n": 1, "tag": "bits"},
      experiment="bits",
      points_per_chunk=POINTS,
      checkpoint_dir=ckpt,
      resume=True,
      progress=runner.Progress("bits", 1, stream=None),
    )
  # Tampering with the record's checksum reads as corrupt data.
  meta["checksums"]["carry"] = "0" * 64
  meta_file.write_text(json.dumps(meta))
  with pytest.raises(runner.CorruptCheckpointError, match="carry arrays read back differ"):
    run_bits(tmp_path, chunks=1, checkpoint_dir=ckpt, resume=True)


def test_existing_checkpoint_needs_resume(tmp_path):
  run_toy(tmp_path, chunks=2, checkpoint_dir=tmp_path / "ckpt")
  with pytest.raises(FileExistsError, match="resume"):
    run_toy(tmp_path, chunks=2, checkpoint_dir=tmp_path / "ckpt")


def test_resume_of_a_finished_run_recomputes_nothing(tmp_path):
  run_toy(tmp_path, chunks=2, checkpoint_dir=tmp_path / "ckpt")
  before = (tmp_path / "results.json").read_bytes()
  result = run_toy(tmp_path, chunks=2, checkpoint_dir=tmp_path / "ckpt", resume=True)
  assert result.chunk_seconds == [] and result.resumed_from == 2
  assert (tmp_path / "results.json").read_bytes() == before


def test_bad_metrics_shape_is_rejected(tmp_path):
  def bad(carry, index):
    return carry, {"a": {"value": jnp.zeros((SEEDS, POINTS + 1))}}

  with pytest.raises(ValueError, match="last axis must be the chunk's 3 points"):
    runner.run(
      bad,
      toy_carry(),
      num_chunks=1,
      config={},
      experiment="toy",
      points_per_chunk=POINTS,
      progress=runner.Progress("toy", 1, stream=None),
    )


def test_args_reach_every_chunk_as_arguments_of_the_program(tmp_path):
  """``args`` (e.g. a data set) are passed to each call of the one compiled chunk."""

  def chunk(carry, index, data, scale):
    carry = carry + data[index] * scale
    return carry, {"a": {"v": jnp.broadcast_to(carry[:, None], (SEEDS, 1))}}

  data = jnp.arange(3.0)[:, None] * jnp.ones((3, SEEDS))
  kw = dict(
    num_chunks=3,
    config={},
    experiment="args",
    points_per_chunk=1,
    progress=runner.Progress("args", 3, stream=None),
  )
  result = runner.run(chunk, jnp.zeros(SEEDS), args=(data, jnp.float32(2.0)), **kw)
  np.testing.assert_array_equal(result.metrics["a"]["v"][0], [0.0, 2.0, 6.0])
  compiled, _ = runner.compile_chunk(jax.jit(chunk), jnp.zeros(SEEDS), (data, jnp.float32(2.0)))
  _, m = compiled(jnp.zeros(SEEDS), jnp.int32(2), data + 1, jnp.float32(1.0))  # Not constants.
  np.testing.assert_array_equal(m["a"]["v"][:, 0], 3.0)


def test_batch_over_seeds_and_whole_run():
  def init(key):
    return {"key": key, "x": jnp.zeros(())}

  def chunk(carry, index, shift):
    key, sub = jax.random.split(carry["key"])
    x = carry["x"] + jax.random.normal(sub) + shift
    return {"key": key, "x": x}, {"a": {"x": x[None]}}

  config = {"seed": 3, "seeds": 2}
  keys = runner.seed_keys(config)
  np.testing.assert_array_equal(jax.random.key_data(keys[1]), jax.random.key_data(runner.seed_key(config, 1)))
  outs = {}
  for axis, squeeze in (("vmap", True), ("map", True), ("vmap", False)):
    b_init, b_chunk = runner.batch_over_seeds(
      init, chunk, 2, seed_axis=axis, num_args=1, squeeze_single=squeeze
    )
    carry, m = b_chunk(b_init(keys), jnp.int32(0), jnp.float32(1.0))
    outs[axis, squeeze] = np.asarray(m["a"]["x"])
    assert outs[axis, squeeze].shape == (2, 1)
  for v in outs.values():
    np.testing.assert_allclose(v, outs["vmap", True], rtol=1e-6)
  # One seed: unbatched inside (squeeze), the same numbers as seed 0 of two.
  one_init, one_chunk = runner.batch_over_seeds(init, chunk, 1, num_args=1)
  _, m1 = one_chunk(one_init(keys[:1]), jnp.int32(0), jnp.float32(1.0))
  np.testing.assert_allclose(np.asarray(m1["a"]["x"]), outs["vmap", True][:1], rtol=1e-6)
  # The whole run as one program: all chunks' points in order.
  train = runner.whole_run(init, chunk, 3, jnp.float32(1.0))
  whole = jax.jit(jax.vmap(train))(keys)["a"]["x"]
  assert whole.shape == (2, 3)
  np.testing.assert_allclose(whole[:, :1], outs["vmap", True], rtol=1e-6)


def test_config_and_command_line_helpers():
  base = {"a": 1, "nested": {"x": 1, "y": [1, 2]}, "sweep": {"m": {"k": [1]}}}
  merged = runner.merge_config(base, {"nested": {"y": [3]}, "sweep": {"n": {}}}, replace=("sweep",))
  assert merged == {"a": 1, "nested": {"x": 1, "y": [3]}, "sweep": {"n": {}}}
  with pytest.raises(ValueError, match="unknown config entry sweep.'n'"):
    runner.merge_config(base, {"sweep": {"n": {}}})  # Merged (strictly) unless replaced.
  assert base["nested"]["y"] == [1, 2]  # Not modified.
  with pytest.raises(ValueError, match="unknown config entry nested.'z'"):
    runner.merge_config(base, {"nested": {"z": 0}})
  with pytest.raises(ValueError, match="seeds must be a positive int, got True"):
    runner.require_positive_ints({"seeds": True}, ("seeds",))
  with pytest.raises(ValueError, match="without repeats"):
    runner.require_methods(["bp", "bp"], ("bp",))
  defaults = {"cbp": {"rate": 1e-4, "maturity": 100, "utility": "c", "accumulate": False}}
  sets = runner.parse_hparam_sets(
    ["cbp.rate=1e-3", "cbp.maturity=7", "cbp.utility=u", "cbp.accumulate=true"], defaults
  )
  assert sets == {"cbp": {"rate": 1e-3, "maturity": 7, "utility": "u", "accumulate": True}}
  assert type(sets["cbp"]["maturity"]) is int
  for bad, message in (
    ("cbp.nope=1", "cbp has no hyperparameter 'nope'"),
    ("bp.rate=1", "unknown method 'bp'"),
    ("cbp", "expected METHOD.HPARAM"),
  ):
    with pytest.raises(ValueError, match=message):
      runner.parse_hparam_sets([bad], defaults)
  import argparse

  args = argparse.Namespace(seeds=3, seed=None, steps=10, methods=" bp, cbp,")
  assert runner.overrides_from_args(args, ("seeds", "seed"), total_steps="steps") == {
    "seeds": 3,
    "total_steps": 10,
    "methods": ["bp", "cbp"],
  }


def test_nan_round_trip_and_mean_stderr(tmp_path):
  data = {"metrics": {"a": {"m": np.array([[1.0, np.nan], [3.0, np.nan]])}}}
  runner.write_json_atomic(tmp_path / "f.json", data)
  text = (tmp_path / "f.json").read_text()
  assert "NaN" not in text and "null" in text
  mean, se = runner.mean_and_stderr(np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 7.0]]))
  np.testing.assert_allclose(mean, [3.0, 5.0])
  np.testing.assert_allclose(se, [2.0 / np.sqrt(3), np.std([2, 6, 7], ddof=1) / np.sqrt(3)])
  mean1, se1 = runner.mean_and_stderr(np.array([[1.0, 2.0]]))
  np.testing.assert_array_equal(se1, [0.0, 0.0])


def test_plot_results_writes_a_png(tmp_path):
  result = run_toy(tmp_path, chunks=2)
  results = runner.load_results(tmp_path / "results.json")
  results["metrics"]["b"]["square"] = np.full((SEEDS, 2 * POINTS), np.nan)  # Skipped.
  path = runner.plot_results(results, tmp_path / "plot.png")
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  path2 = runner.plot_results(
    tmp_path / "results.json", tmp_path / "p2.png", metrics=("value",), labels=("a",)
  )
  assert path2.stat().st_size > 1000
  assert result.status == "complete"


SIGINT_SCRIPT = textwrap.dedent("""
    import sys, time
    import jax, jax.numpy as jnp
    sys.path.insert(0, {repo!r})
    from experiments import runner

    def chunk(carry, index):
      def body(c, _):
        return c * 0.999 + jnp.sin(c), None
      carry, _ = jax.lax.scan(body, carry, None, length=3_000_000)
      return carry, {{"a": {{"v": carry[:, None]}}}}

    def slow(done, results):
      print("chunk", done, flush=True)
      time.sleep(0.5)

    try:
      runner.run(chunk, jnp.ones((2,)), num_chunks=200, config={{"k": 1}}, experiment="sig",
                 points_per_chunk=1, out_dir=sys.argv[1], on_chunk=slow,
                 progress=runner.Progress("sig", 200, stream=None))
    except KeyboardInterrupt:
      sys.exit(130)
""")


def test_real_sigint_leaves_valid_partial_results(tmp_path):
  script = tmp_path / "sig.py"
  script.write_text(SIGINT_SCRIPT.format(repo=str(REPO)))
  # The child gets SIGINT's default disposition, as in a terminal: a test
  # run started in the background by a non-interactive shell ignores SIGINT,
  # the child would inherit that and Python would never raise
  # KeyboardInterrupt.
  proc = subprocess.Popen(
    [sys.executable, str(script), str(tmp_path / "out")],
    stdout=subprocess.PIPE,
    text=True,
    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
  )
  try:
    for line in proc.stdout:
      if line.startswith("chunk 2"):
        break
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
  finally:
    if proc.poll() is None:
      proc.kill()
  res = runner.load_results(tmp_path / "out" / "results.json")
  assert res["status"] == "interrupted"
  assert 2 <= res["chunks_done"] < 200
  assert res["metrics"]["a"]["v"].shape == (2, res["chunks_done"])
  assert len(res["x"]) == res["chunks_done"]


KILL_CHUNKS = 12
SIGKILL_SCRIPT = textwrap.dedent("""
    import argparse, time
    from pathlib import Path
    from tests.test_runner import KILL_CHUNKS, run_bits

    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    run_bits(out, chunks=KILL_CHUNKS, checkpoint_dir=out / "checkpoints", resume=args.resume,
             on_chunk=lambda done, results: time.sleep(0.1))  # Time to be killed in.
""")


def test_resume_after_sigkill_is_bit_for_bit(tmp_path):
  """A process running `runner.run` is SIGKILLed after its first checkpoint; a new
  process resumes it to the uninterrupted run's results file, byte for byte."""
  script = tmp_path / "kill_me.py"
  script.write_text(SIGKILL_SCRIPT)
  done = assert_resume_after_sigkill_is_bit_for_bit([sys.executable, str(script)], tmp_path)
  assert done < KILL_CHUNKS


def test_presets_are_exclusive_and_merge_over_the_defaults():
  parser = argparse.ArgumentParser()
  runner.add_presets(parser, small="a small run", big="a big run")
  parser.add_argument("--width", type=int)
  defaults = {"width": 100, "cbp": {"rate": 1e-4, "maturity": 100}}
  presets = {"small": {"width": 10, "cbp": {"rate": 1e-2}}, "big": {"width": 1000}}
  assert runner.preset_overrides(parser.parse_args([]), defaults, **presets) == {}
  small = runner.preset_overrides(parser.parse_args(["--small"]), defaults, **presets)
  assert small == {"width": 10, "cbp": {"rate": 1e-2, "maturity": 100}}
  assert runner.preset_overrides(parser.parse_args(["--big"]), defaults, **presets)["width"] == 1000
  assert "(other flags still override)" in parser.format_help()
  with pytest.raises(SystemExit):
    parser.parse_args(["--small", "--big"])
