"""`cbp_jax/initializers.py`: the gains, the scales of each initial distribution by hand, the draws' statistics,
and that ``lecun_normal`` is flax's own."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from cbp_jax import initializers


def test_gains_are_pytorchs_and_gelus_follows_kaimings_rule():
  assert initializers.gain("relu") == math.sqrt(2.0)
  assert initializers.gain("tanh") == 5.0 / 3.0
  assert initializers.gain("linear") == initializers.gain("sigmoid") == 1.0
  assert initializers.gain("selu") == 0.75
  # 1 / sqrt(E[gelu(z)^2]) for z ~ N(0, 1), by quadrature; the same rule gives ReLU's sqrt(2).
  z = np.linspace(-12.0, 12.0, 400_001)
  density = np.exp(-(z**2) / 2) / math.sqrt(2 * math.pi)
  gelu = 0.5 * z * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
  for act, f in (("gelu", gelu), ("relu", np.maximum(z, 0.0))):
    second_moment = np.trapezoid(f**2 * density, z)
    assert initializers.gain(act) == pytest.approx(1 / math.sqrt(second_moment), rel=1e-6)


@pytest.mark.parametrize(
  "init, activation, expected",
  [
    ("kaiming", "relu", math.sqrt(2.0) * 0.5),  # gain * sqrt(3 / 12)
    ("default", "tanh", 1 / math.sqrt(12)),  # no gain
    ("xavier", "tanh", 5 / 3 * math.sqrt(6 / (12 + 4))),  # gain * sqrt(6 / (fan_in + fan_out))
    ("lecun", "relu", 0.5),  # sqrt(3 / 12), no gain
    ("kaiming_normal", "relu", math.sqrt(2.0) / math.sqrt(12)),
    ("lecun_normal", "relu", 1 / math.sqrt(12) / 0.87962566103423978),
  ],
)
def test_scale_by_hand(init, activation, expected):
  assert initializers.scale(init, 12, 4, activation) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
  "init, variance", [("kaiming", 1 / 3), ("kaiming_normal", 1.0), ("lecun_normal", 0.87962566103423978**2)]
)
def test_standard_draws_have_unit_scale_statistics(init, variance):
  x = np.asarray(initializers.standard_draw(init, jax.random.key(0), (200_000,)))
  assert abs(x.mean()) < 0.01
  assert x.var() == pytest.approx(variance, rel=0.02)
  if init == "kaiming":
    assert x.min() >= -1.0 and x.max() <= 1.0
  if init == "lecun_normal":
    assert x.min() >= -2.0 and x.max() <= 2.0


def test_lecun_normal_initializer_is_flaxs_default_kernel_init():
  key, shape = jax.random.key(3), (7, 5)
  np.testing.assert_allclose(
    initializers.initializer("lecun_normal")(key, shape),
    nn.initializers.lecun_normal()(key, shape),
    rtol=1e-6,
  )


def test_kaiming_initializer_uses_the_fans_of_a_conv_kernel():
  w = initializers.initializer("kaiming", "relu")(jax.random.key(0), (3, 3, 8, 16), jnp.bfloat16)
  bound = math.sqrt(2.0) * math.sqrt(3.0 / (3 * 3 * 8))
  assert w.dtype == jnp.bfloat16
  assert float(jnp.max(jnp.abs(w.astype(jnp.float32)))) <= bound * (1 + 2**-8)
  assert float(jnp.max(jnp.abs(w.astype(jnp.float32)))) > 0.9 * bound


def test_unknown_names_and_bad_callables_are_refused():
  with pytest.raises(ValueError, match="unknown init 'he'"):
    initializers.scale("he", 4, 4)
  with pytest.raises(ValueError, match="unknown activation 'swishy'"):
    initializers.initializer("kaiming", "swishy")
  with pytest.raises(ValueError, match="fan_in and fan_out must be positive, got 0, 4"):
    initializers.scale("kaiming", 0, 4)
  assert initializers.is_initializer("xavier") and initializers.is_initializer(nn.initializers.zeros)
  assert not initializers.is_initializer("he")
  with pytest.raises(ValueError, match="must return an array of the requested shape"):
    initializers.check_initializer(lambda key, shape, dtype: jnp.zeros(3))
