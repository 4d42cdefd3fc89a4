"""The garbage collector of a daphne worker: startup objects frozen, young collections less often.

With Python's defaults (thresholds 700, 10, 10) a worker serving ~1,500 calls/s ran ~250
young and several full collections a second; the full ones walked every object of Django,
the apps and the caches (~200,000), ~0.1 s of CPU per second of load and a pause each time
(py-spy showed it as `asyncio.Queue.__init__` and other allocation sites). `install()`:

* collects once and `gc.freeze()`s what startup made (modules, settings, URL patterns): those
  objects are never walked again;
* sets the thresholds from `FEDMCP_GC_THRESHOLD` (default `20000,20,20`; `default` keeps
  Python's): a young collection every 20,000 net allocations instead of 700, so the objects of
  calls in flight are promoted (and later walked in full collections) far less often.

Reference counting still frees almost everything at once; only garbage in reference cycles
waits longer for a collection (at most a few MB at these thresholds).
"""

from __future__ import annotations

import gc
import logging
import os
import sys

TARGETS = {"daphne": "4.2.3"}
"""The versions this module was written against (tests/architecture/test_runtime_patches.py)."""

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = (20000, 20, 20)


def thresholds(value: str | None) -> tuple[int, int, int] | None:
    """Parse `FEDMCP_GC_THRESHOLD`: "a,b,c" of positive integers, "" for the default, "default" for Python's own."""
    if value is None or not value.strip():
        return DEFAULT_THRESHOLD
    if value.strip().lower() == "default":
        return None
    parts = value.split(",")
    try:
        numbers = tuple(int(part) for part in parts)
    except ValueError:
        numbers = ()
    if len(numbers) != 3 or min(numbers) < 1:
        raise ValueError(f"FEDMCP_GC_THRESHOLD must be three positive integers like 20000,20,20 (or 'default'), not {value!r}")
    return numbers  # type: ignore[return-value]


def install() -> None:
    """Tune the collector when this process is the `daphne` command (see the module docstring).

    Only there: test runs and `manage.py` import daphne's server module too, and keep Python's
    defaults.
    """
    if "daphne.cli" not in sys.modules:
        return
    chosen = thresholds(os.environ.get("FEDMCP_GC_THRESHOLD"))
    gc.collect()
    gc.freeze()
    if chosen is not None:
        gc.set_threshold(*chosen)
    logger.debug("gc: %d startup objects frozen, thresholds %s", gc.get_freeze_count(), gc.get_threshold())
