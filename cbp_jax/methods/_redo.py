"""ReDo (Sokar et al. 2023): recycle tau-dormant units every ``period`` steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from cbp_jax import graph as graph_lib
from cbp_jax import metrics, validation
from cbp_jax import reset as reset_lib
from cbp_jax.methods import _scored_reset as scored_reset


def redo(
  graph: graph_lib.LayerGraph,
  *,
  key: jax.Array | int,
  tau: float | jax.Array = 0.0,
  period: int | jax.Array = 1000,
  init: str = "kaiming",
  optimizer: optax.GradientTransformation | None = None,
  next_bias_correction: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """ReDo (Sokar et al. 2023): recycle tau-dormant units every ``period`` steps.

  On steps ``period, 2 * period, ...`` every unit whose dormancy score
  (`cbp_jax.metrics.dormant_scores` of this step's activations: its mean
  ``|h|`` over the batch divided by the layer's average) is ``<= tau`` is
  reinitialised with the reset kernel `cbp` uses (`cbp_jax.reset`): incoming
  weights redrawn from ``init``, bias (and a norm's offset) 0, norm scale 1,
  outgoing weights 0. Other steps pass the updates through untouched (the
  reset is skipped with `jax.lax.cond`). Untouched entries keep exactly the
  update they had. ``tau = 0`` recycles units whose output is exactly 0 on
  the batch (dead ReLUs); ReDo used e.g. ``tau = 0.025`` or ``0.1`` and
  ``period = 1000``.

  Two forms, as for `cbp`:

  * last in a chain, ``optax.chain(optax.adam(lr), redo(graph, ...))``: the
    earlier transforms' statistics of reset units are kept;
  * wrapping, ``redo(graph, ..., optimizer=optax.adam(lr))``: the wrapped
    optimizer's per-parameter statistics (Adam moments, ...) of every reset
    parameter entry also restart (as ReDo does), for any optax optimizer.

  ``update`` needs ``params`` and the keyword extra argument ``activations``
  (the same dict `cbp` takes, e.g. from `cbp_jax.apply_with_activations`),
  on every step: shapes are static under `jax.jit`.

  With `cbp`, chain the two rather than nesting one as the other's
  ``optimizer=`` (refused: neither would get the activations), e.g.
  ``optax.chain(cbp(graph, ..., optimizer=optax.adam(lr)), redo(graph, ...))``:
  each resets its own units, and `reset_optimizer_for` handles the chain.

  Args:
    graph: the hidden layers (`cbp_jax.graph_from_params` or `LayerGraph`).
    key: PRNG key (or int seed) for the new incoming weights.
    tau: dormancy threshold, >= 0.
    period: reset every this many steps, >= 1.
    init: distribution of new incoming weights, as `cbp_jax.cbp`'s ``init``
      (a name in `cbp_jax.initializers.INITS` or an initializer callable).
    optimizer: optional optimizer to wrap (second form above).
    next_bias_correction: if True, each consumer's bias absorbs
      ``w_out[i] * mean_batch(h_i)`` of a reset unit ``i`` (its mean
      contribution on this batch), so the function jumps less for ``tau > 0``.
      ReDo does not do this (default False); for ``tau = 0`` and non-negative
      activations the correction is 0 anyway.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `RedoState`.

  Raises:
    ValueError: naming an invalid argument; in ``init``, an ``optimizer``
      holding a `cbp` or `redo` transform, or ``redo`` itself nested as
      another transform's ``optimizer``; at trace time, a graph that does not
      match the params or missing/misshaped activations.

  Example:
    >>> model = cbp_jax.models.MLP(hidden=(16, 16), outputs=1)
    >>> x = jnp.ones((4, 8))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> tx = cbp_jax.methods.redo(cbp_jax.graph_from_params(params), key=1,
    ...                           tau=0.025, period=1000, optimizer=optax.adam(1e-3))
    >>> state = tx.init(params)
    >>> def loss(p):
    ...   y, acts = cbp_jax.apply_with_activations(model, p, x)
    ...   return jnp.mean(y ** 2), acts
    >>> (l, acts), g = jax.value_and_grad(loss, has_aux=True)(params)
    >>> updates, state = tx.update(g, state, params, activations=acts)
    >>> params = optax.apply_updates(params, updates)
  """
  scored_reset.check_common("redo", graph, init)
  validation.check_nonnegative("tau", tau)
  validation.check_positive_int("period", period)

  def select(layers, grads, params, activations, count, stats):
    del grads, params, stats
    due = count % period == 0
    selections, means = {}, {}
    for layer in layers:
      name = layer.name
      h = activations[name]
      scores = metrics.dormant_scores(h)
      eligible = (scores <= tau) & due
      n = jnp.sum(eligible).astype(jnp.int32)
      selections[name] = reset_lib.select_lowest(scores, eligible, n, layer.width)
      means[name] = jnp.mean(h.astype(jnp.float32), axis=tuple(range(h.ndim - 1)))
    return scored_reset.Scored(selections, means if next_bias_correction else None, {})

  return scored_reset.unit_reset_transform(
    "redo", graph, key=key, init=init, optimizer=optimizer, select=select, needs_activations=True
  )
