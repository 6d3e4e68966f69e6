"""What a wheel would hold: every package of the source tree is listed in pyproject.toml."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_every_package_is_installed():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, dirs = set(tool["packages"]), tool["package-dir"]
    source = {".".join(p.parent.relative_to(ROOT).parts) for p in ROOT.glob("bitflux_cli/**/__init__.py")}
    assert source - {"bitflux_cli.assets"} <= listed, sorted(source - listed)
    for package, folder in dirs.items():
        assert (ROOT / folder / "__init__.py").is_file() and package in listed
