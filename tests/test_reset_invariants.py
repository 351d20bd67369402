"""Properties of a single reset step (cbp in every count mode, ReDo) on random small nets.

Hypothesis draws the networks of `tests/test_properties.py` (Dense chains,
conv -> conv -> flatten -> dense in either flatten layout, fan-out with a
skip consumer, with or without a per-unit affine norm) and random
parameters, gradients and hyperparameters; one update step is taken from a
fresh state with every unit mature (``maturity_threshold=0``).

1. Finite in, finite out: finite parameters, gradients and activations give
   finite parameters after the step, whatever is replaced (weights up to
   1e3 in magnitude, Adam or SGD wrapped).
2. The bias correction preserves the function, and this is exactly when:
   a replaced unit ``i`` leaves its consumers' pre-activations unchanged for
   an input iff its activation on that input equals the ``f_hat_i`` its
   consumers' biases absorbed. At the first step ``f_hat_i`` is the batch
   mean of the activations the update was given (``f = (1 - d) mean``,
   debiased by ``1 - d``), so the output (hence the loss) on the batch whose
   statistics were used is unchanged when (a) the step itself moves no
   weight (zero gradients: the activations are those of the weights the
   reset acts on) and (b) every unit's activation is constant over the
   batch (and conv positions): a batch of one example, spatially constant
   for conv nets. With a batch of several distinct examples only the
   batch-mean contribution is kept, and the loss generally moves (checked
   below for the simplest case, so the invariant is stated no wider than it
   holds). ReDo's optional correction absorbs this batch's mean exactly too.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import cbp_jax
from tests.test_properties import SETTINGS, Net, nets

# (accumulate, count_basis) of cbp, or ReDo: the methods with a bias correction.
METHODS = (
  "cbp/accumulate/eligible",
  "cbp/accumulate/layer",
  "cbp/lottery/eligible",
  "cbp/lottery/layer",
  "redo",
)
# Every method that resets units, for the finiteness property.
RESETTING = METHODS + ("regrama", "snr")


def make_tx(method, graph, key, rate, decay, tau, inner):
  if method == "redo":
    return cbp_jax.methods.redo(graph, key=key, tau=tau, period=1, optimizer=inner, next_bias_correction=True)
  if method == "regrama":  # tau scales the gradient score, so large taus reset every unit.
    return cbp_jax.methods.regrama(graph, key=key, tau=tau, period=1, optimizer=inner)
  if method == "snr":  # See one_step: units silent on the batch are reset.
    return cbp_jax.methods.snr(graph, key=key, eta=0.5, optimizer=inner)
  _, mode, basis = method.split("/")
  return cbp_jax.cbp(
    graph,
    key=key,
    replacement_rate=rate,
    maturity_threshold=0,
    decay_rate=decay,
    utility="contribution",
    accumulate=mode == "accumulate",
    count_basis=basis,
    optimizer=inner,
    max_replacements_per_step=4,
  )


@functools.cache
def one_step(net: Net, method: str, optimizer: str):
  """Compiled: one step from a fresh state; returns the params with and without the reset."""
  graph = net.graph()

  def program(params, grads, lr, rate, decay, tau, key, x):
    inner = optax.adam(lr) if optimizer == "adam" else optax.sgd(lr)
    tx = make_tx(method, graph, key, rate, decay, tau, inner)
    _, acts = net.forward(params, x)
    state = tx.init(params)
    if method == "snr":  # A history that makes a unit silent on this batch overdue for a reset.
      state = state._replace(
        firing_rate=jax.tree.map(lambda r: jnp.full_like(r, 0.5), state.firing_rate),
        seen=jax.tree.map(lambda r: jnp.full_like(r, 20.0), state.seen),
        streak=jax.tree.map(lambda r: jnp.full_like(r, 20.0), state.streak),
      )
    updates, state = tx.update(grads, state, params, activations=acts)
    plain, _ = inner.update(grads, inner.init(params), params)
    replaced = sum(jnp.sum(m) for m in state.last_replaced.values())
    return optax.apply_updates(params, updates), optax.apply_updates(params, plain), replaced

  return jax.jit(program)


def finite(tree) -> bool:
  return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree))


@settings(max_examples=8, **SETTINGS)
@given(
  net=nets(),
  method=st.sampled_from(RESETTING),
  optimizer=st.sampled_from(["sgd", "adam"]),
  scale=st.sampled_from([1.0, 30.0, 1e3]),
  data=st.data(),
)
def test_a_reset_step_keeps_finite_parameters_finite(net, method, optimizer, scale, data):
  rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
  params = jax.tree.map(lambda p: p * scale, net.params(rng))
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(0, scale, p.shape), p.dtype), params)
  x = net.x(rng, batch=3)
  assert finite(net.forward(params, x))  # The precondition: a finite forward pass.
  lr = data.draw(st.sampled_from([0.0, 1e-2, 1.0]), label="lr")
  rate = data.draw(st.sampled_from([0.3, 1.0]), label="rate")
  decay = data.draw(st.sampled_from([0.0, 0.9, 0.99]), label="decay")
  tau = data.draw(st.sampled_from([0.0, 0.5, 10.0]), label="tau")
  new, plain, replaced = one_step(net, method, optimizer)(
    params, grads, lr, rate, decay, tau, jax.random.key(0), x
  )
  assert finite(plain)
  assert finite(new), f"{method}: {int(replaced)} units replaced, parameters not finite"


def single_example(net: Net, rng) -> jax.Array:
  """One input on which every unit's activation is constant (conv: the same at every position)."""
  if net.kind != "conv":
    return net.x(rng, batch=1)
  pixel = rng.normal(size=(1, 1, 1, net.inputs))
  return jnp.asarray(np.broadcast_to(pixel, (1, net.size, net.size, net.inputs)), jnp.float32)


@settings(max_examples=8, **SETTINGS)
@given(net=nets(), method=st.sampled_from(METHODS), data=st.data())
def test_bias_correction_keeps_the_loss_on_the_batch_of_its_statistics(net, method, data):
  net = dataclasses.replace(net, bias=True)  # The correction needs the consumers' biases.
  rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
  params = net.params(rng)
  zero = jax.tree.map(jnp.zeros_like, params)
  x = single_example(net, rng)
  y = jnp.asarray(rng.normal(size=(1, net.outputs)), jnp.float32)
  decay = data.draw(st.sampled_from([0.0, 0.9, 0.99]), label="decay")
  new, plain, replaced = one_step(net, method, "sgd")(
    params, zero, 0.1, 1.0, decay, 10.0, jax.random.key(1), x
  )
  assume(int(replaced) > 0)
  before, _ = net.forward(plain, x)
  after, _ = net.forward(new, x)
  scale = 1.0 + float(np.max(np.abs(before)))
  np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5 * scale)
  loss = lambda out: float(jnp.mean((out - y) ** 2))
  np.testing.assert_allclose(loss(after), loss(before), rtol=1e-4, atol=1e-6 * scale**2)


def test_bias_correction_keeps_only_the_batch_mean_on_varied_examples():
  """The boundary of the invariant: one Dense hidden layer, every unit
  replaced, two different examples. The head's pre-activation keeps its
  batch mean exactly (it becomes that mean on both examples), so the
  per-example outputs, and the squared loss, change."""
  net = Net(kind="mlp", inputs=2, widths=(3,), outputs=1, norm=False, bias=True)
  params = {
    "Dense_0": {
      "kernel": jnp.asarray([[1.0, -0.5, 0.3], [0.2, 0.8, -1.0]]),
      "bias": jnp.asarray([0.1, 0.2, 0.3]),
    },
    "Dense_1": {"kernel": jnp.asarray([[0.7], [-0.4], [0.9]]), "bias": jnp.asarray([0.05])},
  }
  x = jnp.asarray([[1.0, 2.0], [-1.0, 0.5]])
  h = np.maximum(
    np.asarray(x) @ np.asarray(params["Dense_0"]["kernel"]) + np.asarray(params["Dense_0"]["bias"]), 0.0
  )
  assert np.ptp(h, axis=0).max() > 0.1  # Activations differ between the two examples.
  zero = jax.tree.map(jnp.zeros_like, params)
  new, plain, replaced = one_step(net, "cbp/accumulate/layer", "sgd")(
    params, zero, 0.1, 1.0, 0.9, 0.0, jax.random.key(2), x
  )
  assert int(replaced) == 3
  before, _ = net.forward(plain, x)
  after, _ = net.forward(new, x)
  w, b = np.asarray(params["Dense_1"]["kernel"]), np.asarray(params["Dense_1"]["bias"])
  expected = h.mean(axis=0) @ w + b  # The mean contribution, on both examples.
  np.testing.assert_allclose(np.asarray(after), np.broadcast_to(expected, (2, 1)), rtol=1e-5)
  np.testing.assert_allclose(np.mean(after), np.mean(before), rtol=1e-5)
  assert np.max(np.abs(np.asarray(after) - np.asarray(before))) > 0.1
