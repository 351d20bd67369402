"""`cbp_jax/methods/_task_resets.py`: `reset_layers` and `reset_optimizer_for`, also inside cbp/redo states
and chains."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cbp_jax
from cbp_jax import methods as M
from tests.methods_helpers import NAMES, assert_bitwise, bits, loss_fn, mlp


def test_reset_layers_replaces_exactly_the_named_leaves():
  model, params, x, _ = mlp()
  fresh = model.init(jax.random.key(9), x)["params"]
  out = jax.jit(lambda p, f: M.reset_layers(p, f, ["Dense_2"]))(params, fresh)
  for name in NAMES:
    src = fresh if name == "Dense_2" else params
    for leaf in ("kernel", "bias"):
      assert_bitwise(out[name][leaf], src[name][leaf])
  assert not np.array_equal(fresh["Dense_2"]["kernel"], params["Dense_2"]["kernel"])
  out = M.reset_layers(params, fresh, "Dense_0/kernel")  # One leaf; a string is one path.
  assert_bitwise(out["Dense_0"]["kernel"], fresh["Dense_0"]["kernel"])
  assert_bitwise(out["Dense_0"]["bias"], params["Dense_0"]["bias"])
  out = M.reset_layers(params, fresh, ["Dense_0", "Dense_1/bias"])
  assert_bitwise(out["Dense_1"]["bias"], fresh["Dense_1"]["bias"])
  assert_bitwise(out["Dense_1"]["kernel"], params["Dense_1"]["kernel"])
  # Per-seed stacks under vmap.
  stack = jax.tree.map(lambda a, b: jnp.stack([a, b]), params, fresh)
  out = jax.vmap(lambda p, f: M.reset_layers(p, f, "Dense_2"))(stack, jax.tree.map(lambda a: a[::-1], stack))
  assert_bitwise(out["Dense_2"]["kernel"][0], fresh["Dense_2"]["kernel"])
  assert_bitwise(out["Dense_1"]["kernel"][0], params["Dense_1"]["kernel"])


def test_reset_layers_errors():
  model, params, x, _ = mlp()
  fresh = model.init(jax.random.key(9), x)["params"]
  with pytest.raises(ValueError, match="'Dense_9'"):
    M.reset_layers(params, fresh, ["Dense_2", "Dense_9"])
  with pytest.raises(ValueError, match="'Dense'"):
    M.reset_layers(params, fresh, ["Dense"])  # Not a prefix match.
  with pytest.raises(ValueError, match="structure"):
    M.reset_layers(params, {"Dense_0": fresh["Dense_0"]}, ["Dense_0"])
  _, other, _, _ = mlp(hidden=(8, 6))
  with pytest.raises(ValueError, match="Dense_1/(kernel|bias)"):
    M.reset_layers(params, other, ["Dense_1"])


def optimizer(name, graph):
  """The optimizers `reset_optimizer_for` is tested on, by name."""
  adam = optax.adam(1e-2)
  return {
    "adam": adam,
    "momentum": optax.sgd(1e-2, momentum=0.9),
    "l2_init+adam": optax.chain(M.l2_init(1e-3), adam),
    "cbp(adam)": cbp_jax.cbp(graph, key=0, optimizer=adam),
    "l2_init+cbp(adam)": optax.chain(M.l2_init(1e-3), cbp_jax.cbp(graph, key=0, optimizer=adam)),
    "redo(momentum)": M.redo(graph, key=0, optimizer=optax.sgd(1e-2, momentum=0.9)),
    "cbp(adam)+redo": optax.chain(cbp_jax.cbp(graph, key=0, optimizer=adam), M.redo(graph, key=1)),
  }[name]


def same_leaf(a, b):
  if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
    return np.array_equal(jax.random.key_data(a), jax.random.key_data(b))
  return np.array_equal(bits(a), bits(b))


@pytest.mark.parametrize(
  "opt, n_stats",
  [
    ("adam", 4),
    ("momentum", 2),
    ("l2_init+adam", 6),
    ("cbp(adam)", 4),
    ("l2_init+cbp(adam)", 6),
    ("redo(momentum)", 2),
    ("cbp(adam)+redo", 4),
  ],
)
def test_reset_optimizer_for(opt, n_stats):
  """Exactly the statistics of Dense_2's kernel and bias restart (n_stats leaves: Adam's
  mu and nu, the momentum trace, l2_init's initial parameters), also inside cbp/redo
  states and chains holding them; everything else (counts, CBP's per-unit statistics,
  keys) is kept bitwise."""
  model, params, x, y = mlp()
  tx = optax.with_extra_args_support(optimizer(opt, cbp_jax.graph_from_params(params)))
  state = tx.init(params)
  loss = loss_fn(model, x, y)
  for _ in range(2):
    (_, acts), g = jax.value_and_grad(loss, has_aux=True)(params)
    up, state = tx.update(g, state, params, activations=acts)
    params = optax.apply_updates(params, up)
  fresh = model.init(jax.random.key(9), x)["params"]
  params = M.reset_layers(params, fresh, "Dense_2")
  new_state = jax.jit(lambda s, p: M.reset_optimizer_for(tx, s, p, ["Dense_2"]))(state, params)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  old_leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  new_leaves = jax.tree.leaves(new_state)
  n_reset = 0
  for (path, old), new in zip(old_leaves, new_leaves):
    keys = jax.tree_util.keystr(path)
    if "Dense_2" in keys:
      n_reset += 1
      if "initial_params" in keys:  # l2_init: the new initial value is the reset value.
        leaf = "kernel" if "kernel" in keys else "bias"
        assert_bitwise(new, fresh["Dense_2"][leaf])
      else:
        np.testing.assert_array_equal(new, 0.0)
        assert np.any(np.asarray(old) != 0)
    else:
      assert same_leaf(new, old), keys  # Other statistics and counts kept.
  assert n_reset == n_stats


def test_reset_optimizer_for_errors():
  _, params, _, _ = mlp()
  tx = optax.adam(1e-3)
  with pytest.raises(ValueError, match="'Dense_7'"):
    M.reset_optimizer_for(tx, tx.init(params), params, "Dense_7")
  # An init that cannot take optax's placeholder, outside cbp/redo: nothing to go by.
  opaque = optax.GradientTransformation(
    lambda p: {"w": jnp.zeros_like(p["Dense_0"]["kernel"])}, lambda u, s, p=None: (u, s)
  )
  with pytest.raises(ValueError, match="tree_map_params"):
    M.reset_optimizer_for(opaque, opaque.init(params), params, "Dense_2")
  with pytest.raises(ValueError, match="structure"):
    M.reset_optimizer_for(
      optimizer("cbp(adam)", cbp_jax.graph_from_params(params)),
      optimizer("redo(momentum)", cbp_jax.graph_from_params(params)).init(params),
      params,
      "Dense_2",
    )
