"""Each change fedmcp makes to the server it runs on names the versions it was written against.

An upgrade of daphne, Twisted, autobahn or Channels fails here first: re-read the module (what it
replaces may have moved or changed), re-run its tests, then update its `TARGETS`.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import version

import pytest

import fedmcp_site.runtime

MODULES = [f"fedmcp_site.runtime.{info.name}" for info in pkgutil.iter_modules(fedmcp_site.runtime.__path__)]


def test_every_runtime_module_is_listed() -> None:
    assert sorted(m.rsplit(".", 1)[1] for m in MODULES) == ["access_log", "gc_tuning", "lifecycle", "request_guard", "websocket_close"]


@pytest.mark.parametrize("module", MODULES)
def test_the_installed_server_is_the_one_the_patch_was_written_for(module: str) -> None:
    targets = importlib.import_module(module).TARGETS
    assert targets, f"{module} names no target version"
    installed = {package: version(package) for package in targets}
    assert installed == targets, f"{module} was written for {targets}; installed: {installed}. Re-read it before updating TARGETS."
