"""Getting each hidden layer's post-activation output out of a model.

`cbp` needs ``activations = {layer_name: h}``. A model records ``h`` by
sowing it on the *producing* module (the Dense/Conv whose kernel makes the
units), so the record's path is the layer's default name in the graph:

* linen: ``cbp_jax.sow_activation(dense, h)`` inside ``__call__`` (where
  ``dense`` is the bound submodule), then `apply_with_activations`, or
  ``model.apply(variables, x, mutable=["activations"])`` and
  `collect_activations` on the returned collection;
* nnx: ``cbp_jax.sow_activation(self.linear, h)``, then
  ``out, activations = cbp_jax.capture_activations(model, x)``.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import linen as nn
from flax import nnx

from cbp_jax import tree_paths

__all__ = [
  "apply_with_activations",
  "capture_activations",
  "collect_activations",
  "sow_activation",
]


_COLLECTION = "activations"
_RECORD = "post_activation"


def sow_activation(module: nn.Module | nnx.Module, h: jax.Array) -> jax.Array:
  """Records ``h`` as the output of the units that ``module`` produces.

  Args:
    module: the producing linen (bound) or nnx module.
    h: its post-activation output, units on the last axis.

  Returns:
    ``h``, so the call can sit inline.
  """
  if isinstance(module, nn.Module):
    module.sow(_COLLECTION, _RECORD, h)
  elif isinstance(module, nnx.Module):
    module.sow(nnx.Intermediate, _RECORD, h)
  else:
    raise ValueError(f"sow_activation needs a flax linen or nnx module, got {type(module).__name__}")
  return h


def collect_activations(records: Any) -> dict[str, jax.Array]:
  """Turns sown records into ``{layer_name: h}``.

  Args:
    records: the ``"activations"`` collection of a linen apply, or the
      intermediates that ``nnx.capture(model, nnx.Intermediate)`` returns.

  Returns:
    A dict from the producing module's path (e.g. ``"Dense_0"``,
    ``"layers/0"``) to the most recent recorded output.
  """
  found: dict[str, jax.Array] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(records)[0]:
    keys = [tree_paths.key_to_str(k) for k in path]
    if _RECORD in keys:
      # Later sows append to a tuple; flatten order keeps the newest last.
      found["/".join(keys[: keys.index(_RECORD)])] = leaf
  return found


def apply_with_activations(
  model: nn.Module, params: Any, *args: Any, **kwargs: Any
) -> tuple[Any, dict[str, jax.Array]]:
  """Runs a linen model and returns ``(output, activations)``.

  Args:
    model: a linen module that calls `sow_activation`.
    params: its ``params`` collection.
    *args: inputs of ``model.apply``.
    **kwargs: keyword inputs of ``model.apply``.

  Returns:
    The model's output and ``{layer_name: h}``.
  """
  out, state = model.apply({"params": params}, *args, mutable=[_COLLECTION], **kwargs)
  return out, collect_activations(state.get(_COLLECTION, {}))


def capture_activations(module: nnx.Module, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, jax.Array]]:
  """Runs an nnx module and returns ``(output, activations)``.

  The nnx counterpart of `apply_with_activations`: the records that
  `sow_activation` makes during this call only, keyed by the producing
  submodule's path (e.g. ``"layers/0"``, ``"block/fc1"``).

  Args:
    module: an nnx module that calls `sow_activation`.
    *args: its inputs.
    **kwargs: its keyword inputs.

  Returns:
    The module's output and ``{layer_name: h}``.

  Example:
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.hidden, self.head = nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 1, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.head(cbp_jax.sow_activation(self.hidden, nnx.relu(self.hidden(x))))
    >>> out, acts = cbp_jax.capture_activations(Net(nnx.Rngs(0)), jnp.ones((2, 4)))
    >>> {name: h.shape for name, h in acts.items()}
    {'hidden': (2, 8)}
  """
  if not isinstance(module, nnx.Module):
    raise ValueError(
      f"capture_activations needs an nnx.Module, got {type(module).__name__} "
      "(for linen use cbp_jax.apply_with_activations)"
    )
  out, records = nnx.capture(module, nnx.Intermediate)(*args, **kwargs)
  return out, collect_activations(records)
