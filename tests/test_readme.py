"""The README's usage snippet runs as written."""

import pathlib
import re

import jax.numpy as jnp

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_usage_snippet_runs_and_trains():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  namespace = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)
  step, params, state = namespace["step"], namespace["params"], namespace["state"]
  x = jnp.ones((1, 784))
  y = jnp.array([3])
  losses = []
  for _ in range(3):
    params, state, loss = step(params, state, x, y)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  stats = namespace["cbp_jax"].unit_stats(state)
  assert set(stats) == {"Dense_0", "Dense_1", "Dense_2"}
  assert int(stats["Dense_0"]["age"][0]) == 3


def test_nnx_end_to_end_snippet_traces_trains_and_resets_units():
  import numpy as np

  import cbp_jax

  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  namespace = {}
  exec(compile(blocks[1], "README.md", "exec"), namespace)
  graph, carry, model = namespace["graph"], namespace["carry"], namespace["model"]
  assert [(l.name, l.norm, l.activation, l.consumers[0].kernel) for l in graph] == [
    ("encoder", "norm", "relu", "hidden/kernel"),
    ("hidden", None, "gelu", "decoder/kernel"),
  ]
  stats = cbp_jax.unit_stats(carry[2])
  assert all(int(s["replaced"]) > 0 for s in stats.values())
  np.testing.assert_array_equal(model.hidden.kernel[...], carry[0]["hidden"]["kernel"])
  np.testing.assert_array_equal(model.norm.mean[...], carry[1]["norm"]["mean"])
