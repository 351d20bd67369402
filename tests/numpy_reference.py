"""A slow, plain NumPy re-computation of CBP's per-unit statistics (SPEC 1-4).

Written from SPEC.md independently of cbp_jax, in float64, one layer at a
time, so tests can compare the library against it.
"""

import numpy as np


class NumpyUnitStats:
  """Running statistics of one hidden layer, updated like the reference GnT."""

  def __init__(self, width, decay):
    self.decay = decay
    self.utility = np.zeros(width)
    self.mean = np.zeros(width)
    self.age = np.zeros(width, dtype=np.int64)

  def step(self, h, w_in, w_outs, kind):
    """One batch. h: (..., n); w_in: (..., n); w_outs: list of (n, rest) arrays."""
    d = self.decay
    h = np.asarray(h, np.float64).reshape(-1, h.shape[-1])
    self.age += 1
    correction = 1 - d**self.age
    self.mean = d * self.mean + (1 - d) * h.mean(axis=0)
    f_hat = self.mean / correction
    out_mag = np.mean([np.abs(w).mean(axis=1) for w in w_outs], axis=0)
    in_mag = np.abs(np.asarray(w_in, np.float64)).reshape(-1, h.shape[-1]).mean(axis=0)
    deviation = np.abs(h - f_hat).mean(axis=0)
    new = {
      "contribution": out_mag * np.abs(h).mean(axis=0),
      "adaptable_contribution": out_mag * deviation / in_mag,
      "zero_contribution": out_mag * deviation,
      "adaptation": 1 / in_mag,
      "weight": out_mag,
      "feature_by_input": deviation / in_mag,
    }[kind]
    self.utility = d * self.utility + (1 - d) * new
    return self.utility / correction, f_hat


def consumer_rows(kernel, width, layout="channels_last"):
  """A consumer kernel (..., n*P, out) as (n, everything else) per unit."""
  k = np.asarray(kernel, np.float64)
  *spatial, inputs, out = k.shape
  positions = inputs // width
  k = k.reshape(-1, inputs, out)
  rows = []
  for i in range(width):
    if layout == "channels_last":
      idx = [p * width + i for p in range(positions)]
    else:
      idx = [i * positions + p for p in range(positions)]
    rows.append(k[:, idx, :].reshape(-1))
  return np.stack(rows)
