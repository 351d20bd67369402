"""trace_graph: the unit graph read from the computation, and every refusal."""

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn
from flax import nnx

import cbp_jax
from cbp_jax import resnet
from tests.cbp_steps import FanOut, WithBatchNorm, fan_out_graph


def linen_fn(model, **kw):
  return lambda p, *args: cbp_jax.apply_with_activations(model, p, *args, **kw)


def traced(model, x, params=None):
  if params is None:
    params = model.init(jax.random.key(0), x)["params"]
  return cbp_jax.trace_graph(linen_fn(model), params, x), params


def renamed(graph, names):
  """``graph`` with every module name replaced through ``names`` (path prefixes)."""

  def path(p):
    if p is None:
      return None
    head, _, tail = p.partition("/")
    return f"{names.get(head, head)}/{tail}" if tail else names.get(head, head)

  return cbp_jax.LayerGraph(
    [
      cbp_jax.Layer(
        path(l.name),
        path(l.kernel),
        path(l.bias),
        [cbp_jax.Consumer(path(c.kernel), path(c.bias), c.layout) for c in l.consumers],
        path(l.norm),
        l.activation,
      )
      for l in graph
    ]
  )


# --- The traced graph equals the hand-written or inferred one -------------------


def test_mlp_graph_equals_the_inferred_one_and_names_the_consumers():
  graph, params = traced(cbp_jax.models.MLP(hidden=(8, 7, 6), outputs=2), jnp.ones((3, 4)))
  assert graph == cbp_jax.graph_from_params(params)
  assert [(l.name, l.consumers[0].kernel) for l in graph] == [
    ("Dense_0", "Dense_1/kernel"),
    ("Dense_1", "Dense_2/kernel"),
    ("Dense_2", "Dense_3/kernel"),
  ]


@pytest.mark.parametrize("conv", ["xla", "im2col"])
def test_convnet_graph_through_pooling_and_flatten(conv):
  model, x = cbp_jax.models.ConvNet(outputs=2, conv=conv), jnp.ones((2, 32, 32, 3))
  graph, params = traced(model, x, jax.eval_shape(model.init, jax.random.key(0), x)["params"])
  assert graph == cbp_jax.graph_from_params(params)
  assert graph.layers[2].consumers == (cbp_jax.Consumer("Dense_0/kernel", "Dense_0/bias"),)


def test_resnet18_inner_units_equal_the_explicit_graph():
  model = resnet.ResNet18(num_classes=5, width=4, conv="xla")
  x = jnp.ones((2, 8, 8, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)  # Shapes are all it reads.

  def fn(params, batch_stats, x):
    out, cols = model.apply(
      {"params": params, "batch_stats": batch_stats}, x, mutable=["activations", "batch_stats"]
    )
    acts = cbp_jax.collect_activations(cols["activations"])
    return out, {k: h for k, h in acts.items() if k.endswith("/conv1")}

  graph = cbp_jax.trace_graph(fn, variables["params"], variables["batch_stats"], x)
  assert graph == resnet.resnet_graph(model)


def test_fan_out_with_a_layer_norm_equals_the_hand_written_graph():
  graph, _ = traced(FanOut(), jnp.ones((2, 4)))
  assert graph == fan_out_graph()


def test_batch_norm_in_training_mode_belongs_to_the_units():
  model = WithBatchNorm()
  variables = model.init(jax.random.key(0), jnp.ones((2, 4)))

  def fn(params, x):
    out, cols = model.apply(
      {"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["activations", "batch_stats"]
    )
    return (out, cols["batch_stats"]), cbp_jax.collect_activations(cols["activations"])

  graph = cbp_jax.trace_graph(fn, variables["params"], jnp.ones((8, 4)))
  assert graph == cbp_jax.graph_from_params(variables["params"])
  assert graph.layers[0].norm == "BatchNorm_0"


class ChannelsFirst(nn.Module):
  """A conv layer flattened in NCHW order (PyTorch's), then two dense layers."""

  @nn.compact
  def __call__(self, x):
    conv = nn.Conv(3, (3, 3), padding="VALID")
    h = cbp_jax.sow_activation(conv, nn.tanh(conv(x)))
    h = jnp.transpose(h, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    return nn.Dense(2)(nn.Dropout(0.5, deterministic=False)(h))


def test_channels_first_flatten_behind_dropout_and_the_activation_are_read():
  model = ChannelsFirst()
  x = jnp.ones((2, 6, 6, 1))
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  params = model.init(rngs, x)["params"]
  graph = cbp_jax.trace_graph(linen_fn(model, rngs={"dropout": jax.random.key(2)}), params, x)
  assert graph == cbp_jax.LayerGraph(
    [
      cbp_jax.Layer(
        "Conv_0",
        "Conv_0/kernel",
        "Conv_0/bias",
        [cbp_jax.Consumer("Dense_0/kernel", "Dense_0/bias", "channels_first")],
        activation="tanh",
      )
    ]
  )


def test_a_layer_norm_without_activation_is_the_identity_not_relu():
  """flax's LayerNorm clips its variance with max(var, 0): that is no ReLU on the units."""

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      dense = nn.Dense(5)
      return nn.Dense(1)(cbp_jax.sow_activation(dense, nn.LayerNorm()(dense(x))))

  graph, _ = traced(Net(), jnp.ones((2, 3)))
  assert (graph.layers[0].norm, graph.layers[0].activation) == ("LayerNorm_0", "identity")


@pytest.mark.parametrize(
  "act, name",
  [
    (nn.relu, "relu"),
    (nn.gelu, "gelu"),
    (lambda z: nn.gelu(z, approximate=False), "gelu"),
    (nn.silu, "silu"),
    (nn.tanh, "tanh"),
    (nn.sigmoid, "sigmoid"),
    (nn.leaky_relu, "leaky_relu"),
    (nn.elu, "elu"),
    (nn.selu, "selu"),
    (lambda z: z, "identity"),
    (lambda z: jnp.maximum(z, 0.0), "relu"),
  ],
)
def test_the_activation_function_is_identified(act, name):

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      dense = nn.Dense(5)
      return nn.Dense(1)(cbp_jax.sow_activation(dense, act(dense(x))))

  graph, _ = traced(Net(), jnp.ones((2, 3)))
  assert graph.layers[0].activation == name


# --- The same computation gives the same graph, whatever the names -----------


class Shuffled(nnx.Module):
  """The MLP 4-8-7-2 with attribute names whose sorted order is not the call order."""

  def __init__(self, rngs):
    self.zeta = nnx.Linear(4, 8, rngs=rngs)
    self.alpha = nnx.Linear(8, 7, rngs=rngs)
    self.mid = nnx.Linear(7, 2, rngs=rngs)

  def __call__(self, x):
    x = cbp_jax.sow_activation(self.zeta, nnx.relu(self.zeta(x)))
    x = cbp_jax.sow_activation(self.alpha, nnx.relu(self.alpha(x)))
    return self.mid(x)


def nnx_graph(model, x):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def forward(p, x):
    return cbp_jax.capture_activations(nnx.merge(graphdef, p, rest), x)

  return cbp_jax.trace_graph(forward, params, x), params


def test_nnx_and_linen_versions_of_one_net_give_the_same_graph():
  x = jnp.ones((3, 4))
  linen_graph, _ = traced(cbp_jax.models.MLP(hidden=(8, 7), outputs=2), x)
  graph, _ = nnx_graph(Shuffled(nnx.Rngs(0)), x)
  assert graph == renamed(linen_graph, {"Dense_0": "zeta", "Dense_1": "alpha", "Dense_2": "mid"})
  assert graph.names == ("zeta", "alpha")  # Forward order, not the state's sorted order.


def test_reordered_or_renamed_params_give_the_same_graph():
  model = cbp_jax.models.MLP(hidden=(5,) * 11, outputs=2)
  x = jnp.ones((2, 3))
  graph, params = traced(model, x)
  for reorder in (lambda d: dict(reversed(list(d.items()))), lambda d: dict(sorted(d.items()))):
    assert cbp_jax.trace_graph(linen_fn(model), reorder(params), x) == graph
  # Renamed modules: the same dataflow, so the same graph up to the names.
  names = {f"Dense_{i}": f"m{10 - i}" for i in range(12)}
  params2 = {names[k]: v for k, v in params.items()}

  def fn(p, x):
    back = {k: p[v] for k, v in names.items()}
    out, acts = cbp_jax.apply_with_activations(model, back, x)
    return out, {names[k]: h for k, h in acts.items()}

  assert cbp_jax.trace_graph(fn, params2, x) == renamed(graph, names)


# --- Refusals -------------------------------------------------------------------


class FlatResidual(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(6)(x)
    for _ in range(2):
      dense = nn.Dense(6)
      x = x + cbp_jax.sow_activation(dense, nn.relu(dense(x)))
    return nn.Dense(1)(x)


def test_a_flat_residual_net_is_refused_naming_the_layer_and_the_add():
  with pytest.raises(ValueError, match=r"layer 'Dense_1'.*`add` at .*test_trace.py:\d+.*residual"):
    traced(FlatResidual(), jnp.ones((2, 3)))


class RecordsOutput(nn.Module):
  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(3)
    h = cbp_jax.sow_activation(dense, nn.relu(dense(x)))
    head = nn.Dense(2)
    return cbp_jax.sow_activation(head, head(h))


def test_the_output_layer_is_refused():
  with pytest.raises(ValueError, match="layer 'Dense_1'.*output directly"):
    traced(RecordsOutput(), jnp.ones((2, 3)))


def test_units_read_by_a_reduction_or_an_attention_product_are_refused():
  model = cbp_jax.models.MLP(hidden=(4,), outputs=2)
  x = jnp.ones((2, 3))
  params = model.init(jax.random.key(0), x)["params"]

  def summed(p, x):
    out, acts = cbp_jax.apply_with_activations(model, p, x)
    return out + jnp.sum(acts["Dense_0"]), acts

  with pytest.raises(ValueError, match="reduce_sum.*mixes them"):
    cbp_jax.trace_graph(summed, params, x)

  def attention(p, x):
    out, acts = cbp_jax.apply_with_activations(model, p, x)
    h = acts["Dense_0"]
    return out + jnp.mean(h @ h.T), acts

  with pytest.raises(ValueError, match="product with another activation"):
    cbp_jax.trace_graph(attention, params, x)


def test_a_pre_activation_skip_and_a_loop_are_refused():
  class PreSkip(nn.Module):
    @nn.compact
    def __call__(self, x):
      dense = nn.Dense(3)
      z = dense(x)
      return nn.Dense(3)(cbp_jax.sow_activation(dense, nn.relu(z))) + z

  with pytest.raises(ValueError, match="pre-activation is also read by `add`"):
    traced(PreSkip(), jnp.ones((2, 3)))

  model = cbp_jax.models.MLP(hidden=(4,), outputs=2)
  params = model.init(jax.random.key(0), jnp.ones((2, 3)))["params"]

  def looped(p, x):
    out, acts = cbp_jax.apply_with_activations(model, p, x)
    h = jax.lax.fori_loop(0, 2, lambda i, h: h * 0.5, acts["Dense_0"])
    return out + h.sum(-1, keepdims=True), acts

  with pytest.raises(ValueError, match="loops and conditionals"):
    cbp_jax.trace_graph(looped, params, jnp.ones((2, 3)))


def test_an_unknown_activation_asks_for_a_name_and_accepts_one():
  class Softplus(nn.Module):
    @nn.compact
    def __call__(self, x):
      dense = nn.Dense(3)
      return nn.Dense(1)(cbp_jax.sow_activation(dense, jnp.log1p(jnp.exp(dense(x)))))

  x = jnp.ones((2, 3))
  params = Softplus().init(jax.random.key(0), x)["params"]
  with pytest.raises(ValueError, match=r"cannot identify its activation.*activation=\{'Dense_0'"):
    cbp_jax.trace_graph(linen_fn(Softplus()), params, x)
  graph = cbp_jax.trace_graph(linen_fn(Softplus()), params, x, activation={"Dense_0": "relu"})
  assert graph.layers[0].activation == "relu"
  with pytest.raises(ValueError, match="does not record"):
    cbp_jax.trace_graph(linen_fn(Softplus()), params, x, activation={"Dense_9": "relu"})


def test_bad_fn_results_and_variables_dicts_are_refused():
  model = cbp_jax.models.MLP(hidden=(4,), outputs=2)
  x = jnp.ones((2, 3))
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"pass variables\['params'\]"):
    cbp_jax.trace_graph(linen_fn(model), variables, x)
  with pytest.raises(ValueError, match=r"must return \(output, activations\)"):
    cbp_jax.trace_graph(lambda p, x: model.apply({"params": p}, x), variables["params"], x)
  with pytest.raises(ValueError, match="recorded no activations"):
    cbp_jax.trace_graph(lambda p, x: (model.apply({"params": p}, x), {}), variables["params"], x)


# --- graph_from_params refuses what names cannot prove ---------------------------


def test_graph_from_params_refuses_an_nnx_state_with_named_attributes():
  model = Shuffled(nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"nnx.state sorts attribute names.*trace_graph"):
    cbp_jax.graph_from_params(nnx.state(model, nnx.Param))


def test_graph_from_params_refuses_keys_sorted_as_strings_and_custom_names():
  model = cbp_jax.models.MLP(hidden=(5,) * 11, outputs=2)
  params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
  assert len(cbp_jax.graph_from_params(params)) == 11
  with pytest.raises(ValueError, match="'Dense_2' comes after 'Dense_11'.*sorted"):
    cbp_jax.graph_from_params(dict(sorted(params.items())))
  with pytest.raises(ValueError, match=r"module names \['encoder', 'hidden'\]"):
    cbp_jax.graph_from_params({"encoder": params["Dense_0"], "hidden": params["Dense_1"]})


def test_graph_from_params_refuses_a_norm_after_the_last_weight_layer():
  params = FanOut().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  linear = {k: params[k] for k in ("Dense_0", "Dense_1", "LayerNorm_0")}  # Sorted: the norm last.
  with pytest.raises(ValueError, match="norm 'LayerNorm_0' comes after the last weight layer"):
    cbp_jax.graph_from_params(linear)


def test_graph_from_params_names_the_batch_stats_in_an_nnx_state():
  class WithBN(nnx.Module):
    def __init__(self, rngs):
      self.layers = nnx.List(
        [nnx.Linear(3, 4, rngs=rngs), nnx.BatchNorm(4, rngs=rngs), nnx.Linear(4, 1, rngs=rngs)]
      )

  with pytest.raises(ValueError, match=r"\['BatchStat'\].*nnx.state\(model, nnx.Param\)"):
    cbp_jax.graph_from_params(nnx.state(WithBN(nnx.Rngs(0))))
