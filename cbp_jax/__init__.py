"""cbp_jax: Continual Backpropagation and plasticity tools for JAX, Optax and Flax.

The data path of one training step:
  params -> activations (`activations`) -> utility (`utility`)
  -> reset (`reset`) -> updates (`transform.cbp`).
"""

import importlib

from cbp_jax import initializers, methods, metrics, models, prng, reset, resnet, sharding, utility
from cbp_jax.activations import (
  apply_with_activations,
  capture_activations,
  collect_activations,
  sow_activation,
)
from cbp_jax.graph import Consumer, Layer, LayerGraph, graph_from_params
from cbp_jax.trace import trace_graph
from cbp_jax.transform import CbpState, LayerState, cbp, reset_batch_stats, unit_stats

__version__ = "0.1.0"

__all__ = [
  "apply_with_activations",
  "capture_activations",
  "cbp",
  "CbpState",
  "collect_activations",
  "Consumer",
  "graph_from_params",
  "initializers",
  "methods",
  "metrics",
  "Layer",
  "LayerGraph",
  "LayerState",
  "models",
  "prng",
  "reset",
  "resnet",
  "sharding",
  "utility",
  "reset_batch_stats",
  "sow_activation",
  "trace_graph",
  "unit_stats",
]

# Moved to the repository's experiments/ folder; the old names warn and forward (cbp_jax/_moved.py).
_MOVED = ("data", "ppo")


def __getattr__(name):
  if name in _MOVED:  # ``cbp_jax.data`` after a plain ``import cbp_jax``, as before the move.
    return importlib.import_module(f"cbp_jax.{name}")
  raise AttributeError(f"module 'cbp_jax' has no attribute {name!r}")
