"""fedmcp_site/runtime/gc_tuning.py: a daphne worker's collector settings, and only a daphne worker's."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import pytest

from fedmcp_site.runtime import gc_tuning

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, (20000, 20, 20)), ("", (20000, 20, 20)), (" 5000,5,7 ", (5000, 5, 7)), ("default", None), ("DEFAULT", None)],
)
def test_thresholds_are_read_from_the_setting(value: str | None, expected: tuple[int, int, int] | None) -> None:
    assert gc_tuning.thresholds(value) == expected


@pytest.mark.parametrize("value", ["1000", "a,b,c", "100,0,10", "1,2,3,4", "-5,10,10"])
def test_a_bad_setting_is_refused_with_what_is_expected(value: str) -> None:
    with pytest.raises(ValueError, match="three positive integers"):
        gc_tuning.thresholds(value)


def test_outside_daphne_nothing_changes() -> None:
    before = gc.get_threshold(), gc.get_freeze_count()
    gc_tuning.install()  # pytest is not the daphne command
    assert (gc.get_threshold(), gc.get_freeze_count()) == before


WORKER = """
import gc, sys
import daphne.cli  # as under the daphne command: loaded before the application
import fedmcp_site.asgi  # noqa: F401
print(gc.get_threshold(), gc.get_freeze_count() > 10000)
"""


@pytest.mark.parametrize(("value", "expected"), [(None, "(20000, 20, 20) True"), ("3000,4,5", "(3000, 4, 5) True"), ("default", "(700, 10, 10) True")])
def test_a_daphne_worker_freezes_its_startup_objects_and_sets_the_thresholds(value: str | None, expected: str, tmp_path: Path) -> None:
    env = {"DJANGO_SETTINGS_MODULE": "fedmcp_site.settings", "FEDMCP_DB_PATH": str(tmp_path / "db.sqlite3"), "PATH": "/usr/bin:/bin"}
    if value is not None:
        env["FEDMCP_GC_THRESHOLD"] = value
    result = subprocess.run([sys.executable, "-c", WORKER], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == expected
