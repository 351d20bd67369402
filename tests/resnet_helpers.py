"""A small ResNet (two blocks) and its forward pass, shared by the resnet and models test modules."""

import functools

import jax

import cbp_jax
from cbp_jax import resnet

STAGES = (1, 1)  # Two blocks: block1_0 (identity skip) and block2_0 (strided 1x1 shortcut).
WIDTH = 4
MODELS = {
  conv: resnet.ResNet18(num_classes=3, width=WIDTH, stage_sizes=STAGES, conv=conv)
  for conv in ("xla", "im2col")
}  # One instance each: compiled functions are reused.


def small_resnet(conv="xla"):
  model = MODELS[conv]
  x = jax.random.normal(jax.random.key(1), (6, 8, 8, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  return model, {"params": variables["params"], "batch_stats": variables["batch_stats"]}, x


@functools.partial(jax.jit, static_argnums=0)
def forward(model, variables, x):
  """Train-mode forward: (logits, new batch_stats, activations, conv2 outputs)."""
  out, col = model.apply(
    variables,
    x,
    train=True,
    capture_intermediates=True,
    mutable=["batch_stats", "activations", "intermediates"],
  )
  conv2 = {b: col["intermediates"][b]["conv2"]["__call__"][0] for b in resnet.block_names(STAGES)}
  return out, col["batch_stats"], cbp_jax.collect_activations(col["activations"]), conv2
