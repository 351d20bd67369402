"""Prints pyproject.toml's dependencies pinned at their declared lower bounds.

`make test-floor` installs these into a separate environment, so the floors in
pyproject.toml are the versions tested, not a guess. Each runtime dependency
(and each extra named on the command line) must declare a `>=` bound.

Usage: python .ci/floor_requirements.py [EXTRA ...] > floors.txt
"""

import pathlib
import re
import sys
import tomllib

PYPROJECT = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
_FLOOR = re.compile(r"^\s*([A-Za-z0-9_.\-\[\]]+)\s*>=\s*([^,;\s]+)")


def floor_pins(requirements):
  """Maps each `name>=X[,<Y]` requirement to `name==X`; raises on any without a floor."""
  pins = []
  for requirement in requirements:
    match = _FLOOR.match(requirement)
    if match is None:
      raise SystemExit(f"pyproject.toml: {requirement!r} has no '>=' lower bound to test")
    pins.append(f"{match.group(1)}=={match.group(2)}")
  return pins


def main(extras):
  project = tomllib.loads(PYPROJECT.read_text())["project"]
  requirements = list(project["dependencies"])
  for extra in extras:
    requirements += project["optional-dependencies"][extra]
  print("\n".join(floor_pins(requirements)))


if __name__ == "__main__":
  main(sys.argv[1:])
