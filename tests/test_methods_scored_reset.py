"""`cbp_jax/methods/_scored_reset.py`: what ReDo, ReGraMa and SNR share: nesting refused, vmap over keys and
traced hyperparameters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cbp_jax
from cbp_jax import methods as M
from tests.new_methods_helpers import jitted_step, kill, mlp


def test_unit_reset_methods_do_not_nest():
  _, params, _, _ = mlp()
  graph = cbp_jax.graph_from_params(params)
  adam = optax.adam(1e-2)
  with pytest.raises(ValueError, match=r"snr: init needs the parameters.*optax\.chain\(cbp"):
    cbp_jax.cbp(graph, key=0, optimizer=M.snr(graph, key=1, optimizer=adam)).init(params)
  for outer in (M.regrama, M.snr, M.redo):
    with pytest.raises(ValueError, match=r"optimizer= holds a cbp, redo, regrama or snr"):
      outer(graph, key=0, optimizer=optax.chain(optax.sgd(0.1), M.regrama(graph, key=1))).init(params)


@pytest.mark.slow  # Six compilations; the experiments' tests vmap these methods in `make test`.
def test_reset_methods_vmap_over_keys_and_traced_hyperparameters():
  """ReGraMa (tau, period), SNR (eta), Hare & Tortoise (decay, period): vmapped == one by one."""
  model, params, x, y = mlp()
  params = kill(params, "Dense_0", 3)
  graph = cbp_jax.graph_from_params(params)
  makers = {
    "regrama": lambda k, a, b: optax.chain(
      optax.sgd(0.1), M.regrama(graph, key=k, tau=a, period=b.astype(jnp.int32))
    ),
    "snr": lambda k, a, b: optax.chain(optax.sgd(0.1), M.snr(graph, key=k, eta=a)),
    "hare_tortoise": lambda k, a, b: optax.chain(optax.sgd(0.1), M.hare_tortoise(a, b.astype(jnp.int32))),
  }
  settings = {
    "regrama": ([0.0, 0.5], [1.0, 3.0]),
    "snr": ([0.3, 0.9], [0.0, 0.0]),
    "hare_tortoise": ([0.5, 0.9], [2.0, 1.0]),
  }
  keys = jax.random.split(jax.random.key(5), 2)
  for name, make in makers.items():

    def run(k, a, b):
      tx = make(k, a, b)
      return jax.lax.fori_loop(
        0, 2, lambda _, c: jitted_step(model, tx, x, y)(*c), (params, tx.init(params))
      )[0]

    a, b = (jnp.asarray(v, jnp.float32) for v in settings[name])
    batched = jax.jit(jax.vmap(run))(keys, a, b)
    for i in range(2):
      single = run(keys[i], a[i], b[i])
      for got, want in zip(jax.tree.leaves(batched), jax.tree.leaves(single)):
        np.testing.assert_allclose(np.asarray(got)[i], np.asarray(want), rtol=1e-5, atol=1e-6, err_msg=name)
    if name != "snr":  # SNR resets nothing in two steps here (its rule is tested above).
      leaf = np.asarray(batched["Dense_0"]["kernel"])
      assert not np.allclose(leaf[0], leaf[1]), name  # The settings matter.
