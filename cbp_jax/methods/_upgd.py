"""UPGD: utility-based perturbed gradient descent (Elsayed & Mahmood, ICLR 2024).

Elsayed and Mahmood, *Addressing Loss of Plasticity and Catastrophic
Forgetting in Continual Learning*, ICLR 2024. Each weight carries a utility,
an estimate of how much the loss would grow if the weight were set to 0:

* first order: ``u = -g * w``;
* second order: ``u = -g * w + h * w**2 / 2`` with ``h`` a diagonal Hessian
  estimate (the paper's HesScale).

A running average ``U <- beta * U + (1 - beta) * u`` (started at 0, read with
the bias correction ``1 - beta**t``) is scaled by the largest raw average
over *all* weights and squashed, ``s = sigmoid(U_hat / max U)``. The step
protects useful weights and perturbs the others:

    ``w <- (1 - lr * wd) * w - lr * (g + sigma * N(0, 1)) * (1 - s)``

which is the authors' global, protecting first/second-order UPGD (variation 2
of ``core/optim/weight_upgd`` in github.com/mohmdelsayed/upgd).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cbp_jax import prng, validation

_ORDERS = (1, 2)


class ScaleByUpgdState(NamedTuple):
  """State of `scale_by_upgd`.

  Attributes:
    count: steps taken (int32), for the bias correction.
    key: PRNG key of the perturbation; split every step.
    utility: per weight, the running average of the utility (not bias
      corrected), a tree like the parameters.
  """

  count: jax.Array
  key: jax.Array
  utility: Any


def utilities(grads: Any, params: Any, hessian_diag: Any | None = None) -> Any:
  """Per-weight utility of UPGD: ``-g * w`` (+ ``h * w**2 / 2`` with a Hessian diagonal).

  Args:
    grads: gradient tree.
    params: parameter tree of the same structure.
    hessian_diag: optional tree of diagonal Hessian estimates (second order).

  Returns:
    The utility tree, float32.
  """
  first = jax.tree.map(lambda g, w: -g.astype(jnp.float32) * w.astype(jnp.float32), grads, params)
  if hessian_diag is None:
    return first
  return jax.tree.map(
    lambda u, h, w: u + 0.5 * h.astype(jnp.float32) * jnp.square(w.astype(jnp.float32)),
    first,
    hessian_diag,
    params,
  )


def scaled_utilities(utility: Any, count: jax.Array, beta_utility: Any) -> Any:
  """``sigmoid((U / (1 - beta**t)) / max U)``: UPGD's gate, in ``(0, 1)``.

  The maximum is over the raw (not bias-corrected) averages of every weight,
  as the authors' code. Where it is exactly 0 (the first step of a net whose
  gradients are all 0) the division would give NaN; 1 is used instead, so
  every gate is ``sigmoid(0) = 0.5`` there.

  Args:
    utility: the running averages (`ScaleByUpgdState.utility`).
    count: steps taken, >= 1.
    beta_utility: the averages' decay.

  Returns:
    The gate tree.
  """
  leaves = jax.tree.leaves(utility)
  global_max = jnp.max(jnp.stack([jnp.max(u) for u in leaves]))
  global_max = jnp.where(global_max == 0, 1.0, global_max)
  correction = 1.0 - jnp.asarray(beta_utility, jnp.float32) ** count.astype(jnp.float32)
  return jax.tree.map(lambda u: jax.nn.sigmoid(u / correction / global_max), utility)


def scale_by_upgd(
  *,
  key: jax.Array | int,
  beta_utility: float | jax.Array = 0.999,
  sigma: float | jax.Array = 0.01,
  order: int = 1,
) -> optax.GradientTransformationExtraArgs:
  """UPGD's direction ``(g + sigma * N(0, 1)) * (1 - s)`` (Elsayed & Mahmood, ICLR 2024).

  ``g`` are the incoming updates (the gradients when this transform comes
  first) and ``s`` the scaled utility of each weight (`scaled_utilities`).
  Follow it with the learning rate, as `upgd` does; the utility reads
  ``params``, so ``update`` needs them.

  Args:
    key: PRNG key (or int seed) of the perturbation; give each seed its own.
    beta_utility: decay of the utility's running average, in [0, 1).
    sigma: standard deviation of the Gaussian perturbation, >= 0.
    order: 1 (utility ``-g w``) or 2 (adds ``h w**2 / 2``; ``update`` then
      needs the keyword argument ``hessian_diag``, a tree like the params:
      any diagonal estimate, e.g. the exact diagonal on a small net or
      Hutchinson's ``z * (H z)`` with Rademacher ``z`` from a
      ``jax.jvp`` of ``jax.grad(loss)``; the paper uses HesScale).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `ScaleByUpgdState`.

  Raises:
    ValueError: naming an argument out of range; at ``update``, missing
      ``params`` or (order 2) ``hessian_diag``.

  Example:
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0),
    ...                  cbp_jax.methods.scale_by_upgd(key=0),
    ...                  optax.scale_by_learning_rate(1e-2))
  """
  validation.check_range("beta_utility", beta_utility, 0.0, 1.0, high_open=True)
  validation.check_nonnegative("sigma", sigma)
  if order not in _ORDERS:
    raise ValueError(f"order must be one of {_ORDERS}, got {order!r}")
  key = validation.as_key(key)

  def init_fn(params):
    return ScaleByUpgdState(
      count=jnp.zeros((), jnp.int32),
      key=key,
      utility=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params),
    )

  def update_fn(updates, state, params=None, *, hessian_diag=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("upgd: update needs params (tx.update(grads, state, params))")
    if order == 2 and hessian_diag is None:
      raise ValueError(
        "upgd(order=2): update needs the keyword argument hessian_diag (a tree like the "
        "params of diagonal Hessian estimates)"
      )
    count = state.count + 1
    u = utilities(updates, params, hessian_diag if order == 2 else None)
    utility = jax.tree.map(lambda avg, x: beta_utility * avg + (1.0 - beta_utility) * x, state.utility, u)
    gates = scaled_utilities(utility, count, beta_utility)
    key, noise_key = prng.split(state.key)
    leaves, treedef = jax.tree.flatten(updates)
    # One draw serves every leaf (in tree order): on small nets the per-call
    # cost of a draw, not the numbers drawn, dominates the step.
    sizes = [math.prod(g.shape) for g in leaves]
    noise = prng.normal(noise_key, (sum(sizes),))
    offsets = itertools.accumulate(sizes, initial=0)
    out = [
      ((g.astype(jnp.float32) + sigma * noise[o : o + n].reshape(g.shape)) * (1.0 - s)).astype(g.dtype)
      for g, s, n, o in zip(leaves, jax.tree.leaves(gates), sizes, offsets)
    ]
    return (jax.tree.unflatten(treedef, out), ScaleByUpgdState(count=count, key=key, utility=utility))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def upgd(
  learning_rate: float | jax.Array | optax.Schedule,
  *,
  key: jax.Array | int,
  beta_utility: float | jax.Array = 0.999,
  sigma: float | jax.Array = 0.01,
  weight_decay: float | jax.Array = 0.0,
  order: int = 1,
) -> optax.GradientTransformationExtraArgs:
  """UPGD (Elsayed & Mahmood, ICLR 2024) as a complete optimizer.

  ``w <- (1 - lr * wd) * w - lr * (g + sigma * N(0, 1)) * (1 - s)``, with
  ``s = sigmoid(U_hat / max U)`` the scaled utility of each weight (see
  `scale_by_upgd`): weights of high utility are protected from both the
  gradient and the noise, the others are perturbed (which restores
  plasticity) and learn at the full rate. It is
  ``optax.chain(scale_by_upgd(...), optax.add_decayed_weights(wd),
  optax.scale_by_learning_rate(lr))``, so any part can be recombined.

  The authors' input-permuted MNIST settings: ``lr 1e-3``, ``beta_utility
  0.999``, ``sigma 0.01``, ``weight_decay 0`` (their
  ``ex10_statistics_input_permuted_mnist_upgd.py``); they sweep all four per
  problem.

  Args:
    learning_rate: step size (or an optax schedule).
    key: PRNG key (or int seed) of the perturbation.
    beta_utility: decay of the utility's running average, in [0, 1).
    sigma: standard deviation of the perturbation, >= 0.
    weight_decay: multiplicative decay ``1 - lr * wd`` of every weight, >= 0.
    order: 1 (first-order utility) or 2 (second order; pass
      ``hessian_diag=`` to ``update``).

  Traced hyperparameters (vmapped sweeps) are not checked.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: naming an argument out of range.

  Example:
    >>> params, grads = {"w": jnp.ones(3)}, {"w": jnp.full(3, 0.5)}
    >>> tx = cbp_jax.methods.upgd(1e-3, key=0, beta_utility=0.999, sigma=0.01)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
  """
  if not callable(learning_rate):
    validation.check_nonnegative("learning_rate", learning_rate)
  validation.check_nonnegative("weight_decay", weight_decay)
  return optax.chain(
    scale_by_upgd(key=key, beta_utility=beta_utility, sigma=sigma, order=order),
    optax.add_decayed_weights(weight_decay),
    optax.scale_by_learning_rate(learning_rate),
  )
