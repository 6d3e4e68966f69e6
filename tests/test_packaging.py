"""What a wheel would hold: every package of the source tree is listed in pyproject.toml."""

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_every_package_is_installed():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, dirs = set(tool["packages"]), tool["package-dir"]
    source = {".".join(p.parent.relative_to(ROOT).parts) for p in ROOT.glob("bitflux_cli/**/__init__.py")}
    assert source <= listed, sorted(source - listed)
    for package, folder in dirs.items():
        assert (ROOT / folder / "__init__.py").is_file() and package in listed


def test_wheel_holds_the_embedded_model_and_configs_without_warnings(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("bitflux_cli", "kernels", "configs"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(source)],
        capture_output=True, text=True, check=True,
    )
    assert "absent from the `packages`" not in built.stdout + built.stderr
    (wheel,) = tmp_path.glob("bitflux-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assets = [p for p in (ROOT / "bitflux_cli/assets").rglob("*") if p.is_file()]
    expected = {p.relative_to(ROOT).as_posix() for p in assets}
    expected |= {f"bitflux_cli/configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")}
    expected |= {f"bitflux_kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    assert expected <= names, sorted(expected - names)
