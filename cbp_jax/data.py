"""Deprecated: the data set loaders moved to ``experiments.data``.

They are experiment infrastructure, kept in the repository's ``experiments/``
folder, not in the cbp_jax package. Importing this module warns
(DeprecationWarning) and forwards to ``experiments.data`` (the same objects)
when the repository is importable (run from a clone's root); elsewhere it
raises an ImportError saying where the code went.
"""

from cbp_jax import _moved

_moved.forward(__name__, "experiments.data")
