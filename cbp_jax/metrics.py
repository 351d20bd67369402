"""Plasticity correlates and probes: dead/dormant/saturated/linearised units, ranks, magnitudes, drift, churn,
trainability and curvature.

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

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import optax

from cbp_jax import tree_paths, validation

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
  "saturated_fraction",
  "linearised_fraction",
  "parameter_drift",
  "output_churn",
  "prediction_churn",
  "trainability_probe",
  "top_hessian_eigenvalue",
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
# Saturated and linearised units: what "dead" misses for tanh/sigmoid nets and for ReLU nets gone linear.
# ----------------------------------------------------------------------------------------------------------------

# The output range (low, high) of each saturating activation: a unit near either end passes almost no gradient.
SATURATING_RANGES = {"tanh": (-1.0, 1.0), "sigmoid": (0.0, 1.0)}
# Piecewise-linear activations: a unit active on every sample computes a linear function of its input.
PIECEWISE_LINEAR = ("relu", "leaky_relu")


def _check_activation_name(activation: Any, fn: str, allowed: tuple[str, ...]) -> None:
  if activation not in allowed:
    raise ValueError(f"{fn}: `activation` must be one of {allowed}, got {activation!r}.")


def _check_margin(margin: Any, fn: str) -> None:
  v = validation.scalar("margin", margin)
  if v is not None and not (
    0.0 <= v < 0.5
  ):  # also rejects NaN; 0.5 would call every sigmoid output saturated
    raise ValueError(f"{fn}: `margin` must be in [0, 0.5), got {margin!r}.")


def saturated_fraction(
  h: jax.Array,
  activation: str = "tanh",
  margin: float | jax.Array = 0.05,
  threshold: float | jax.Array = 0.99,
) -> jax.Array:
  """Fraction of saturated units: within ``margin`` of an end of the activation's range on almost every sample.

  For tanh/sigmoid-family nets the dead-unit fraction says nothing (a tanh unit is never exactly 0); the units
  that stop learning are those stuck at an end of their range, where the derivative vanishes. A sample is
  saturated for a unit when its output is within ``margin`` of either end (``|h| >= 1 - margin`` for tanh,
  ``h <= margin`` or ``h >= 1 - margin`` for sigmoid), and a unit is saturated when at least a fraction
  ``threshold`` of the samples are.

  Args:
    h: post-activation outputs of shape ``(batch, ..., n_units)``; unit axis last, middle axes (conv ``H, W``)
      are more samples.
    activation: ``"tanh"`` or ``"sigmoid"`` (`SATURATING_RANGES`).
    margin: distance from the range's end, in ``[0, 0.5)``; ``0.05`` is a tanh derivative below ``0.1``.
    threshold: fraction of samples in ``(0, 1]``; ``0.99`` means "almost every sample". Either may be traced
      (then not validated).

  Returns:
    A ``float32`` scalar in ``[0, 1]``.

  Raises:
    ValueError: for a bad ``h`` (see :func:`dead_unit_fraction`), an unknown ``activation``, or ``margin`` /
      ``threshold`` out of range.

  Example:
    >>> import jax.numpy as jnp
    >>> h = jnp.array([[0.99, -0.2], [-0.98, 0.97]])  # unit 0 is at an end on both samples, unit 1 on one
    >>> float(saturated_fraction(h, "tanh", margin=0.05))
    0.5
  """
  fn = "saturated_fraction"
  _check_activation_name(activation, fn, tuple(SATURATING_RANGES))
  _check_margin(margin, fn)
  _check_threshold(threshold, fn)
  h = _check_activations(h, fn)
  low, high = SATURATING_RANGES[activation]
  at_end = (h <= low + margin) | (h >= high - margin)
  fractions = jnp.mean(at_end.astype(jnp.float32), axis=tuple(range(h.ndim - 1)))
  return jnp.mean((fractions >= threshold).astype(jnp.float32))


def linearised_fraction(h: jax.Array, threshold: float | jax.Array = 0.99) -> jax.Array:
  """Fraction of ReLU-family units active (output ``> 0``) on at least a fraction ``threshold`` of the samples.

  Such a unit never uses its kink on the data: it computes a linear function of its input, so a layer of them
  adds no expressive power (the opposite failure of a dead unit). ``threshold = 1`` counts units active on
  every sample.

  Args:
    h: activations of shape ``(batch, ..., n_units)``; unit axis last, middle axes (conv ``H, W``) are more
      samples.
    threshold: fraction in ``(0, 1]``. May be traced (then not validated).

  Returns:
    A ``float32`` scalar in ``[0, 1]``.

  Raises:
    ValueError: for a bad ``h`` (see :func:`dead_unit_fraction`) or ``threshold`` not in ``(0, 1]``.

  Example:
    >>> import jax.numpy as jnp
    >>> h = jnp.array([[1., 0., 2.], [3., 0., 0.]])  # active on 2/2, 0/2, 1/2 samples
    >>> float(linearised_fraction(h, threshold=1.0))
    0.3333333432674408
  """
  _check_threshold(threshold, "linearised_fraction")
  fractions = active_fractions(h)
  return jnp.mean((fractions >= threshold).astype(jnp.float32))


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


def _kernels(params: Any, fn: str) -> list[tuple[str, Any]]:
  """``[(path, leaf)]`` of the non-empty leaves whose last path key is ``"kernel"``, in tree order.

  Raises:
    ValueError: if there is none, or a kernel's path is ``"overall"`` (the key of the totals).
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  found = []
  for path, leaf in leaves:
    name = tree_paths.path_to_str(path)
    if name.rsplit("/", 1)[-1] != "kernel" or jnp.size(leaf) == 0:
      continue
    if name == "overall":
      raise ValueError(f"{fn}: a kernel path is named 'overall', which collides with the total key.")
    found.append((name, leaf))
  if not found:
    raise ValueError(
      f"{fn}: `params` has no non-empty leaf whose last path key is 'kernel'; got paths "
      f"{[tree_paths.path_to_str(p) for p, _ in leaves][:10]}."
    )
  return found


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
  out: dict[str, jax.Array] = {}
  total_abs = jnp.zeros((), jnp.float32)
  total_count = 0
  for name, leaf in _kernels(params, "weight_magnitude"):
    w = jnp.asarray(leaf)
    s = jnp.sum(jnp.abs(w.astype(jnp.float32)))
    out[name] = s / w.size
    total_abs = total_abs + s
    total_count += w.size
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


def parameter_drift(params: Any, init_params: Any) -> dict[str, jax.Array]:
  """L2 distance of every kernel from its value at initialisation, per layer and overall.

  How far training has moved the weights: a network whose weights drift far from their (well-conditioned)
  initial values tends to lose plasticity. Kernels are found as in :func:`weight_magnitude`; divide by the
  initial kernel's norm for a relative drift.

  Args:
    params: the current parameters (a pytree, e.g. Flax params).
    init_params: the parameters at initialisation, with the same kernels and shapes.

  Returns:
    ``{kernel_path: ||w - w0||_2}`` (``float32``) plus ``"overall"``: the distance over all kernels together,
    ``sqrt(sum of the squared per-layer distances)``.

  Raises:
    ValueError: if ``params`` has no kernel, or ``init_params`` lacks one of its kernels or has another shape.

  Example:
    >>> import jax.numpy as jnp
    >>> w0 = {"Dense_0": {"kernel": jnp.zeros((2, 2))}, "Dense_1": {"kernel": jnp.zeros((2, 1))}}
    >>> w = {"Dense_0": {"kernel": jnp.array([[3., 0.], [0., 4.]])}, "Dense_1": {"kernel": jnp.ones((2, 1))}}
    >>> {k: round(float(v), 4) for k, v in parameter_drift(w, w0).items()}
    {'Dense_0/kernel': 5.0, 'Dense_1/kernel': 1.4142, 'overall': 5.1962}
  """
  initial = dict(_kernels(init_params, "parameter_drift"))
  out: dict[str, jax.Array] = {}
  total = jnp.zeros((), jnp.float32)
  for name, leaf in _kernels(params, "parameter_drift"):
    w0 = initial.get(name)
    if w0 is None or jnp.shape(w0) != jnp.shape(leaf):
      raise ValueError(
        f"parameter_drift: kernel {name!r} has shape {jnp.shape(leaf)} in `params` but "
        f"{'is missing' if w0 is None else f'shape {jnp.shape(w0)}'} in `init_params`."
      )
    sq = jnp.sum(jnp.square(jnp.asarray(leaf, jnp.float32) - jnp.asarray(w0, jnp.float32)))
    out[name] = jnp.sqrt(sq)
    total = total + sq
  out["overall"] = jnp.sqrt(total)
  return out


# ----------------------------------------------------------------------------------------------------------------
# Function-space probes: output churn, trainability, curvature.
# ----------------------------------------------------------------------------------------------------------------


def _check_same_shape(before: Any, after: Any, fn: str) -> tuple[jax.Array, jax.Array]:
  before = _check_activations(before, fn, name="before")
  after = _check_activations(after, fn, name="after")
  if before.shape != after.shape:
    raise ValueError(f"{fn}: `before` has shape {tuple(before.shape)} but `after` has {tuple(after.shape)}.")
  return before, after


def output_churn(before: jax.Array, after: jax.Array) -> jax.Array:
  """Mean L2 change of the network's outputs on a fixed held-out batch between two probe points.

  Args:
    before: outputs ``(batch, ..., n_outputs)`` (e.g. logits) at the earlier probe point.
    after: outputs of the same inputs at the later probe point, same shape.

  Returns:
    A ``float32`` scalar: ``mean over samples of ||after - before||_2`` (the norm over the last axis).

  Raises:
    ValueError: if either is not ``(batch, ..., n)`` or the shapes differ.

  Example:
    >>> import jax.numpy as jnp
    >>> float(output_churn(jnp.zeros((2, 2)), jnp.array([[3., 4.], [0., 0.]])))
    2.5
  """
  before, after = _check_same_shape(before, after, "output_churn")
  return jnp.mean(jnp.sqrt(jnp.sum(jnp.square(after - before), axis=-1)))


def prediction_churn(before: jax.Array, after: jax.Array) -> jax.Array:
  """Fraction of held-out samples whose predicted class (argmax of the last axis) changed.

  Args:
    before: logits or probabilities ``(batch, ..., n_classes)`` at the earlier probe point.
    after: the same inputs' at the later probe point, same shape.

  Returns:
    A ``float32`` scalar in ``[0, 1]``.

  Raises:
    ValueError: if either is not ``(batch, ..., n)`` or the shapes differ.

  Example:
    >>> import jax.numpy as jnp
    >>> float(prediction_churn(jnp.array([[1., 0.], [0., 1.]]), jnp.array([[0., 1.], [0., 2.]])))
    0.5
  """
  before, after = _check_same_shape(before, after, "prediction_churn")
  changed = jnp.argmax(before, axis=-1) != jnp.argmax(after, axis=-1)
  return jnp.mean(changed.astype(jnp.float32))


def _check_steps(steps: Any, name: str, fn: str) -> None:
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise ValueError(f"{fn}: `{name}` must be a Python int >= 1 (a static loop length), got {steps!r}.")


def trainability_probe(
  loss_fn: Callable[[Any, Any, Any], jax.Array],
  params: Any,
  inputs: Any,
  targets: Any,
  optimizer: optax.GradientTransformation,
  steps: int,
) -> dict[str, jax.Array]:
  """How much of a fresh task's loss a copy of the network can remove in ``steps`` steps: plasticity, directly.

  Trains a copy of ``params`` (the caller's are untouched: JAX arrays are immutable) with ``optimizer``, from a
  fresh optimizer state, for ``steps`` full-batch steps on ``(inputs, targets)`` inside the compiled program
  (a ``lax.scan``), and reports the loss before and after. With random labels or random regression targets on
  probe inputs the task is new to every network, so a network that has lost plasticity removes less of the
  loss than a fresh initialisation does; run the probe on one as the reference.

  Args:
    loss_fn: ``loss_fn(params, inputs, targets) -> scalar``, differentiable in ``params``.
    params: the parameters to start from.
    inputs: the probe inputs (any pytree the loss takes).
    targets: the fresh task's targets, e.g. ``jax.random.randint(key, (n,), 0, num_classes)``.
    optimizer: an Optax transformation (e.g. ``optax.sgd(0.1)``); its state starts fresh.
    steps: number of steps, a Python int >= 1.

  Returns:
    ``{"loss_before", "loss_after", "loss_reduction"}`` (``float32``), where ``loss_reduction =
    (loss_before - loss_after) / loss_before`` (``0`` when ``loss_before`` is ``0``): the fraction of the
    fresh task's loss removed; higher is more plastic.

  Raises:
    ValueError: if ``steps`` is not an int >= 1 or ``optimizer`` is not an Optax transformation.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> loss = lambda w, x, y: jnp.mean((x @ w - y) ** 2)
    >>> out = trainability_probe(loss, jnp.zeros(2), jnp.eye(2), jnp.ones(2), optax.sgd(0.5), steps=1)
    >>> float(out["loss_before"]), float(out["loss_after"]), float(out["loss_reduction"])
    (1.0, 0.25, 0.75)
  """
  fn = "trainability_probe"
  _check_steps(steps, "steps", fn)
  if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
    raise ValueError(
      f"{fn}: `optimizer` must be an optax.GradientTransformation, got {type(optimizer).__name__}."
    )
  value_and_grad = jax.value_and_grad(lambda p: loss_fn(p, inputs, targets))

  def step(carry, _):
    p, opt_state = carry
    _, grads = value_and_grad(p)
    updates, opt_state = optimizer.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), None

  before = jnp.asarray(loss_fn(params, inputs, targets), jnp.float32)
  (trained, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
  after = jnp.asarray(loss_fn(trained, inputs, targets), jnp.float32)
  reduction = jnp.where(before > 0, (before - after) / jnp.where(before > 0, before, 1.0), 0.0)
  return {"loss_before": before, "loss_after": after, "loss_reduction": reduction}


def top_hessian_eigenvalue(
  loss_fn: Callable[[Any], jax.Array], params: Any, key: jax.Array, num_iterations: int = 20
) -> jax.Array:
  """The largest eigenvalue of the loss's Hessian in ``params``, by Lanczos on Hessian-vector products.

  The Hessian is never formed: each iteration is one Hessian-vector product (forward-over-reverse
  differentiation), so the cost is about ``num_iterations`` times three gradient evaluations and the memory a
  few parameter-sized vectors. Lanczos (three-term recurrence, from a random unit vector drawn with ``key``)
  builds a ``k x k`` tridiagonal matrix whose largest eigenvalue approaches the Hessian's largest (most
  positive) one from below, and much faster than power iteration, which finds the eigenvalue of largest
  *magnitude* instead. ``k = min(num_iterations, number of parameters)``; with ``k`` equal to the number of
  parameters it is exact up to rounding. Sharp curvature (a large top eigenvalue) is a known correlate of
  lost plasticity.

  Args:
    loss_fn: ``loss_fn(params) -> scalar`` (close over the batch), twice differentiable.
    params: where to take the Hessian (any pytree of float arrays).
    key: a PRNG key for the starting vector.
    num_iterations: Lanczos iterations, a Python int >= 1; 20 is usually within a percent.

  Returns:
    A ``float32`` scalar.

  Raises:
    ValueError: if ``num_iterations`` is not an int >= 1 or ``params`` has no entries.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> loss = lambda w: 0.5 * (3.0 * w[0] ** 2 + w[1] ** 2)  # Hessian diag(3, 1)
    >>> round(float(top_hessian_eigenvalue(loss, jnp.ones(2), jax.random.key(0))), 4)
    3.0
  """
  fn = "top_hessian_eigenvalue"
  _check_steps(num_iterations, "num_iterations", fn)
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  if flat.size == 0:
    raise ValueError(f"{fn}: `params` has no entries.")
  flat = flat.astype(jnp.float32)
  grad = jax.grad(lambda v: loss_fn(unravel(v.astype(flat.dtype))))

  def hvp(v):
    return jax.jvp(grad, (flat,), (v,))[1].astype(jnp.float32)

  k = min(num_iterations, flat.size)
  v0 = jax.random.normal(key, flat.shape, jnp.float32)
  v0 = v0 / jnp.linalg.norm(v0)
  tiny = jnp.finfo(jnp.float32).tiny

  def body(carry, _):
    v, v_prev, beta_prev, alive = carry
    w = hvp(v)
    alpha = jnp.vdot(w, v)
    w = w - alpha * v - beta_prev * v_prev
    w = w - jnp.vdot(w, v) * v  # One local re-orthogonalisation keeps float32 rounding in check.
    beta = jnp.linalg.norm(w)
    # After an exact breakdown (beta = 0: the Krylov space is invariant) later steps are padding.
    alive_next = alive & (beta > tiny)
    v_next = jnp.where(alive_next, w / jnp.where(alive_next, beta, 1.0), 0.0)
    return (v_next, v, beta, alive_next), (alpha, beta, alive)

  init = (v0, jnp.zeros_like(v0), jnp.zeros((), jnp.float32), jnp.asarray(True))
  _, (alphas, betas, alive) = jax.lax.scan(body, init, None, length=k)
  # Padding rows get the first Rayleigh quotient (never above the top Ritz value) and no coupling, so they
  # cannot raise the maximum.
  alphas = jnp.where(alive, alphas, alphas[0])
  off = jnp.where(alive[1:], betas[:-1], 0.0)
  tridiagonal = jnp.diag(alphas) + jnp.diag(off, 1) + jnp.diag(off, -1)
  return jnp.max(jnp.linalg.eigvalsh(tridiagonal))


# ----------------------------------------------------------------------------------------------------------------
# Convenience.
# ----------------------------------------------------------------------------------------------------------------


def _layer_activation(activation: Any, name: str) -> str | None:
  """The activation of layer ``name`` from `layer_metrics`'s ``activation`` argument."""
  if activation is None or isinstance(activation, str):
    act = activation
  elif isinstance(activation, Mapping):
    if name not in activation:
      raise ValueError(
        f"layer_metrics: `activation` has no entry for layer {name!r} (has {sorted(activation)})."
      )
    act = activation[name]
  else:
    raise ValueError(
      f"layer_metrics: `activation` must be None, a name or a mapping from layer to name, got "
      f"{type(activation).__name__}."
    )
  if act is not None and not isinstance(act, str):
    raise ValueError(f"layer_metrics: the activation of layer {name!r} must be a name, got {act!r}.")
  return act


def layer_metrics(
  activations: Mapping[str, jax.Array],
  tau: float = 0.0,
  threshold: float = 0.99,
  activity_threshold: float = 0.01,
  activation: str | Mapping[str, str] | None = None,
  margin: float = 0.05,
  saturation_threshold: float = 0.99,
) -> dict[str, dict[str, jax.Array]]:
  """The unit and rank metrics that fit each layer's activation, for a dict of layer activations.

  For each layer, the feature matrix used for the ranks is ``h.reshape(-1, n_units)`` (spatial positions as rows).
  Every layer gets ``dormant_fraction``, the three ranks and ``feature_norm``. Which unit counts come with them
  depends on the layer's activation:

  * ``None`` (not given): ``dead_fraction`` and ``rarely_active_fraction``, as for ReLU;
  * ReLU family (`PIECEWISE_LINEAR`): those two and ``linearised_fraction`` (:func:`linearised_fraction` with
    ``saturation_threshold`` as the fraction of samples);
  * tanh / sigmoid (`SATURATING_RANGES`): ``saturated_fraction`` only (:func:`saturated_fraction` with
    ``margin`` and ``saturation_threshold``): such units are never exactly 0, so a dead-unit count would
    always read 0 and hide the saturation that stops them learning;
  * any other name (swish, elu, ...): no unit count beyond ``dormant_fraction``.

  Args:
    activations: mapping from a layer name to its activations ``(batch, ..., n_units)`` on a probe batch.
    tau: dormancy threshold passed to :func:`dormant_fraction`.
    threshold: spectrum fraction passed to :func:`approximate_rank` and :func:`stable_rank`.
    activity_threshold: fraction passed to :func:`rarely_active_fraction`.
    activation: the layers' activation: one name for all (e.g. ``"tanh"``, the names of
      ``cbp_jax.models.ACTIVATION_FNS``), a mapping from layer name to name, or None.
    margin: passed to :func:`saturated_fraction`.
    saturation_threshold: the "almost every sample" fraction of :func:`saturated_fraction` and
      :func:`linearised_fraction`.

  Returns:
    A dict mapping each layer to a dict of the names above; the ranks ``stable_rank`` / ``approximate_rank``
    are ``int32``, the rest ``float32``. Each layer's SVD is computed once and shared by the three rank measures.

  Raises:
    ValueError: if ``activations`` is not a mapping, ``activation`` names no activation for a layer, or any
      argument is invalid (see the individual functions).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> acts = {"fc1": jnp.eye(3), "fc2": jnp.zeros((3, 2))}
    >>> m = jax.jit(layer_metrics)(acts)
    >>> float(m["fc2"]["dead_fraction"]), int(m["fc1"]["approximate_rank"])
    (1.0, 3)
    >>> sorted(layer_metrics({"fc": jnp.tanh(jnp.eye(3))}, activation="tanh")["fc"])[-2:]
    ['saturated_fraction', 'stable_rank']
  """
  if not isinstance(activations, Mapping):
    raise ValueError(
      f"layer_metrics: `activations` must be a mapping from layer name to array, got "
      f"{type(activations).__name__}."
    )
  _check_tau(tau, "layer_metrics")
  _check_threshold(threshold, "layer_metrics")
  _check_fraction(activity_threshold, "activity_threshold", "layer_metrics")
  _check_margin(margin, "layer_metrics")
  _check_threshold(saturation_threshold, "layer_metrics")
  out: dict[str, dict[str, jax.Array]] = {}
  for name, h in activations.items():
    act = _layer_activation(activation, name)
    h = _check_activations(h, f"layer_metrics[{name!r}]")
    sv = jnp.linalg.svd(h.reshape(-1, h.shape[-1]), compute_uv=False)
    units: dict[str, jax.Array] = {}
    if act is None or act in PIECEWISE_LINEAR:
      units["dead_fraction"] = dead_unit_fraction(h)
      units["rarely_active_fraction"] = rarely_active_fraction(h, activity_threshold)
    if act in PIECEWISE_LINEAR:
      units["linearised_fraction"] = linearised_fraction(h, saturation_threshold)
    if act in SATURATING_RANGES:
      units["saturated_fraction"] = saturated_fraction(h, act, margin, saturation_threshold)
    out[name] = {
      **units,
      "dormant_fraction": dormant_fraction(h, tau),
      "effective_rank": _effective_rank_from_sv(sv),
      "stable_rank": _cumulative_rank(sv, threshold),
      "approximate_rank": _cumulative_rank(jnp.square(sv), threshold),
      "feature_norm": feature_norm(h),
    }
  return out
