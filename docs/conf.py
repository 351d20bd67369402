"""Sphinx configuration of cbp_jax's documentation (`make docs`)."""

import cbp_jax

project = "cbp_jax"
author = "The cbp_jax developers"
copyright = "2026, The cbp_jax developers"
release = cbp_jax.__version__
version = release

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "sphinx.ext.viewcode",
  "myst_parser",
]

# Every public module gets a page generated from its docstrings (docs/_templates/autosummary/module.rst), so a
# module or function added to the package appears without editing the docs.
autosummary_generate = True
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# Attributes as a field list: autodoc documents NamedTuple fields and dataclass fields as members already.
napoleon_use_ivar = True
# `name` in a docstring is a cross-reference where Sphinx can resolve it, and code otherwise.
default_role = "py:obj"

templates_path = ["_templates"]
# Modules that moved to the repository's experiments/ folder: their old names only warn and forward there
# (cbp_jax/_moved.py), so they get no page of the library's API.
autosummary_context = {"moved_modules": ["cbp_jax.data", "cbp_jax.ppo"]}
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = f"cbp_jax {release}"
