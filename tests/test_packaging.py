"""The wheel carries what the app loads from files: the Lua scripts, templates, migrations
and py.typed (a file left out of package-data works here and fails for users). The version
is written once, in pyproject.toml, and CHANGELOG.md has its section. `make dist` builds
and installs the real distributions (tests/dist_smoke.py)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_every_file_the_app_loads(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    package = ROOT / "tiered_cache"
    wanted = {
        str(p.relative_to(ROOT))
        for pattern in ("lua/*.lua", "templates/**/*.html", "migrations/*.py", "py.typed")
        for p in package.glob(pattern)
    }
    assert any(name.endswith(".lua") for name in wanted)
    assert wanted <= names, sorted(wanted - names)


def _pyproject_version() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project.get("dynamic", []), "the version is written in pyproject"
    version: str = project["version"]
    return version


def test_the_version_is_written_in_pyproject_only() -> None:
    import tiered_cache

    version = _pyproject_version()
    # The installed metadata says it too; a stale one means `make venv` did not reinstall.
    assert metadata.version("django-tiered-cache") == version
    assert tiered_cache.__version__ == version
    # No module repeats it: __version__ comes from the metadata.
    for path in (ROOT / "tiered_cache").rglob("*.py"):
        assert not re.search(r"^__version__\s*[:=]", path.read_text(), re.M), path


def test_the_changelog_has_a_section_for_the_version() -> None:
    version = _pyproject_version()
    headings = re.findall(r"^## \[([^\]]+)\]", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert version in headings, f"CHANGELOG.md has no '## [{version}]' section: {headings}"
    # Newest first: only Unreleased may stand above the current version.
    assert set(headings[: headings.index(version)]) <= {"Unreleased"}, headings
