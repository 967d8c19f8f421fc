"""A wheel built from the repository carries the Lua scripts and the migrations."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_lua_and_migrations(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel, = tmp_path.glob("release_service-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for script in (ROOT / "lua").glob("*.lua"):
        assert f"release_service/lua/{script.name}" in names
    assert "release_service/core/migrations/0001_initial.sql" in names
    assert "release_service/gateway/static/ops.html" in names
    assert {"consumers/bookings.py", "consumers/sms.py", "release_service/py.typed"} <= names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "release-service = release_service.cli:main" in \
        zipfile.ZipFile(wheel).read(entry_points).decode()
