"""cbp_jax: Continual Backpropagation and plasticity tools for JAX, Optax and Flax."""
