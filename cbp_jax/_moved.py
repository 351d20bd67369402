"""Forwarding a module that moved out of the library, with a DeprecationWarning."""

from __future__ import annotations

import functools
import importlib
import sys
import warnings


def _importer_stacklevel() -> int:
  """The ``stacklevel`` that points a warning at the first frame outside cbp_jax and the import machinery.

  Python's default filters show a DeprecationWarning only where ``__main__``
  triggers it, so the warning is attributed to the user's importing line, not
  to importlib or to cbp_jax itself.
  """
  frame, level = sys._getframe(1), 1
  while frame is not None:
    filename, module = frame.f_code.co_filename, frame.f_globals.get("__name__") or ""
    # `warnings.warn` itself skips importlib's bootstrap frames when it counts the stack.
    internal = "importlib" in filename and "_bootstrap" in filename
    if not (internal or module == "importlib" or module == "cbp_jax" or module.startswith("cbp_jax.")):
      break
    frame, level = frame.f_back, level + (not internal)
  return level


def forward(old: str, new: str) -> None:
  """Makes module ``old`` stand for module ``new``, warning that it moved.

  Called by the old module while it is imported. The new module's public
  names (those ``from new import *`` gives) become the old module's, the same
  objects, and any other attribute is looked up in ``new``, so
  ``import old``, ``from old import x`` and ``old.x`` keep working. The old
  module stays a module of its own (its own ``__file__``), so tools that walk
  the package's files (doctest, the API reference) find what they expect.

  Args:
    old: the moved module's old name (its ``__name__``).
    new: where it lives now, e.g. ``"experiments.data"``.

  Raises:
    ImportError: ``new`` cannot be imported (``experiments`` lives in the
      repository, not in the installed package); the message says where the
      code went.
  """
  warnings.warn(
    f"{old} moved to {new} (experiment infrastructure, in the repository's experiments/ "
    f"folder, not in the cbp_jax package); import {new} instead. The old name will be "
    "removed.",
    DeprecationWarning,
    stacklevel=_importer_stacklevel(),
  )
  top = new.split(".")[0]
  try:
    module = importlib.import_module(new)
  except ModuleNotFoundError as e:
    if e.name not in (top, new):
      raise  # The new module is there; one of its own dependencies is missing.
    raise ImportError(
      f"{old} moved to {new}, which is not part of the installed cbp_jax package: it lives in the "
      f"{top}/ folder of the cbp_jax repository. Run from a clone's root (where `import {new}` "
      "works) and import it from there.",
      name=old,
    ) from e
  public = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
  namespace = vars(sys.modules[old])
  namespace.update({name: getattr(module, name) for name in public})
  namespace["__all__"] = list(public)
  namespace["__getattr__"] = functools.partial(getattr, module)  # The rest (PEP 562).
