"""cbp_jax as a dependency: a light import, the modules README names, one version, floors that can be tested.

The wheel itself (built, installed next to a user's pins at the floors, running README's example) is checked by
`make wheel-check` (.ci/wheel_check.py) in CI, which needs network access to install packages.
"""

import importlib.metadata
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

import cbp_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / ".ci"))
from floor_requirements import floor_pins  # noqa: E402  (.ci is not a package)

HEAVY = ("tensorflow_datasets", "orbax", "matplotlib")


def _fresh_python(code):
  """Runs ``code`` in a new interpreter (this one has imported everything the test suite has)."""
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  return result.stdout


def test_import_does_not_load_data_checkpoint_or_plotting_packages():
  loaded = _fresh_python(
    "import sys, cbp_jax\nprint(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
  ).split()
  assert "cbp_jax" in loaded and "jax" in loaded  # the probe sees what was imported
  assert not set(HEAVY) & set(loaded)


def test_every_module_named_in_readme_works_after_a_plain_import():
  package = ROOT / "cbp_jax"
  modules = ({p.stem for p in package.glob("*.py")} - {"__init__"}) | {
    p.parent.name for p in package.glob("*/__init__.py")
  }  # Subpackages (cbp_jax.methods).
  named = set(re.findall(r"cbp_jax\.([a-z_]+)\b", (ROOT / "README.md").read_text())) & modules
  assert {"resnet", "sharding", "methods", "metrics"} <= named
  missing = _fresh_python(
    "import cbp_jax, types\n"
    f"print(' '.join(m for m in {sorted(named)!r} "
    "if not isinstance(getattr(cbp_jax, m, None), types.ModuleType)))"
  ).split()
  assert missing == []


# Every library module a user imports declares its public names; `tree_paths` and `validation` are the library's
# own helpers (and `data`, the experiments' loaders).
PUBLIC_MODULES = (
  "activations",
  "graph",
  "initializers",
  "methods",
  "metrics",
  "models",
  "prng",
  "reset",
  "resnet",
  "sharding",
  "trace",
  "transform",
  "utility",
)


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_every_library_module_lists_its_public_names_and_they_exist(name):
  module = importlib.import_module(f"cbp_jax.{name}")
  assert module.__all__, name
  missing = [n for n in module.__all__ if not hasattr(module, n)]
  assert missing == []
  assert len(set(module.__all__)) == len(module.__all__)
  assert not [n for n in module.__all__ if n.startswith("_")]


def test_what_cbp_jax_exports_is_public_in_its_own_module():
  for name in cbp_jax.__all__:
    obj = getattr(cbp_jax, name)
    if isinstance(obj, type(cbp_jax)):
      continue  # A module.
    home = sys.modules[obj.__module__]
    assert name in home.__all__, f"cbp_jax.{name} is not in {home.__name__}.__all__"


def test_one_version_number():
  version = cbp_jax.__version__
  assert re.fullmatch(r"\d+\.\d+\.\d+", version)
  pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
  assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "cbp_jax.__version__"}
  citation = re.search(r"^version:\s*(\S+)\s*$", (ROOT / "CITATION.cff").read_text(), re.M)
  assert citation and citation.group(1) == version
  assert re.search(rf"^## {re.escape(version)} ", (ROOT / "CHANGELOG.md").read_text(), re.M)
  try:
    installed = importlib.metadata.version("cbp_jax")
  except importlib.metadata.PackageNotFoundError:
    return  # run from a checkout that is not installed
  assert installed == version


def test_py_typed_ships_with_the_package():
  pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert (ROOT / "cbp_jax" / "py.typed").is_file()
  assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["cbp_jax"]


def test_dependencies_are_ranges_with_floors_and_no_jaxlib():
  deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
  names = [re.match(r"[A-Za-z0-9_.\-]+", d).group(0).lower() for d in deps]
  assert "jaxlib" not in names
  assert {"jax", "flax", "optax", "numpy"} <= set(names)
  assert not any("==" in d for d in deps)
  assert [p.split("==")[0].lower() for p in floor_pins(deps)] == names


def test_floor_pins():
  assert floor_pins(["jax>=0.10.0", "numpy >= 2.0.0, <3", "tensorflow-datasets>=4.9.10"]) == [
    "jax==0.10.0",
    "numpy==2.0.0",
    "tensorflow-datasets==4.9.10",
  ]
  for unbounded in ("flax", "optax==0.2.8", "chex<1"):
    with pytest.raises(SystemExit, match="no '>=' lower bound"):
      floor_pins([unbounded])


def test_user_documentation_cites_the_semantics_page_not_the_private_spec():
  texts = {"README.md": (ROOT / "README.md").read_text()}
  texts.update({str(p.relative_to(ROOT)): p.read_text() for p in (ROOT / "cbp_jax").glob("*.py")})
  texts.update({str(p.relative_to(ROOT)): p.read_text() for p in (ROOT / "docs").glob("*.rst")})
  offenders = [name for name, text in texts.items() if re.search(r"\bSPEC\b", text)]
  assert offenders == []
