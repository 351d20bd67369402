"""Installs the built wheel the way a user would, next to their own pins, and runs README's example from it.

1. A clean venv gets "the user's project": every direct dependency pinned at its declared floor.
2. `pip install <wheel> -r pins.txt` (the user adds cbp_jax to their requirements) must resolve, and must leave
   every package as it was: the only change is cbp_jax itself.
3. `import cbp_jax` comes from that venv's site-packages (not the checkout), and the README's usage example runs
   there (tests/test_readme.py, run from a directory without the sources).

Usage: python .ci/wheel_check.py DIST_DIR   (DIST_DIR holds the wheel from `python -m build`)
"""

import pathlib
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / ".ci"))
from floor_requirements import floor_pins  # noqa: E402  (after the path is set)


def run(*args, cwd=None):
  print("+", " ".join(map(str, args)), flush=True)
  result = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
  if result.returncode != 0:
    raise SystemExit(f"failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
  return result.stdout


def frozen(python):
  lines = run(python, "-m", "pip", "list", "--format=freeze").splitlines()
  return {line.split("==")[0].lower().replace("_", "-"): line for line in lines}


def main(dist):
  wheels = sorted(pathlib.Path(dist).glob("cbp_jax-*.whl"))
  if len(wheels) != 1:
    raise SystemExit(f"expected one cbp_jax wheel in {dist}, found {[w.name for w in wheels]}")
  wheel = wheels[0].resolve()
  # The declared license ships as text, as Apache-2.0 requires of anyone who redistributes the package.
  with zipfile.ZipFile(wheel) as z:
    licenses = [n for n in z.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
    if not licenses or z.read(licenses[0]) != (ROOT / "LICENSE").read_bytes():
      raise SystemExit(f"{wheel.name} does not carry LICENSE as dist-info/licenses/LICENSE")
    metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    if "License-Expression: Apache-2.0" not in metadata:
      raise SystemExit(f"{wheel.name}: METADATA lacks License-Expression: Apache-2.0")
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  pins = floor_pins(project["dependencies"])
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    python = tmp / "venv" / "bin" / "python"
    run(sys.executable, "-m", "venv", tmp / "venv")
    (tmp / "pins.txt").write_text("\n".join(pins) + "\n")
    run(python, "-m", "pip", "install", "--quiet", "-r", tmp / "pins.txt")
    before = frozen(python)
    run(python, "-m", "pip", "install", "--quiet", wheel, "-r", tmp / "pins.txt")
    after = frozen(python)
    changed = {
      name: (before.get(name), line)
      for name, line in after.items()
      if name != "cbp-jax" and before.get(name) != line
    }
    if changed or "cbp-jax" not in after:
      raise SystemExit(f"installing the wheel changed the user's environment: {changed}")
    print("pins kept:", ", ".join(before[p.split("==")[0].lower()] for p in pins))

    # README's example, from a directory without the sources, against the installed wheel.
    work = tmp / "readme"
    (work / "tests").mkdir(parents=True)
    shutil.copy(ROOT / "README.md", work / "README.md")
    shutil.copy(ROOT / "tests" / "test_readme.py", work / "tests" / "test_readme.py")
    location = run(python, "-c", "import cbp_jax; print(cbp_jax.__file__)", cwd=work).strip()
    if not location.startswith(str(tmp / "venv")):
      raise SystemExit(f"cbp_jax was imported from {location}, not from the installed wheel")
    run(python, "-m", "pip", "install", "--quiet", "pytest")
    print(run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_readme.py", cwd=work))
    print(
      f"ok: {wheel.name} installs next to the floor pins without replacing them and runs README's example"
    )


if __name__ == "__main__":
  main(sys.argv[1])
