"""Proximal Policy Optimization pieces (Schulman et al. 2017), pure JAX.

The parts of PPO that do not depend on an environment or a network, written
as small pure functions so that a whole training run (rollouts, advantage
estimation, minibatch epochs, and CBP inside the update) compiles into one
program, purejaxrl style. `experiments/slippery_ant.py` assembles them into a learner,
which `experiments/continual_minatar.py` reuses with a categorical policy head.

Conventions: rollouts are *time-major*, arrays ``(T, ...)`` with any batch
axes (parallel environments) after time. Flags are floats or bools, 1/True
meaning "yes".

* ``terminated[t]``: step ``t`` ended the episode in a terminal state; the
  value after it is 0 (no bootstrap).
* ``episode_end[t]``: step ``t`` was the last of its episode for any reason
  (terminated, or truncated by a time limit); the advantage recursion is cut
  there. A truncated step (``episode_end`` but not ``terminated``)
  bootstraps from ``next_values[t]``, the value of the observation the step
  produced (before the environment was reset).

With ``terminated == episode_end`` this is the usual GAE where every episode
end counts as terminal (e.g. the Continual Backpropagation reference code,
where Gym's time limit sets ``done``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
  "gae",
  "normalize_advantages",
  "gaussian_log_prob",
  "clipped_surrogate_loss",
  "value_loss",
  "minibatch_indices",
  "PPOLossInfo",
]

_LOG_2PI = float(jnp.log(2.0 * jnp.pi))


def gae(
  rewards: jax.Array,
  values: jax.Array,
  next_values: jax.Array,
  terminated: jax.Array,
  episode_end: jax.Array,
  *,
  gamma: float | jax.Array,
  lam: float | jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimates and value targets of a time-major rollout.

  ``delta_t = r_t + gamma * (1 - terminated_t) * next_values_t - values_t``,
  ``A_t = delta_t + gamma * lam * (1 - episode_end_t) * A_{t+1}``, with
  ``A_T = 0`` after the last step (the estimate truncated at the rollout's
  end, bootstrapped through ``next_values``).

  Args:
    rewards: ``(T, ...)`` rewards.
    values: ``(T, ...)`` value estimates of the observations the steps acted on.
    next_values: ``(T, ...)`` value estimates of the observations the steps
      produced (before any reset).
    terminated: ``(T, ...)`` terminal flags (no bootstrap).
    episode_end: ``(T, ...)`` episode-end flags (terminal or truncated).
    gamma: discount.
    lam: GAE lambda.

  Returns:
    ``(advantages, returns)``, both ``(T, ...)`` float32, ``returns =
    advantages + values`` (the value-function targets).
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  values = jnp.asarray(values, jnp.float32)
  next_values = jnp.asarray(next_values, jnp.float32)
  if not (
    rewards.shape == values.shape == next_values.shape == jnp.shape(terminated) == jnp.shape(episode_end)
  ):
    raise ValueError(
      "gae: rewards, values, next_values, terminated and episode_end must have one shape, got "
      f"{rewards.shape}, {values.shape}, {next_values.shape}, {jnp.shape(terminated)}, "
      f"{jnp.shape(episode_end)}"
    )
  not_terminal = 1.0 - jnp.asarray(terminated, jnp.float32)
  not_end = 1.0 - jnp.asarray(episode_end, jnp.float32)
  deltas = rewards + gamma * not_terminal * next_values - values

  def back(next_adv, xs):
    delta, cont = xs
    adv = delta + gamma * lam * cont * next_adv
    return adv, adv

  _, adv = jax.lax.scan(back, jnp.zeros_like(rewards[0]), (deltas, not_end), reverse=True)
  return adv, adv + values


def normalize_advantages(advantages: jax.Array, eps: float = 1e-8) -> jax.Array:
  """``(A - mean) / (std + eps)`` over all entries (population std).

  A constant batch (std 0) gives zeros.
  """
  a = jnp.asarray(advantages, jnp.float32)
  centered = a - jnp.mean(a)
  return centered / (jnp.std(a) + eps)


def gaussian_log_prob(mean: jax.Array, log_std: jax.Array, action: jax.Array) -> jax.Array:
  """Log density of ``action`` under a diagonal Gaussian, summed over the last axis.

  ``log_std`` broadcasts against ``mean`` (e.g. a state-independent ``(A,)``).
  """
  log_std = jnp.broadcast_to(log_std, jnp.shape(mean))
  z = (action - mean) * jnp.exp(-log_std)
  return jnp.sum(-0.5 * jnp.square(z) - log_std - 0.5 * _LOG_2PI, axis=-1)


class PPOLossInfo(NamedTuple):
  """Diagnostics of a clipped-surrogate evaluation (means over the batch)."""

  approx_kl: jax.Array  # mean of (ratio - 1) - log ratio (Schulman's k3 estimator), >= 0
  clip_fraction: jax.Array  # fraction of samples with |ratio - 1| > clip_eps


def clipped_surrogate_loss(
  log_prob: jax.Array, old_log_prob: jax.Array, advantages: jax.Array, clip_eps: float | jax.Array
) -> tuple[jax.Array, PPOLossInfo]:
  """PPO's clipped surrogate policy loss (to minimise).

  ``mean(max(-ratio * A, -clip(ratio, 1 - eps, 1 + eps) * A))`` with
  ``ratio = exp(log_prob - old_log_prob)``.

  Returns:
    ``(loss, PPOLossInfo)``.
  """
  log_ratio = log_prob - old_log_prob
  ratio = jnp.exp(log_ratio)
  unclipped = -ratio * advantages
  clipped = -jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
  loss = jnp.mean(jnp.maximum(unclipped, clipped))
  info = PPOLossInfo(
    approx_kl=jnp.mean((ratio - 1.0) - log_ratio),
    clip_fraction=jnp.mean((jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32)),
  )
  return loss, info


def value_loss(values: jax.Array, returns: jax.Array) -> jax.Array:
  """Mean squared error ``mean((returns - values)^2)`` (no clipping, no 1/2)."""
  return jnp.mean(jnp.square(returns - values))


def minibatch_indices(key: jax.Array, batch_size: int, num_minibatches: int) -> jax.Array:
  """A random partition of ``range(batch_size)`` into equal minibatches.

  Returns:
    int32 ``(num_minibatches, batch_size // num_minibatches)``: row ``i``
    indexes minibatch ``i``; every index appears exactly once.

  Raises:
    ValueError: if ``num_minibatches`` does not divide ``batch_size``.
  """
  if num_minibatches < 1 or batch_size % num_minibatches:
    raise ValueError(
      f"minibatch_indices: num_minibatches ({num_minibatches}) must be >= 1 and divide "
      f"batch_size ({batch_size})"
    )
  perm = jax.random.permutation(key, batch_size).astype(jnp.int32)
  return perm.reshape(num_minibatches, batch_size // num_minibatches)
