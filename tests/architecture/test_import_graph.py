"""The product's import graph: no cycles, and no layer imports one above it.

Read from the source (every `import`, at module level or inside a function), so a lazy import
that hides a cycle counts as much as a module-level one. The layers, lowest first:

1. library   fedmcp_lib/: helpers any app may use, importing no app (`LIBRARY`)
2. upstream  federation/upstream/: the transports to upstream servers (with the TLS and HTTP client they use)
3. domain    identity/ and federation/: models, services, policy, trust
4. endpoint  mcp_endpoint/ (the MCP endpoints and the call pipeline), console/ (dashboard, REST API,
             admin forms and playground), and each app's admin.py (the operator's UI, where Django looks for it)
5. shell     fedmcp_site/ settings, URLs, ASGI, server runtime: wires everything, imported by nothing

Inside the call pipeline (mcp_endpoint/pipeline/), flow.py calls the steps in order: no step
imports flow.py, and nothing in the pipeline imports the transports or handlers above it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fedmcp_lib", "fedmcp_site", "federation", "identity", "mcp_endpoint", "console")
LIBRARY = "fedmcp_lib"
"""The package of shared helpers: every module in it is the library layer."""
UPSTREAM = ("federation.upstream", "federation.client", "federation.tls")
LAYERS = {"library": 1, "upstream": 2, "domain": 3, "endpoint": 4, "shell": 5}


def product_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The product module an imported name lives in (a package's __init__ for a package), or None."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> Iterator[str]:
    """Every product module `name` imports, at any depth of its code."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from package import module` imports that module; `from module import name`, the module.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            owner = _owner(target, modules)
            if owner is not None and owner != name:
                yield owner


def import_graph() -> dict[str, set[str]]:
    modules = product_modules()
    return {name: set(imports_of(name, path, modules)) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(start: str) -> None:
        # Iterative, so a deep graph cannot hit the recursion limit.
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return found


def layer_of(name: str) -> str:
    if name == LIBRARY or name.startswith(f"{LIBRARY}."):
        return "library"
    if any(name == module or name.startswith(f"{module}.") for module in UPSTREAM):
        return "upstream"
    if name.endswith(".admin"):
        return "endpoint"
    top = name.split(".")[0]
    if top in ("identity", "federation"):
        return "domain"
    if top in ("mcp_endpoint", "console"):
        return "endpoint"
    return "shell"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for name, targets in sorted(graph.items()):
        for target in sorted(targets):
            if LAYERS[layer_of(target)] > LAYERS[layer_of(name)]:
                found.append(f"{name} ({layer_of(name)}) imports {target} ({layer_of(target)})")
    return found


def test_the_product_has_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_no_layer_imports_a_layer_above_it() -> None:
    assert upward_imports(import_graph()) == []


def test_no_pipeline_step_imports_the_flow_or_what_calls_it() -> None:
    graph = import_graph()
    above = ("mcp_endpoint.pipeline.flow", "mcp_endpoint.handlers", "mcp_endpoint.dispatcher", "mcp_endpoint.consumers", "mcp_endpoint.routing")
    steps = [name for name in graph if name.startswith("mcp_endpoint.pipeline.") and name != "mcp_endpoint.pipeline.flow"]
    assert len(steps) >= 5
    assert [(step, target) for step in steps for target in graph[step] if target.startswith(above)] == []


def test_the_checks_see_what_they_look_for() -> None:
    """The graph checks can fail: a made-up cycle, an upward import and a lazy import are all found."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert upward_imports({"identity.consent": {"mcp_endpoint.handlers"}}) == [
        "identity.consent (domain) imports mcp_endpoint.handlers (endpoint)"
    ]
    assert layer_of("federation.upstream.base") == "upstream"
    assert layer_of("fedmcp_lib.caching") == "library"
    assert upward_imports({"fedmcp_lib.metrics": {"identity.models"}}) == ["fedmcp_lib.metrics (library) imports identity.models (domain)"]
    assert layer_of("federation.upstream_oauth") == "domain"  # a name that starts like a layer's is not in it
    modules = product_modules()
    lazy = set(imports_of("federation.upkeep", modules["federation.upkeep"], modules))
    assert "federation.services" in lazy
    assert "mcp_endpoint.pipeline.decide" in import_graph()["mcp_endpoint.pipeline.flow"]
