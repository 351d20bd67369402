"""L2 regularisation: weight decay toward 0 (``optax.add_decayed_weights``)."""

from __future__ import annotations

import jax
import optax

from cbp_jax import validation


def l2(weight_decay: float | jax.Array | optax.Schedule) -> optax.GradientTransformation:
  """L2 regularisation: adds ``weight_decay * params`` to the updates.

  This is exactly ``optax.add_decayed_weights(weight_decay)`` (returned as
  is, after checking the argument). Place it *before* the learning-rate
  scaling, so the step is ``-lr * (g + weight_decay * params)`` as with
  PyTorch's ``SGD(weight_decay=...)`` that the paper's L2 runs use.

  Args:
    weight_decay: the L2 coefficient, >= 0 (a traced value or an optax
      schedule is not checked). The paper's slippery-Ant runs use 1e-4 (with
      Adam) and its CIFAR-100 runs 5e-4; other values are user-chosen.

  Returns:
    ``optax.add_decayed_weights(weight_decay)``.

  Raises:
    ValueError: if ``weight_decay`` is negative or not a number.

  Example:
    >>> tx = optax.chain(cbp_jax.methods.l2(1e-4), optax.sgd(0.01))
  """
  if not callable(weight_decay):
    validation.check_nonnegative("weight_decay", weight_decay)
  return optax.add_decayed_weights(weight_decay)
