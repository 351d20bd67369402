"""ReGraMa: reset units whose incoming gradients are small (Liu et al., 2025).

Liu, Obando-Ceron, Lin, Pan, Castro, Courville and Pan, *Measure gradients
not activations! Enhancing neuronal activity in deep reinforcement learning*
(2025). ReDo's schedule and kernel with another score: a unit is inactive
when the gradient magnitude of its incoming weights is small against the
layer's, whatever its activation (so it also finds units that fire but no
longer learn, e.g. saturated tanh units or units behind dead consumers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from cbp_jax import graph as graph_lib
from cbp_jax import metrics, validation
from cbp_jax import reset as reset_lib
from cbp_jax.methods import _scored_reset as scored_reset


def gradient_scores(kernel_grad: jax.Array) -> jax.Array:
  """ReGraMa's per-unit score: mean ``|dL/dW_in|`` of each unit over the layer's average.

  ``s_i = mean|G[..., i]| / mean_j mean|G[..., j]|`` for the gradient ``G``
  of a kernel with units on its last axis (Dense ``(in, n)``, Conv
  ``(kh, kw, c, n)``); all scores are 0 when the whole gradient is 0. This is
  `cbp_jax.metrics.dormant_scores` applied to the gradient.

  Args:
    kernel_grad: the kernel's gradient, at least 2-D.

  Returns:
    float32 ``(n,)``.
  """
  return metrics.dormant_scores(kernel_grad)


def regrama(
  graph: graph_lib.LayerGraph,
  *,
  key: jax.Array | int,
  tau: float | jax.Array = 0.0,
  period: int | jax.Array = 1000,
  init: str = "kaiming",
  optimizer: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
  """ReGraMa (Liu et al. 2025): every ``period`` steps, reset units of small incoming gradient.

  On steps ``period, 2 * period, ...`` every hidden unit whose
  `gradient_scores` (this step's mean incoming-weight gradient magnitude
  over the layer's average) is ``<= tau`` is reinitialised with the reset
  kernel `cbp` and `redo` use (`cbp_jax.reset`): incoming weights redrawn
  from ``init``, bias and norm offset 0, norm scale 1, outgoing weights 0.
  Other steps pass the updates through untouched.

  The score reads the updates this transform receives. Use the wrapping
  form, ``regrama(graph, ..., optimizer=optax.adam(lr))``, so they are the
  raw gradients (and the wrapped optimizer's statistics of reset entries
  restart too, as for `redo`); last in a chain after plain SGD
  (``optax.chain(optax.sgd(lr), regrama(...))``) the updates are ``-lr * g``
  and the score is the same, but after Adam or momentum it would score the
  optimizer's direction, not the gradient.

  ``update`` needs ``params``; no activations. The authors' threshold is
  user-chosen here (their settings depend on the agent); ReDo's
  ``period = 1000`` schedule is the default.

  Args:
    graph: the hidden layers (`cbp_jax.graph_from_params` or `LayerGraph`).
    key: PRNG key (or int seed) of the new incoming weights.
    tau: score threshold, >= 0 (0 resets units whose incoming gradient is
      exactly 0).
    period: reset every this many steps, >= 1.
    init: distribution of new incoming weights, as `cbp_jax.cbp`'s ``init``
      (a name in `cbp_jax.initializers.INITS` or an initializer callable).
    optimizer: optional optimizer to wrap.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `cbp_jax.methods.RedoState`.

  Raises:
    ValueError: naming an invalid argument; in ``init``, an ``optimizer``
      holding a `cbp`/`redo`/`regrama`/`snr` transform; at trace time, a
      graph that does not match the params.

  Example:
    >>> model, x = cbp_jax.models.MLP(hidden=(8, 8), outputs=2), jnp.ones((4, 3))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2))(params)
    >>> tx = cbp_jax.methods.regrama(cbp_jax.graph_from_params(params), key=0, tau=0.1,
    ...                              period=1000, optimizer=optax.adam(1e-3))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
  """
  scored_reset.check_common("regrama", graph, init)
  validation.check_nonnegative("tau", tau)
  validation.check_positive_int("period", period)

  def select(layers, grads, params, activations, count, stats):
    del params, activations, stats
    due = count % period == 0
    g = jax.tree.leaves(grads)
    selections = {}
    for layer in layers:
      scores = gradient_scores(g[layer.kernel])
      eligible = (scores <= tau) & due
      n = jnp.sum(eligible).astype(jnp.int32)
      selections[layer.name] = reset_lib.select_lowest(scores, eligible, n, layer.width)
    return scored_reset.Scored(selections, None, {})

  return scored_reset.unit_reset_transform(
    "regrama", graph, key=key, init=init, optimizer=optimizer, select=select, needs_activations=False
  )
