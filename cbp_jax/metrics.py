"""Plasticity correlates: dead/dormant units, feature-matrix ranks, weight and gradient magnitudes.

These are the quantities the Continual Backpropagation paper (Dohare et al., Nature 2024) tracks to explain loss
of plasticity (see "Plasticity metrics" on the Semantics page of the documentation). Every function here is a pure
``jax.numpy`` function of static-shaped inputs: it can be wrapped in :func:`jax.jit`, mapped with :func:`jax.vmap`
(e.g. over a leading seed axis), and called on ``bfloat16`` inputs. All arithmetic is done in ``float32``.

Conventions
-----------
* An *activation array* ``h`` has shape ``(batch, ..., n_units)``: the **unit axis is last**. Any middle axes
  (e.g. the spatial ``H, W`` axes of a conv layer in NHWC layout) are treated as more samples, so a conv layer's
  channel ``c`` is one unit observed at ``batch * H * W`` positions.
* A *feature matrix* ``features`` has shape ``(batch, ..., d)`` and is reshaped to ``(-1, d)`` before its
  singular values are taken.
* Bad static inputs (wrong rank, empty axes, thresholds out of range) raise :class:`ValueError` at trace time,
  with a message naming the argument and the offending value or shape.

Return types
------------
* Fractions, scores, norms and the effective rank are ``float32``.
* :func:`approximate_rank` and :func:`stable_rank` are counts and are returned as ``int32`` scalars.

Edge cases (decided deliberately)
---------------------------------
* A layer whose activations are all zero has dormant score 0 for every unit (no division by zero), so it is
  100% dormant for any ``tau >= 0`` and 100% dead.
* An all-zero feature matrix has effective rank ``0.0``, approximate rank ``0`` and stable rank ``0``: the rank of
  the zero matrix is 0, and 0 keeps the three rank measures consistent (any non-zero matrix has effective rank
  ``>= 1`` and approximate/stable rank ``>= 1``). No NaN is produced.
* Zero singular values contribute ``0 * log 0 = 0`` to the entropy of the effective rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from cbp_jax import tree_paths
from cbp_jax import validation

__all__ = [
    "dead_unit_fraction",
    "active_fractions",
    "rarely_active_fraction",
    "dormant_scores",
    "dormant_fraction",
    "effective_rank",
    "approximate_rank",
    "stable_rank",
    "singular_values",
    "weight_magnitude",
    "feature_norm",
    "gradient_norm",
    "layer_metrics",
]


# ----------------------------------------------------------------------------------------------------------------
# Input validation helpers (static shapes only, run at trace time).
# ----------------------------------------------------------------------------------------------------------------


def _as_array(x: Any, name: str, fn: str) -> jax.Array:
  try:
    return jnp.asarray(x)
  except TypeError as e:  # e.g. a dict or a string
    raise ValueError(f"{fn}: `{name}` must be an array, got {type(x).__name__}.") from e


def _check_activations(h: Any, fn: str, name: str = "h") -> jax.Array:
  """Validates an activation array of shape (batch, ..., n_units); returns it as a float32 jax array."""
  h = _as_array(h, name, fn)
  if h.ndim < 2:
    raise ValueError(
        f"{fn}: `{name}` must have shape (batch, ..., n_units) with ndim >= 2 (unit axis last), got shape "
        f"{tuple(h.shape)} (ndim {h.ndim}). For a single sample, add a leading batch axis: {name}[None]."
    )
  if h.shape[-1] == 0:
    raise ValueError(f"{fn}: `{name}` has no units (last axis has size 0), shape {tuple(h.shape)}.")
  if h.size == 0:
    raise ValueError(f"{fn}: `{name}` has no samples (a non-unit axis has size 0), shape {tuple(h.shape)}.")
  if jnp.issubdtype(h.dtype, jnp.complexfloating):
    raise ValueError(f"{fn}: `{name}` must be real-valued, got dtype {h.dtype}.")
  return h.astype(jnp.float32)


def _check_features(features: Any, fn: str) -> jax.Array:
  """Validates a feature matrix (batch, ..., d) and returns it reshaped to float32 (-1, d)."""
  x = _check_activations(features, fn, name="features")
  return x.reshape(-1, x.shape[-1])


def _check_threshold(threshold: Any, fn: str) -> None:
  v = validation.scalar("threshold", threshold)
  if v is not None and not (0.0 < v <= 1.0):  # also rejects NaN
    raise ValueError(f"{fn}: `threshold` must be in (0, 1], got {threshold!r}.")


def _check_fraction(value: Any, name: str, fn: str) -> None:
  v = validation.scalar(name, value)
  if v is not None and not (0.0 <= v <= 1.0):  # also rejects NaN
    raise ValueError(f"{fn}: `{name}` must be in [0, 1], got {value!r}.")


def _check_tau(tau: Any, fn: str) -> None:
  v = validation.scalar("tau", tau)
  if v is not None and not (v >= 0.0):  # also rejects NaN
    raise ValueError(f"{fn}: `tau` must be a non-negative number, got {tau!r}.")


# ----------------------------------------------------------------------------------------------------------------
# Dead and dormant units.
# ----------------------------------------------------------------------------------------------------------------


def dead_unit_fraction(h: jax.Array) -> jax.Array:
  """Fraction of units that are never active on a probe batch.

  A unit is *dead* when its output is ``<= 0`` for every sample (and every spatial position) of ``h``. For ReLU
  outputs this is exactly "the output is 0 everywhere", the definition of the paper; the ``<= 0`` test makes it
  robust to a pre-activation being passed by mistake. It is meant for activations with a non-negative range
  (ReLU family); for tanh/GELU-like units use :func:`dormant_fraction` instead.

  Args:
    h: activations of shape ``(batch, ..., n_units)``; the unit axis is last and middle axes (conv ``H, W``) are
      treated as more samples. Any real dtype (``bfloat16`` included).

  Returns:
    A ``float32`` scalar in ``[0, 1]``: (number of dead units) / ``n_units``.

  Raises:
    ValueError: if ``h`` has fewer than 2 dimensions or an empty axis.

  Example:
    >>> import jax.numpy as jnp
    >>> h = jnp.array([[0., 1., 0.], [0., 2., 3.]])
    >>> float(dead_unit_fraction(h))  # unit 0 is never active
    0.3333333432674408
  """
  h = _check_activations(h, "dead_unit_fraction")
  active = jnp.any(h > 0, axis=tuple(range(h.ndim - 1)))
  return jnp.mean(jnp.logical_not(active).astype(jnp.float32))


def active_fractions(h: jax.Array) -> jax.Array:
  """Fraction of the probe samples on which each unit is active (output ``> 0``).

  Args:
    h: activations of shape ``(batch, ..., n_units)``; the unit axis is last and middle axes (conv ``H, W``) are
      treated as more samples, so a conv channel's fraction is over ``batch * H * W`` positions.

  Returns:
    A ``float32`` array of shape ``(n_units,)`` with entries in ``[0, 1]``.

  Raises:
    ValueError: if ``h`` has fewer than 2 dimensions or an empty axis.

  Example:
    >>> import jax.numpy as jnp
    >>> h = jnp.array([[0., 1., 2.], [0., 0., 3.], [0., 0., 1.], [0., 0., 1.]])
    >>> active_fractions(h)
    Array([0.  , 0.25, 1.  ], dtype=float32)
  """
  h = _check_activations(h, "active_fractions")
  return jnp.mean((h > 0).astype(jnp.float32), axis=tuple(range(h.ndim - 1)))


def rarely_active_fraction(h: jax.Array, threshold: float | jax.Array = 0.01) -> jax.Array:
  """Fraction of units active on fewer than a fraction ``threshold`` of the probe samples.

  A unit counts when its :func:`active_fractions` entry is ``< threshold``, or when it is never active (``0``),
  so ``threshold = 0`` gives exactly :func:`dead_unit_fraction`. This is the paper's dormant-unit measure for
  class-incremental CIFAR-100 (ReLU units active on fewer than 1% of the probe images, ``threshold = 0.01``);
  :func:`dormant_fraction` is ReDo's magnitude-based measure instead.

  Args:
    h: activations of shape ``(batch, ..., n_units)``; unit axis last, middle axes (conv ``H, W``) are more
      samples.
    threshold: fraction in ``[0, 1]``. May be a traced value (then it is not validated).

  Returns:
    A ``float32`` scalar in ``[0, 1]``.

  Raises:
    ValueError: if ``h`` has fewer than 2 dimensions or an empty axis, or ``threshold`` is not in ``[0, 1]``.

  Example:
    >>> import jax.numpy as jnp
    >>> h = jnp.array([[0., 1., 2.], [0., 0., 3.], [0., 0., 1.], [0., 0., 1.]])  # active on 0, 1/4, 4/4
    >>> float(rarely_active_fraction(h, 0.3)), float(rarely_active_fraction(h, 0.0))
    (0.6666666865348816, 0.3333333432674408)
  """
  _check_fraction(threshold, "threshold", "rarely_active_fraction")
  fractions = active_fractions(h)
  # `< threshold` alone would count nothing at threshold 0; never-active units always count.
  rare = (fractions < threshold) | (fractions == 0)
  return jnp.mean(rare.astype(jnp.float32))


def dormant_scores(h: jax.Array) -> jax.Array:
  """ReDo dormancy score of every unit (Sokar et al., 2023).

  ``s_i = mean|h_i| / mean_j(mean|h_j|)``, where ``mean|h_i|`` is taken over every non-unit axis (batch and any
  spatial axes) and the denominator is the layer's average of those per-unit means. A unit is
  ``tau``-dormant when ``s_i <= tau``. If the whole layer is zero, every score is 0 (not NaN).

  Args:
    h: activations of shape ``(batch, ..., n_units)``; unit axis last.

  Returns:
    A ``float32`` array of shape ``(n_units,)``; the scores average to 1 unless the layer is all zero.

  Raises:
    ValueError: if ``h`` has fewer than 2 dimensions or an empty axis.

  Example:
    >>> import jax.numpy as jnp
    >>> h = jnp.array([[1., 0., 2.], [1., 0., 4.]])
    >>> dormant_scores(h)  # per-unit mean |h| = [1, 0, 3], layer mean 4/3
    Array([0.75, 0.  , 2.25], dtype=float32)
  """
  h = _check_activations(h, "dormant_scores")
  per_unit = jnp.mean(jnp.abs(h), axis=tuple(range(h.ndim - 1)))
  layer_mean = jnp.mean(per_unit)
  safe_mean = jnp.where(layer_mean > 0, layer_mean, 1.0)
  return jnp.where(layer_mean > 0, per_unit / safe_mean, jnp.zeros_like(per_unit))


def dormant_fraction(h: jax.Array, tau: float = 0.0) -> jax.Array:
  """Fraction of ``tau``-dormant units: units whose :func:`dormant_scores` is ``<= tau``.

  With ``tau = 0`` this counts units whose ``|h|`` is zero on the whole batch (for ReLU: the dead units). The
  paper's CIFAR-100 dormant-unit numbers use ReDo-style thresholds; ReDo itself uses e.g. ``tau = 0.025`` or
  ``0.1``.

  Args:
    h: activations of shape ``(batch, ..., n_units)``; unit axis last.
    tau: non-negative threshold on the score. May be a traced value (then it is not validated).

  Returns:
    A ``float32`` scalar in ``[0, 1]``. An all-zero layer is fully dormant (``1.0``).

  Raises:
    ValueError: if ``h`` has fewer than 2 dimensions or an empty axis, or ``tau`` is negative or NaN.

  Example:
    >>> import jax.numpy as jnp
    >>> h = jnp.array([[1., 0., 2.], [1., 0., 4.]])  # scores [0.75, 0, 2.25]
    >>> float(dormant_fraction(h, tau=0.5))
    0.3333333432674408
  """
  _check_tau(tau, "dormant_fraction")
  scores = dormant_scores(h)
  return jnp.mean((scores <= tau).astype(jnp.float32))


# ----------------------------------------------------------------------------------------------------------------
# Ranks of the feature matrix.
# ----------------------------------------------------------------------------------------------------------------


def singular_values(features: jax.Array) -> jax.Array:
  """Singular values of a feature matrix, in descending order, computed in ``float32``.

  Args:
    features: array of shape ``(batch, ..., d)``, reshaped to ``(-1, d)``.

  Returns:
    A ``float32`` array of shape ``(min(n, d),)`` with ``n`` the number of rows after reshaping.

  Raises:
    ValueError: if ``features`` has fewer than 2 dimensions or an empty axis.
  """
  x = _check_features(features, "singular_values")
  return jnp.linalg.svd(x, compute_uv=False)


def _effective_rank_from_sv(sv: jax.Array) -> jax.Array:
  total = jnp.sum(sv)
  nonzero = total > 0
  p = sv / jnp.where(nonzero, total, 1.0)
  positive = p > 0
  plogp = jnp.where(positive, p * jnp.log(jnp.where(positive, p, 1.0)), 0.0)
  entropy = -jnp.sum(plogp)
  return jnp.where(nonzero, jnp.exp(entropy), 0.0).astype(jnp.float32)


def _cumulative_rank(values: jax.Array, threshold: Any) -> jax.Array:
  """Smallest k such that the top-k of ``values`` (sorted descending, >= 0) hold >= threshold of their total."""
  values = jnp.sort(values)[::-1]  # SVD already sorts; re-sorting makes this independent of that guarantee.
  cumsum = jnp.cumsum(values)
  total = cumsum[-1]
  k = jnp.sum(cumsum < threshold * total) + 1
  k = jnp.minimum(k, values.shape[0])
  return jnp.where(total > 0, k, 0).astype(jnp.int32)


def effective_rank(features: jax.Array) -> jax.Array:
  """Effective rank (Roy & Vetterli, 2007) of a feature matrix.

  ``exp(H(p))`` where ``p_k = sigma_k / sum_j sigma_j`` are the normalised singular values and
  ``H(p) = -sum_k p_k log p_k`` (with ``0 log 0 = 0``). It lies in ``[1, min(n, d)]`` for a non-zero matrix and
  equals ``r`` when the matrix has ``r`` equal non-zero singular values.

  Args:
    features: array of shape ``(batch, ..., d)`` (e.g. a hidden layer's outputs on a probe set), reshaped to
      ``(-1, d)``. Any real dtype; the SVD is computed in ``float32``.

  Returns:
    A ``float32`` scalar. For the all-zero matrix it is ``0.0`` (documented choice: rank of the zero matrix).

  Raises:
    ValueError: if ``features`` has fewer than 2 dimensions or an empty axis.

  Example:
    >>> import jax.numpy as jnp
    >>> float(effective_rank(jnp.eye(4)))
    4.0
  """
  x = _check_features(features, "effective_rank")
  return _effective_rank_from_sv(jnp.linalg.svd(x, compute_uv=False))


def approximate_rank(features: jax.Array, threshold: float = 0.99) -> jax.Array:
  """Approximate rank: the number of singular directions holding ``threshold`` of the *squared* spectrum.

  The smallest ``k`` such that ``sum_{i<=k} sigma_i^2 >= threshold * sum_i sigma_i^2`` (singular values sorted in
  descending order); i.e. the dimension of the best rank-``k`` approximation that keeps ``threshold`` of the
  matrix's squared Frobenius norm. This is the paper's (and the reference code's) "approximate rank".

  Args:
    features: array of shape ``(batch, ..., d)``, reshaped to ``(-1, d)``; any real dtype, SVD in ``float32``.
    threshold: fraction in ``(0, 1]``; the paper uses ``0.99``. May be a traced value (then not validated).

  Returns:
    An ``int32`` scalar in ``[1, min(n, d)]``, or ``0`` for the all-zero matrix.

  Raises:
    ValueError: if ``features`` has fewer than 2 dimensions or an empty axis, or ``threshold`` is not in
      ``(0, 1]``.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.diag(jnp.array([3., 2., 1.]))  # squared spectrum 9, 4, 1 -> cumulative 9/14, 13/14, 1
    >>> int(approximate_rank(x, threshold=0.9))
    2
  """
  _check_threshold(threshold, "approximate_rank")
  x = _check_features(features, "approximate_rank")
  sv = jnp.linalg.svd(x, compute_uv=False)
  return _cumulative_rank(jnp.square(sv), threshold)


def stable_rank(features: jax.Array, threshold: float = 0.99) -> jax.Array:
  """Stable rank as defined in the paper: :func:`approximate_rank` on singular values instead of their squares.

  The smallest ``k`` such that ``sum_{i<=k} sigma_i >= threshold * sum_i sigma_i`` (descending order). This is the
  paper's definition (the reference code calls it ``abs_approximate_rank``; the paper calls it stable
  rank). **It is not** the textbook stable rank ``srank(A) = ||A||_F^2 / ||A||_2^2``, a real number that is a
  continuous lower bound of the rank; use ``jnp.sum(sv**2) / sv[0]**2`` with :func:`singular_values` for that.
  Because singular values are spread more evenly than their squares, ``stable_rank >= approximate_rank`` for the
  same threshold.

  Args:
    features: array of shape ``(batch, ..., d)``, reshaped to ``(-1, d)``; any real dtype, SVD in ``float32``.
    threshold: fraction in ``(0, 1]``; the paper uses ``0.99``. May be a traced value (then not validated).

  Returns:
    An ``int32`` scalar in ``[1, min(n, d)]``, or ``0`` for the all-zero matrix.

  Raises:
    ValueError: if ``features`` has fewer than 2 dimensions or an empty axis, or ``threshold`` is not in
      ``(0, 1]``.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.diag(jnp.array([3., 2., 1.]))  # spectrum 3, 2, 1 -> cumulative 1/2, 5/6, 1
    >>> int(stable_rank(x, threshold=0.9))
    3
  """
  _check_threshold(threshold, "stable_rank")
  x = _check_features(features, "stable_rank")
  sv = jnp.linalg.svd(x, compute_uv=False)
  return _cumulative_rank(sv, threshold)


# ----------------------------------------------------------------------------------------------------------------
# Magnitudes.
# ----------------------------------------------------------------------------------------------------------------

def weight_magnitude(params: Any) -> dict[str, jax.Array]:
  """Mean absolute weight of every kernel, per layer and overall.

  Only leaves whose last path key is ``"kernel"`` are included (biases, LayerNorm/BatchNorm scales and other
  leaves are skipped), matching Flax's naming of ``Dense``/``Conv`` weights. A trailing ``.value`` /
  ``.raw_value`` attribute (Flax NNX ``State`` leaves, boxed ``nn.Partitioned`` metadata) is ignored when
  reading and naming the path, so NNX states work too.

  Args:
    params: a pytree of arrays, typically Flax linen params (nested dicts). Path keys are joined by ``"/"``: for
      ``{"Dense_0": {"kernel": w}}`` the key is ``"Dense_0/kernel"`` (pass ``variables["params"]`` rather than
      ``variables`` to avoid a ``"params/"`` prefix). Sequence indices appear as their integer.

  Returns:
    A dict mapping each kernel's path to its ``float32`` mean ``|w|``, plus ``"overall"``: the mean ``|w|`` over
    all kernel entries together (i.e. weighted by kernel size, not the mean of the per-layer means).

  Raises:
    ValueError: if ``params`` has no leaf named ``"kernel"``, or a kernel name collides with ``"overall"``.

  Example:
    >>> import jax.numpy as jnp
    >>> params = {"Dense_0": {"kernel": jnp.array([[1., -2.], [3., -4.]]), "bias": jnp.ones(2)},
    ...           "Dense_1": {"kernel": jnp.array([[-1.], [1.]])}}
    >>> {k: float(v) for k, v in weight_magnitude(params).items()}
    {'Dense_0/kernel': 2.5, 'Dense_1/kernel': 1.0, 'overall': 2.0}
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  out: dict[str, jax.Array] = {}
  total_abs = jnp.zeros((), jnp.float32)
  total_count = 0
  for path, leaf in leaves:
    name = tree_paths.path_to_str(path)
    if name.rsplit("/", 1)[-1] != "kernel":
      continue
    w = jnp.asarray(leaf)
    if w.size == 0:
      continue
    if name == "overall":
      raise ValueError("weight_magnitude: a kernel path is named 'overall', which collides with the total key.")
    s = jnp.sum(jnp.abs(w.astype(jnp.float32)))
    out[name] = s / w.size
    total_abs = total_abs + s
    total_count += w.size
  if total_count == 0:
    raise ValueError(
        "weight_magnitude: `params` has no non-empty leaf whose last path key is 'kernel'; got paths "
        f"{[tree_paths.path_to_str(p) for p, _ in leaves][:10]}."
    )
  out["overall"] = total_abs / total_count
  return out


def feature_norm(h: jax.Array) -> jax.Array:
  """Mean L2 norm of the per-sample feature vectors.

  Every non-batch axis is flattened into the feature vector (unlike the unit-wise metrics, spatial axes are
  *not* treated as extra samples here): ``mean_b ||h[b].ravel()||_2``.

  Args:
    h: activations of shape ``(batch, ...)`` with at least 2 dimensions.

  Returns:
    A ``float32`` scalar.

  Raises:
    ValueError: if ``h`` has fewer than 2 dimensions or an empty axis.

  Example:
    >>> import jax.numpy as jnp
    >>> float(feature_norm(jnp.array([[3., 4.], [0., 0.]])))
    2.5
  """
  h = _check_activations(h, "feature_norm")
  flat = h.reshape(h.shape[0], -1)
  return jnp.mean(jnp.sqrt(jnp.sum(jnp.square(flat), axis=1)))


def gradient_norm(grads: Any) -> jax.Array:
  """Global L2 norm of a pytree: ``sqrt(sum over leaves of sum(x**2))``.

  The same quantity as :func:`optax.global_norm` (now :func:`optax.tree.norm`), but every leaf is cast to
  ``float32`` before squaring so that ``bfloat16`` gradients do not overflow or lose precision in the
  accumulation.

  Args:
    grads: any pytree of real arrays (e.g. the gradients returned by :func:`jax.grad`).

  Returns:
    A ``float32`` scalar; ``0.0`` for a pytree with no leaves.

  Example:
    >>> import jax.numpy as jnp
    >>> float(gradient_norm({"a": jnp.array([3.]), "b": {"c": jnp.array([[4.]])}}))
    5.0
  """
  leaves = jax.tree_util.tree_leaves(grads)
  sq = [jnp.sum(jnp.square(jnp.asarray(x).astype(jnp.float32))) for x in leaves]
  return jnp.sqrt(sum(sq, jnp.zeros((), jnp.float32)))


# ----------------------------------------------------------------------------------------------------------------
# Convenience.
# ----------------------------------------------------------------------------------------------------------------


def layer_metrics(
    activations: Mapping[str, jax.Array], tau: float = 0.0, threshold: float = 0.99,
    activity_threshold: float = 0.01,
) -> dict[str, dict[str, jax.Array]]:
  """All unit and rank metrics for a dict of layer activations.

  For each layer, the feature matrix used for the ranks is ``h.reshape(-1, n_units)`` (spatial positions as rows).

  Args:
    activations: mapping from a layer name to its activations ``(batch, ..., n_units)`` on a probe batch.
    tau: dormancy threshold passed to :func:`dormant_fraction`.
    threshold: spectrum fraction passed to :func:`approximate_rank` and :func:`stable_rank`.
    activity_threshold: fraction passed to :func:`rarely_active_fraction`.

  Returns:
    A dict mapping each layer to ``{"dead_fraction", "rarely_active_fraction", "dormant_fraction",
    "effective_rank", "stable_rank", "approximate_rank", "feature_norm"}``; the ranks ``stable_rank`` / ``approximate_rank`` are ``int32``, the
    rest ``float32``.
    Each layer's SVD is computed once and shared by the three rank measures.

  Raises:
    ValueError: if ``activations`` is not a mapping, or any argument is invalid (see the individual functions).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> acts = {"fc1": jnp.eye(3), "fc2": jnp.zeros((3, 2))}
    >>> m = jax.jit(layer_metrics)(acts)
    >>> float(m["fc2"]["dead_fraction"]), int(m["fc1"]["approximate_rank"])
    (1.0, 3)
  """
  if not isinstance(activations, Mapping):
    raise ValueError(
        f"layer_metrics: `activations` must be a mapping from layer name to array, got "
        f"{type(activations).__name__}."
    )
  _check_tau(tau, "layer_metrics")
  _check_threshold(threshold, "layer_metrics")
  _check_fraction(activity_threshold, "activity_threshold", "layer_metrics")
  out: dict[str, dict[str, jax.Array]] = {}
  for name, h in activations.items():
    h = _check_activations(h, f"layer_metrics[{name!r}]")
    sv = jnp.linalg.svd(h.reshape(-1, h.shape[-1]), compute_uv=False)
    out[name] = {
        "dead_fraction": dead_unit_fraction(h),
        "rarely_active_fraction": rarely_active_fraction(h, activity_threshold),
        "dormant_fraction": dormant_fraction(h, tau),
        "effective_rank": _effective_rank_from_sv(sv),
        "stable_rank": _cumulative_rank(sv, threshold),
        "approximate_rank": _cumulative_rank(jnp.square(sv), threshold),
        "feature_norm": feature_norm(h),
    }
  return out
