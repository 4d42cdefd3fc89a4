"""One `tools/call` through /mcp, traced: the pipeline's steps run in order, and what the call passes is measured.

The trace counts the product functions the call runs on the event loop (code in the database
threads is not seen), the modules they are in, and the caller->callee edges between apps. The
figures go to build/call-trace.json; docs/ARCHITECTURE.md quotes them. Nothing here is timed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from tests.architecture.test_import_graph import PACKAGES, ROOT
from tests.base import FixturePeerTestCase, McpClient

STEPS = [
    "mcp_endpoint.pipeline.admit.admit",
    "mcp_endpoint.pipeline.connect.connect",
    "mcp_endpoint.pipeline.decide.decide",
    "mcp_endpoint.pipeline.exchange.exchange",
    "mcp_endpoint.pipeline.record.record_call",
]


class CallTracer:
    """Records, in order of first call, the product functions called on this thread."""

    def __init__(self) -> None:
        self.functions: list[str] = []
        self.edges: set[tuple[str, str]] = set()

    def _name(self, frame: FrameType | None) -> str | None:
        if frame is None:
            return None
        module = frame.f_globals.get("__name__", "")
        if module.split(".")[0] not in PACKAGES:
            return None
        return f"{module}.{frame.f_code.co_qualname}"

    def _profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if event != "call":
            return
        name = self._name(frame)
        if name is None:
            return
        if name not in self.functions:
            self.functions.append(name)
        caller = frame.f_back
        while caller is not None and self._name(caller) is None:
            caller = caller.f_back
        caller_name = self._name(caller)
        if caller_name is not None and caller_name != name:
            self.edges.add((caller_name, name))

    def __enter__(self) -> CallTracer:
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.setprofile(None)

    def figures(self) -> dict[str, Any]:
        modules = sorted({self._module(f) for f in self.functions})
        crossings = sorted({(a, b) for a, b in self.edges if a.split(".")[0] != b.split(".")[0]})
        return {
            "functions": len(self.functions),
            "modules": len(modules),
            "app_crossings": len(crossings),
            "module_list": modules,
            "crossing_list": [f"{a} -> {b}" for a, b in crossings],
        }

    def _module(self, function: str) -> str:
        # co_qualname holds no dots for plain functions, "Class.method" or "f.<locals>.g" otherwise.
        parts = function.split(".")
        for cut in range(len(parts), 0, -1):
            if ".".join(parts[:cut]) in sys.modules:
                return ".".join(parts[:cut])
        return function


class OneToolsCall(FixturePeerTestCase):
    async def test_the_pipeline_steps_run_in_order_and_the_trace_is_written(self) -> None:
        client = McpClient()
        await client.initialize()
        params = {"name": "everything__add", "arguments": {"a": 2, "b": 3}}
        warm = await client.call("tools/call", params)  # connects the pool, fills the caches
        self.assertNotIn("error", warm.json())

        with CallTracer() as tracer:
            reply = await client.call("tools/call", params)

        self.assertEqual(reply.json()["result"]["content"][0]["text"], "5")
        self.assertEqual([f for f in tracer.functions if f in STEPS], STEPS)
        figures = tracer.figures()
        self.assertIn("mcp_endpoint.pipeline.flow", figures["module_list"])
        out = Path(ROOT) / "build" / "call-trace.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(figures, indent=2) + "\n")
