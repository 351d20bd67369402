"""Names the docstring examples use without importing them (`make docs` runs them as doctests)."""

import jax
import jax.numpy as jnp
import optax
import pytest

import cbp_jax


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
  doctest_namespace.update(jax=jax, jnp=jnp, optax=optax, cbp_jax=cbp_jax)
