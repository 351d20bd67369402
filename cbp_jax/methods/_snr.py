"""SNR: self-normalized resets (Farias & Jozefiak, ICLR 2025).

Farias and Jozefiak, *Self-Normalized Resets for Plasticity in Continual
Learning*, ICLR 2025. Each unit keeps its own firing rate ``p`` (the fraction
of examples on which it fired since its last reset) and its current
inactivity streak ``a`` (examples since it last fired). Under its own rate,
a streak at least that long has probability ``(1 - p) ** a``; when that is
below the threshold ``eta`` the unit is taken to be dead and is reset. Units
that rarely fire get proportionally longer streaks before a reset, so no
global threshold on activity is needed.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from cbp_jax import graph as graph_lib
from cbp_jax import reset as reset_lib
from cbp_jax import validation
from cbp_jax.methods import _scored_reset as scored_reset


def streak_log_probability(firing_rate: jax.Array, streak: jax.Array) -> jax.Array:
  """``log((1 - p) ** a)``: log-probability of an inactivity streak of ``a`` examples at rate ``p``.

  0 for ``a = 0`` (whatever ``p``), ``-inf`` for ``p = 1`` and ``a > 0``.
  """
  safe = jnp.where(streak > 0, jnp.log1p(-firing_rate), 0.0)
  return jnp.where(streak > 0, streak * safe, 0.0)


def update_firing(
  firing_rate: jax.Array, seen: jax.Array, streak: jax.Array, h: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One step's update of a layer's firing statistics from its activations ``h``.

  Every non-unit axis of ``h`` counts as examples (batch, and a conv layer's
  positions). A unit fires on an example when its output is > 0. The streak
  restarts at 0 when the unit fired anywhere in the batch and grows by the
  batch's examples otherwise (a batch is one observation of the streak).

  Returns:
    ``(firing_rate, seen, streak)`` after the step, float32 ``(width,)``.
  """
  fired = (h > 0).reshape(-1, h.shape[-1])
  n = jnp.float32(fired.shape[0])
  hits = jnp.sum(fired, axis=0, dtype=jnp.float32)
  new_seen = seen + n
  rate = (firing_rate * seen + hits) / new_seen
  new_streak = jnp.where(hits > 0, 0.0, streak + n)
  return rate, new_seen, new_streak


def snr(
  graph: graph_lib.LayerGraph,
  *,
  key: jax.Array | int,
  eta: float | jax.Array = 0.01,
  init: str = "kaiming",
  optimizer: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
  """SNR (Farias & Jozefiak, ICLR 2025): reset a unit when its silence is improbable under its own rate.

  Every step, per hidden unit: update its firing rate ``p`` (fraction of
  examples with output > 0 since its last reset) and inactivity streak ``a``
  (`update_firing`), and reset the unit when ``(1 - p) ** a < eta`` with the
  reset kernel `cbp` and `redo` use (`cbp_jax.reset`): incoming weights
  redrawn from ``init``, bias and norm offset 0, norm scale 1, outgoing
  weights 0; its statistics then restart at 0. A unit that has not fired
  since its last reset (``p = 0``) is never reset by this rule. The O(params)
  rewrite runs under a `jax.lax.cond`, only on steps that reset a unit.

  Two forms, as `redo`: last in a chain, or ``optimizer=`` to also restart
  the wrapped optimizer's statistics of reset entries. ``update`` needs
  ``params`` and ``activations=`` (as `cbp`).

  ``eta`` is the method's one hyperparameter (the paper tunes it per
  problem; 0.01 here is a starting point, not the paper's value).

  Args:
    graph: the hidden layers (`cbp_jax.graph_from_params` or `LayerGraph`).
    key: PRNG key (or int seed) of the new incoming weights.
    eta: probability threshold, in (0, 1).
    init: distribution of new incoming weights, as `cbp_jax.cbp`'s ``init``
      (a name in `cbp_jax.initializers.INITS` or an initializer callable).
    optimizer: optional optimizer to wrap.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `cbp_jax.methods.SnrState`.

  Raises:
    ValueError: naming an invalid argument; in ``init``, an ``optimizer``
      holding a `cbp`/`redo`/`regrama`/`snr` transform; at trace time, a
      graph that does not match the params or missing activations.

  Example:
    >>> model, x = cbp_jax.models.MLP(hidden=(8, 8), outputs=2), jnp.ones((4, 3))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> graph = cbp_jax.graph_from_params(params)
    >>> tx = optax.chain(optax.sgd(0.01), cbp_jax.methods.snr(graph, key=0, eta=0.01))
    >>> state = tx.init(params)
    >>> def loss(p):
    ...   y, acts = cbp_jax.apply_with_activations(model, p, x)
    ...   return jnp.sum(y ** 2), acts
    >>> (l, acts), grads = jax.value_and_grad(loss, has_aux=True)(params)
    >>> updates, state = tx.update(grads, state, params, activations=acts)
  """
  scored_reset.check_common("snr", graph, init)
  v = validation.scalar("eta", eta)
  if v is not None and not 0.0 < v < 1.0:
    raise ValueError(f"eta must be in (0, 1), got {eta!r}")
  log_eta = jnp.log(jnp.asarray(eta, jnp.float32)) if v is None else jnp.float32(math.log(v))

  def init_stats(layers):
    zeros = lambda: {l.name: jnp.zeros((l.width,), jnp.float32) for l in layers}
    return {"firing_rate": zeros(), "seen": zeros(), "streak": zeros()}

  def select(layers, grads, params, activations, count, stats):
    del grads, params, count
    selections = {}
    new = {"firing_rate": {}, "seen": {}, "streak": {}}
    for layer in layers:
      name = layer.name
      rate, seen, streak = update_firing(
        stats["firing_rate"][name], stats["seen"][name], stats["streak"][name], activations[name]
      )
      logp = streak_log_probability(rate, streak)
      eligible = logp < log_eta
      n = jnp.sum(eligible).astype(jnp.int32)
      # select_lowest skips non-finite scores; -inf (rate 1) is the most improbable.
      finite = jnp.maximum(logp, jnp.finfo(jnp.float32).min)
      selections[name] = reset_lib.select_lowest(finite, eligible, n, layer.width)
      new["firing_rate"][name], new["seen"][name], new["streak"][name] = rate, seen, streak
    return scored_reset.Scored(selections, None, new)

  def restart(stats, mask):
    return {f: jnp.where(mask, 0.0, x) for f, x in stats.items()}

  return scored_reset.unit_reset_transform(
    "snr",
    graph,
    key=key,
    init=init,
    optimizer=optimizer,
    select=select,
    needs_activations=True,
    init_stats=init_stats,
    restart_stats=restart,
  )
