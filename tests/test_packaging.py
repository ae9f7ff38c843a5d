"""The wheel carries what the app loads from files: the Lua scripts, templates, migrations
and py.typed (a file left out of package-data works here and fails for users)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
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
