"""`make bench`: direct-to-upstream against through-fedmcp, in one run, on this machine.

What it measures (every figure next to its direct counterpart where one exists):

1. tools/call `echo` over a warm session, per host transport: Streamable HTTP in both eras,
   WebSocket and HTTP+SSE. Sequential latency (p50/p99) with one host, and throughput with
   `--concurrency` hosts. The upstream is `bench.fast_upstream` (raw asyncio, both eras); the
   gateway reaches it over Streamable HTTP. Rows for the gateway's WebSocket and SSE *upstream*
   connections, and one against the SDK-based fixture server (a realistic upstream).
   Two ceiling rows for the same calls with fedmcp's code left out (bench/reference.py): daphne
   answering like the upstream, and a raw asyncio pass-through proxy.
2. A py-spy profile of the gateway worker during a throughput run (when py-spy is installed).
3. tools/list: 100 tools direct against /peers/<p>/mcp, and /mcp over 100 peers x 100 tools.
4. Memory of one worker holding 10,000 idle WebSocket sessions.
5. One worker against two on PostgreSQL + Redis (no session affinity).

Everything listens on 127.0.0.1, every process is stopped at the end, every wait is bounded.
The gateway runs with its health and refresh loops off (FEDERATION_HEALTH_INTERVAL=0,
FEDERATION_REFRESH_INTERVAL=0) and log level WARNING; tokens are required (no anonymous mode).

Results go to bench/results/<date>-<name>.json and .md; `--docs` also rewrites the generated
table in docs/PERFORMANCE.md.

    .venv/bin/python -m bench.run [--quick] [--docs] [--skip pg,idle,...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from bench.loadgen import HttpLegacyClient
from tests.e2e.harness import Gateway, fixture_server, free_port, stop, wait_http

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "PERFORMANCE.md"
DOC_BEGIN, DOC_END = "<!-- bench:begin -->", "<!-- bench:end -->"
PG_ADMIN = os.environ.get("FEDMCP_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("FEDMCP_BENCH_REDIS", "redis://127.0.0.1:6379/0")
MODERN = "2026-07-28"
JsonDict = dict[str, Any]

GATEWAY_ENV = {
    "FEDERATION_HEALTH_INTERVAL": "0",
    "FEDERATION_REFRESH_INTERVAL": "0",
    "FEDMCP_LOG_LEVEL": "WARNING",
    "FEDERATION_ALLOW_LOOPBACK": "True",
    # One bench user holds 10,000 idle WebSockets (phase 4): no per-user bound on sessions.
    "FEDMCP_MAX_SESSIONS_PER_USER": "0",
}
STARTED = time.monotonic()


def log(text: str) -> None:
    sys.stderr.write(f"[bench {time.monotonic() - STARTED:6.1f}s] {text}\n")
    sys.stderr.flush()


# --- the machine ---------------------------------------------------------------------------------


def machine() -> JsonDict:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    free = subprocess.run(["free", "-h"], capture_output=True, text=True).stdout.strip()
    total = next((line.split()[1] for line in free.splitlines() if line.startswith("Mem:")), "")
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory": total,
        "free_h": free,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
        "cpu_pressure_avg60_start": cpu_pressure(),
    }


def cpu_pressure() -> float | None:
    """The share of time some runnable task waited for a CPU over the last 60 s (Linux PSI)."""
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    return float(dict(part.split("=") for part in first.split()[1:])["avg60"])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# --- load generators -----------------------------------------------------------------------------


def loadgen(spec: JsonDict, timeout: float = 300) -> JsonDict:
    result = subprocess.run([PY, "-m", "bench.loadgen", json.dumps(spec)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"loadgen failed ({result.returncode}) for {spec.get('url')}:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def wrk(url: str, body: JsonDict, headers: dict[str, str], *, concurrency: int, duration: float) -> JsonDict | None:
    """Run wrk (C, one thread) against one URL; None when wrk is not installed."""
    binary = shutil.which("wrk")
    if binary is None:
        return None
    env = {**os.environ, "BENCH_BODY": json.dumps(body), "BENCH_HEADERS": "\n".join(f"{k}: {v}" for k, v in headers.items())}
    # One warm-up second that is not counted, then the measured run.
    subprocess.run(
        [binary, "-t1", f"-c{concurrency}", "-d1s", "-s", str(ROOT / "bench" / "mcp_post.lua"), url],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    result = subprocess.run(
        [binary, "-t1", f"-c{concurrency}", f"-d{duration:g}s", "--timeout", "10s", "-s", str(ROOT / "bench" / "mcp_post.lua"), url],
        env=env,
        capture_output=True,
        text=True,
        timeout=duration + 60,
    )
    line = next((x for x in result.stdout.splitlines() if x.startswith("BENCH {")), None)
    if line is None:
        raise RuntimeError(f"wrk produced no summary:\n{result.stdout}\n{result.stderr}")
    data = json.loads(line[6:])
    data["calls_per_s"] = round(data["requests"] / data["seconds"], 1)
    errors = next((x for x in result.stdout.splitlines() if x.startswith("BENCH-ERRORS")), None)
    if errors:
        data["first_errors"] = errors[13:300]
    return data


def legacy_session(url: str, token: str | None) -> str:
    """Open a handshake-era session (for wrk, which cannot initialize) and return its id."""

    async def run() -> str:
        client = HttpLegacyClient({"url": url, "token": token})
        await client.start()
        session = client.headers["mcp-session-id"]
        client.conn.close()
        return session

    return asyncio.run(run())


# --- processes -----------------------------------------------------------------------------------


UPSTREAM_PIDS: dict[str, int] = {}
"""Base URL -> pid of each running fast upstream (for its CPU time)."""


@contextlib.contextmanager
def fast_upstream(extra_tools: int = 0) -> Iterator[str]:
    """Run bench.fast_upstream; yields its base URL (http://127.0.0.1:<port>)."""
    port = free_port()
    process = subprocess.Popen(
        [PY, "-m", "bench.fast_upstream", "--port", str(port), "--tools", str(extra_tools)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/mcp", process=process)
        UPSTREAM_PIDS[base] = process.pid
        yield base
    finally:
        UPSTREAM_PIDS.pop(base, None)
        stop(process)


class BenchGateway(Gateway):
    def __init__(self, name: str, *, database_url: str | None = None, env: dict[str, str] | None = None) -> None:
        super().__init__(name=name, env={**GATEWAY_ENV, **(env or {})}, database_url=database_url)
        self.bearer = ""

    def setup(self, peers: list[tuple[str, str, str]]) -> None:
        """Migrate, then register the peers and mint the token in parallel (each is one manage.py)."""
        self.migrate()
        commands = [["peer", "add", name, "--url", url, "--transport", transport] for name, transport, url in peers]
        commands.append(["token", "--user", "bench", "--create-user", "--resource", self.public_url, "--expires", "12h"])
        running = [
            subprocess.Popen([PY, "manage.py", *c], cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for c in commands
        ]
        for command, process in zip(commands, running, strict=True):
            out, err = process.communicate(timeout=180)
            if process.returncode != 0:
                raise RuntimeError(f"manage.py {' '.join(command)} failed:\n{out}\n{err}")
        self.bearer = out.strip().splitlines()[-1]

    def pid(self, worker: int = 0) -> int:
        return self.workers[worker][0].pid


# --- phase 1: tools/call per transport -------------------------------------------------------------


def call_body(tool: str, arguments: JsonDict, modern: bool) -> JsonDict:
    params: JsonDict = {"name": tool, "arguments": arguments}
    if modern:
        params["_meta"] = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}
    return {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}


def wrk_headers(transport: str, tool: str, session: str | None, token: str | None) -> dict[str, str]:
    headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
    if transport == "http-modern":
        headers.update({"mcp-protocol-version": MODERN, "mcp-method": "tools/call", "mcp-name": tool})
    else:
        headers.update({"mcp-protocol-version": "2025-11-25", "mcp-session-id": session or ""})
    if token:
        headers["authorization"] = f"Bearer {token}"
    return headers


def measure_side(side: JsonDict, opts: argparse.Namespace, transport: str, arguments: JsonDict, pid: int | None, n: int) -> JsonDict:
    spec = {"transport": transport, "url": side["url"], "token": side.get("token"), "tool": side["tool"], "arguments": arguments}
    out: JsonDict = {"url": side["url"], "tool": side["tool"]}
    cpu0 = cpu_seconds(pid) if pid else 0.0
    out["latency"] = loadgen({**spec, "mode": "latency", "n": n, "warmup": opts.warmup})
    if pid:
        # CPU time the serving process spent per call (warm-up included): unlike wall-clock
        # latency, it does not grow when other processes compete for the CPUs.
        out["latency"]["server_cpu_ms_per_call"] = round((cpu_seconds(pid) - cpu0) * 1000 / (n + opts.warmup + 2), 3)
    out["latency"]["cpu_pressure_avg60"] = cpu_pressure()
    cpu0, wall0 = (cpu_seconds(pid) if pid else 0.0), time.monotonic()
    out["throughput"] = loadgen({**spec, "mode": "throughput", "concurrency": opts.concurrency, "duration": opts.duration})
    if pid:
        # Cores the server used over the whole loadgen run (start-up and warm-up included).
        out["throughput"]["server_cores"] = round((cpu_seconds(pid) - cpu0) / (time.monotonic() - wall0), 2)
    if transport.startswith("http") and not opts.no_wrk:
        session = legacy_session(side["url"], side.get("token")) if transport == "http-legacy" else None
        out["wrk"] = wrk(
            side["url"],
            call_body(side["tool"], arguments, transport == "http-modern"),
            wrk_headers(transport, side["tool"], session, side.get("token")),
            concurrency=opts.concurrency,
            duration=opts.duration,
        )
    return out


def upstream_pid(url: str) -> int | None:
    parts = urlsplit(url)
    return UPSTREAM_PIDS.get(f"http://{parts.hostname}:{parts.port}")


def compare(row: JsonDict) -> JsonDict:
    """Add the figures the bar is stated in: added latency and the throughput ratio."""
    direct, gateway = row["direct"], row["gateway"]
    added_p50 = round(gateway["latency"]["p50_ms"] - direct["latency"]["p50_ms"], 3)
    added_p99 = round(gateway["latency"]["p99_ms"] - direct["latency"]["p99_ms"], 3)
    primary = "wrk" if direct.get("wrk") and gateway.get("wrk") else "throughput"
    ratio = round(gateway[primary]["calls_per_s"] / direct[primary]["calls_per_s"], 3) if direct[primary]["calls_per_s"] else None
    row["summary"] = {
        "added_p50_ms": added_p50,
        "added_p99_ms": added_p99,
        "throughput_by": "wrk" if primary == "wrk" else "bench.loadgen",
        "direct_calls_per_s": direct[primary]["calls_per_s"],
        "gateway_calls_per_s": gateway[primary]["calls_per_s"],
        "throughput_ratio": ratio,
        "direct_cpu_ms_per_call": direct["latency"].get("server_cpu_ms_per_call"),
        "gateway_cpu_ms_per_call": gateway["latency"].get("server_cpu_ms_per_call"),
        "meets_p50": added_p50 <= 1.0,
        "meets_p99": added_p99 <= 5.0,
        "meets_throughput": ratio is not None and ratio >= 0.8,
    }
    return row


def phase_transports(opts: argparse.Namespace, gw: BenchGateway, up: str, sdk: str | None) -> list[JsonDict]:
    host = gw.url("")
    ws_host = gw.ws_url("")
    ws_up = up.replace("http://", "ws://")
    token = gw.bearer
    echo = {"message": "hello"}
    rows = [
        ("Streamable HTTP 2025-11-25 (sessions)", "http-legacy", f"{up}/mcp", "echo", f"{host}/mcp", "fast__echo", echo, "Streamable HTTP"),
        (
            "Streamable HTTP 2026-07-28 (stateless)",
            "http-modern",
            f"{up}/mcp",
            "echo",
            f"{host}/mcp",
            "fast__echo",
            echo,
            "Streamable HTTP",
        ),
        ("WebSocket (host side)", "ws", f"{ws_up}/ws", "echo", f"{ws_host}/ws", "fast__echo", echo, "Streamable HTTP"),
        ("HTTP+SSE 2024-11-05 (host side)", "sse", f"{up}/sse", "echo", f"{host}/sse", "fast__echo", echo, "Streamable HTTP"),
        ("WebSocket upstream (host: Streamable HTTP)", "ws", f"{ws_up}/ws", "echo", f"{host}/mcp", "fast-ws__echo", echo, "WebSocket"),
        ("HTTP+SSE upstream (host: Streamable HTTP)", "sse", f"{up}/sse", "echo", f"{host}/mcp", "fast-sse__echo", echo, "HTTP+SSE"),
    ]
    if sdk:
        rows.append(
            (
                "SDK fixture upstream (everything_server)",
                "http-legacy",
                sdk,
                "add",
                f"{host}/mcp",
                "sdk__add",
                {"a": 1, "b": 2},
                "Streamable HTTP",
            )
        )
    results = []
    for label, transport, direct_url, direct_tool, gw_url, gw_tool, arguments, upstream_leg in rows:
        if opts.only and not any(word in label for word in opts.only):
            continue
        # The gateway side of rows whose upstream leg is WS/SSE is a Streamable HTTP host.
        gw_transport = "http-legacy" if upstream_leg != "Streamable HTTP" else transport
        log(f"tools/call: {label}")
        row: JsonDict = {"label": label, "host_transport": gw_transport, "upstream_leg": upstream_leg, "direct_transport": transport}
        # The SDK fixture is slow; fewer sequential calls keep the run inside its time budget.
        n = min(opts.n, 300) if direct_tool == "add" else opts.n
        row["direct"] = measure_side({"url": direct_url, "tool": direct_tool}, opts, transport, arguments, upstream_pid(direct_url), n)
        row["gateway"] = measure_side({"url": gw_url, "tool": gw_tool, "token": token}, opts, gw_transport, arguments, gw.pid(), n)
        if upstream_leg != "Streamable HTTP":
            row["gateway"].pop("wrk", None)
        results.append(compare(row))
        s = row["summary"]
        log(
            f"  p50 +{s['added_p50_ms']} ms, p99 +{s['added_p99_ms']} ms, "
            f"{s['gateway_calls_per_s']}/{s['direct_calls_per_s']} calls/s = {s['throughput_ratio']}"
        )
    return results


# --- phase 1b: what is reachable at all ---------------------------------------------------------------


@contextlib.contextmanager
def reference_server(command: list[str], probe: str) -> Iterator[tuple[str, int]]:
    """Run one of bench/reference.py's servers; yields (base URL, pid)."""
    port = free_port()
    argv = [part.replace("{port}", str(port)) for part in command]
    process = subprocess.Popen(
        argv, cwd=ROOT, env={**os.environ, **GATEWAY_ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}{probe}", process=process)
        yield base, process.pid
    finally:
        stop(process)


def phase_ceiling(opts: argparse.Namespace, up: str, transports: list[JsonDict]) -> JsonDict:
    """The first row's calls (Streamable HTTP 2025-11-25, `echo`) against two servers without fedmcp's code.

    daphne serving the fast upstream's own answers is the most any application on the gateway's
    server can serve; a raw asyncio pass-through proxy in front of the fast upstream is the most
    a Python proxy can serve. Their ratios to direct bound what the gateway's can be.
    """
    echo = {"message": "hello"}
    direct = next((r["direct"] for r in transports if r["label"].startswith("Streamable HTTP 2025-11-25")), None)
    if direct is None:
        log("ceiling: the upstream directly")
        direct = measure_side({"url": f"{up}/mcp", "tool": "echo"}, opts, "http-legacy", echo, upstream_pid(f"{up}/mcp"), opts.n)
    daphne = str(Path(PY).parent / "daphne")
    servers = [
        ("daphne, no fedmcp code (answers like the upstream)", [daphne, "-b", "127.0.0.1", "-p", "{port}", "bench.reference:application"]),
        ("raw asyncio pass-through proxy to the upstream", [PY, "-m", "bench.reference", "--proxy", "--port", "{port}", "--upstream", up]),
    ]
    rows = []
    for label, command in servers:
        log(f"ceiling: {label}")
        with reference_server(command, "/mcp") as (base, pid):
            side = measure_side({"url": f"{base}/mcp", "tool": "echo"}, opts, "http-legacy", echo, pid, opts.n)
        rows.append(compare({"label": label, "direct": direct, "gateway": side}))
        s = rows[-1]["summary"]
        log(f"  p50 +{s['added_p50_ms']} ms, {s['gateway_calls_per_s']}/{s['direct_calls_per_s']} calls/s = {s['throughput_ratio']}")
    return {"rows": rows}


# --- phase 2: the profile ----------------------------------------------------------------------------


def phase_profile(opts: argparse.Namespace, gw: BenchGateway, stamp: str) -> JsonDict | None:
    spy = shutil.which("py-spy") or (str(Path(PY).parent / "py-spy") if (Path(PY).parent / "py-spy").exists() else None)
    if spy is None:
        log("profile: py-spy not installed, skipped (pip install py-spy)")
        return None
    log("profile: py-spy on the worker during a Streamable HTTP throughput run")
    raw = Path(tempfile.mkdtemp(prefix="fedmcp-bench-")) / "profile.txt"
    seconds = max(4, int(opts.duration))
    spy_proc = subprocess.Popen(
        [spy, "record", "--pid", str(gw.pid()), "--duration", str(seconds + 2), "--rate", "250", "--format", "raw", "--output", str(raw)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        loadgen(
            {
                "transport": "http-legacy",
                "url": gw.url("/mcp"),
                "token": gw.bearer,
                "tool": "fast__echo",
                "mode": "throughput",
                "concurrency": opts.concurrency,
                "duration": seconds,
                "warmup_seconds": 0.5,
            }
        )
        _, err = spy_proc.communicate(timeout=60)
    finally:
        if spy_proc.poll() is None:
            spy_proc.kill()
            spy_proc.wait()
    if not raw.exists():
        log(f"profile: py-spy failed: {err[-500:] if err else ''}")
        return {"error": (err or "")[-500:]}
    profile = summarize_profile(raw.read_text())
    # Large (~1 MB): kept out of bench/results/, under build/ (`make clean` removes it).
    kept = ROOT / "build" / "bench" / f"{stamp}-profile-collapsed.txt"
    kept.parent.mkdir(parents=True, exist_ok=True)
    # The busy stacks with short frame names, for flame graphs (inferno-flamegraph, speedscope).
    kept.write_text(compact_stacks(raw.read_text()))
    profile["collapsed_stacks"] = str(kept.relative_to(ROOT))
    shutil.rmtree(raw.parent, ignore_errors=True)
    return profile


IDLE_FRAMES = frozenset(
    {
        "EpollSelector.select (selectors.py)",
        "_worker (concurrent/futures/thread.py)",
        "Condition.wait (threading.py)",
        "Thread._wait_for_tstate_lock (threading.py)",
    }
)
FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^)]*?)(?::\d+)?\)$")


def _short(frame: str) -> str:
    match = FRAME.match(frame)
    if not match:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match['func']} ({path})"


def compact_stacks(text: str) -> str:
    """Return py-spy's collapsed stacks without idle samples, frames shortened, merged."""
    stacks: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = [_short(f) for f in stack.split(";")]
        if frames[-1] not in IDLE_FRAMES:
            stacks[";".join(frames)] += int(count_text)
    return "".join(f"{stack} {count}\n" for stack, count in sorted(stacks.items()))


def summarize_profile(text: str) -> JsonDict:
    """Top functions by own time and by inclusive time from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    hops: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    idle = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";")]
        if frames[-1] in IDLE_FRAMES:
            # A thread waiting for work (the event loop in select, an executor thread on its queue).
            idle += count
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
        areas[_area(frames)] += count
        for index, frame in enumerate(frames[:-1]):
            if frame.startswith("SyncToAsync.__call__.<locals>.func.<locals>.run_child"):
                # The function handed to database_sync_to_async: which queries cost what.
                hops[re.sub(r":\d+\)$", ")", frames[index + 1])] += count
                break

    def top(counter: Counter[str], n: int) -> list[JsonDict]:
        return [{"function": k, "share": round(v / total, 3)} for k, v in counter.most_common(n)]

    return {
        "samples": total,
        "idle_samples": idle,
        "top_own": top(own, 25),
        "top_inclusive": top(inclusive, 60),
        "db_hops": top(hops, 10),
        "by_area": [{"area": k, "share": round(v / total, 3)} for k, v in areas.most_common()],
    }


AREAS = (
    ("sqlite3/psycopg (database driver)", ("sqlite3", "psycopg")),
    ("Django ORM", ("django/db/",)),
    ("database_sync_to_async / thread hand-off", ("asgiref/", "concurrent/futures", "threading.py", "_write_to_self", "_read_from_self")),
    ("httpx/httpcore (upstream client)", ("httpx/", "httpcore/", "h11/", "anyio/")),
    ("pydantic validation (mcp-types)", ("pydantic", "mcp_types/")),
    ("Twisted/daphne (HTTP server)", ("twisted/", "daphne/", "autobahn/")),
    ("channels consumers", ("channels/",)),
    ("fedmcp code", ("mcp_endpoint/", "federation/", "identity/")),
    ("json", ("json/",)),
    ("asyncio event loop", ("asyncio/", "selectors.py")),
)


def _area(frames: list[str]) -> str:
    # Attribute a sample to the innermost frame that belongs to a known area.
    for frame in reversed(frames):
        for name, markers in AREAS:
            if any(m in frame for m in markers):
                return name
    return "other"


# --- phase 3: tools/list over 100 peers x 100 tools --------------------------------------------------

SEED = """
import django, json, sys
django.setup()
from django.utils import timezone
from federation.models import CatalogEntry
from federation.models import CatalogKind
from federation.models import Peer
from federation.naming import qualify_name
peers, tools_per_peer, url = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
tools = [{"name": f"tool-{i}", "description": f"Benchmark tool number {i}: echoes its message.",
          "inputSchema": {"type": "object", "properties": {"message": {"type": "string"}}, "required": ["message"]}}
         for i in range(tools_per_peer)]
now = timezone.now()
made = Peer.objects.bulk_create([Peer(name=f"bench-{p:03d}", transport="streamable-http", url=url, capabilities={"tools": {}},
                                      protocol_version="2025-11-25", last_synced_at=now) for p in range(peers)])
made = list(Peer.objects.filter(name__startswith="bench-"))
CatalogEntry.objects.bulk_create([
    CatalogEntry(peer=peer, kind=CatalogKind.TOOL, upstream_name=t["name"], name=qualify_name(peer.name, t["name"]),
                 home=peer.name, position=i, payload=t)
    for peer in made for i, t in enumerate(tools)], batch_size=1000)
print(CatalogEntry.objects.filter(peer__name__startswith="bench-").count())
"""


def phase_lists(opts: argparse.Namespace, gw: BenchGateway) -> JsonDict:
    peers, per_peer = opts.peers, opts.tools_per_peer
    log(f"tools/list: seeding {peers} peers x {per_peer} tools straight into the catalog tables")
    with fast_upstream(extra_tools=per_peer) as up:
        started = time.monotonic()
        seeded = subprocess.run(
            [PY, "-c", SEED, str(peers), str(per_peer), f"{up}/mcp"], cwd=ROOT, env=gw.env, capture_output=True, text=True, timeout=300
        )
        if seeded.returncode != 0:
            raise RuntimeError(f"seeding failed:\n{seeded.stderr[-3000:]}")
        seed_seconds = round(time.monotonic() - started, 1)
        common = {"transport": "http-legacy", "mode": "latency", "method": "tools/list", "params": {}, "warmup": 20}
        # The fast upstream lists echo, add and tool-0 … tool-<n-1>; the same 100 tools are compared.
        direct = loadgen({**common, "url": f"{up}/mcp", "n": 300})
        per_peer_endpoint = loadgen({**common, "url": gw.url("/peers/bench-000/mcp"), "token": gw.bearer, "n": 300})
        log("tools/list: paging the aggregated list")
        aggregated = loadgen({"transport": "http-legacy", "mode": "list", "url": gw.url("/mcp"), "token": gw.bearer, "n": opts.list_rounds})
        first_page = loadgen({**common, "url": gw.url("/mcp"), "token": gw.bearer, "n": 20, "warmup": 3})
    return {
        "peers": peers,
        "tools_per_peer": per_peer,
        "seeded_rows": int(seeded.stdout.strip().splitlines()[-1]),
        "seed_seconds": seed_seconds,
        "direct_one_upstream": {"tools": per_peer + 2, **direct},
        "per_peer_endpoint": {"tools": per_peer, **per_peer_endpoint},
        "aggregated": aggregated,
        "aggregated_first_page": first_page,
    }


# --- phase 4: idle WebSocket sessions ----------------------------------------------------------------


def phase_idle(opts: argparse.Namespace, gw: BenchGateway) -> JsonDict:
    count = opts.idle_ws
    port = gw.start_worker()
    worker = len(gw.workers) - 1
    pid = gw.pid(worker)
    url = f"ws://127.0.0.1:{port}/ws"
    log(f"idle WebSocket: warming worker {pid}, then opening {count} sessions")
    # Warm the worker's code paths with a few sessions so the baseline is not import cost.
    loadgen({"transport": "ws", "url": url, "token": gw.bearer, "tool": "fast__echo", "mode": "latency", "n": 50, "warmup": 10})
    time.sleep(1.0)
    before = rss_mb(pid)
    spec = {"mode": "idle-ws", "url": url, "token": gw.bearer, "count": count, "deadline": opts.idle_seconds}
    holder = subprocess.Popen(
        [PY, "-m", "bench.loadgen", json.dumps(spec)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = holder.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"idle-ws holder failed: {holder.stderr.read()[-2000:]}")  # type: ignore[union-attr]
        report = json.loads(line)
        time.sleep(2.0)
        after = rss_mb(pid)
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        cpu0 = cpu_seconds(pid)
        time.sleep(5.0)
        idle_cores = round((cpu_seconds(pid) - cpu0) / 5.0, 3)
        # What a call costs on a worker that holds all those sessions.
        busy = loadgen(
            {
                "transport": "http-legacy",
                "url": f"http://127.0.0.1:{port}/mcp",
                "token": gw.bearer,
                "tool": "fast__echo",
                "mode": "latency",
                "n": 300,
                "warmup": 30,
            }
        )
    finally:
        with contextlib.suppress(Exception):
            holder.stdin.close()  # type: ignore[union-attr]
        try:
            holder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
        # The worker would now close 10,000 sessions; it is not needed any more.
        stop(gw.workers.pop(worker)[0])
    opened = report["open"]
    return {
        "sessions": opened,
        "requested": count,
        "failed": report["failed"],
        "failures": report["failures"],
        "connect_seconds": report["connect_seconds"],
        "worker_fds": fds,
        "idle_worker_cores": idle_cores,
        "call_latency_while_held": busy,
        "rss_before_mb": round(before, 1),
        "rss_after_mb": round(after, 1),
        "mb_per_1k_sessions": round((after - before) / opened * 1000, 2) if opened else None,
        "kb_per_session": round((after - before) * 1024 / opened, 1) if opened else None,
    }


# --- phase 5: PostgreSQL + Redis, one worker and two ------------------------------------------------


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    import psycopg
    from psycopg import sql

    name = f"fedmcp_bench_{secrets.token_hex(5)}"
    admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    try:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        parts = urlsplit(PG_ADMIN)
        yield urlunsplit(("postgres", parts.netloc, f"/{name}", "", ""))
    finally:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.close()


def redis_cleanup(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def phase_scale_out(opts: argparse.Namespace, up: str) -> JsonDict:
    prefix = f"fedmcp-bench-{secrets.token_hex(5)}"
    out: JsonDict = {"conn_max_age": "default" if opts.pg_conn_max_age is None else opts.pg_conn_max_age}
    with postgres_database() as database_url:
        gw = BenchGateway(
            "bench-pg",
            database_url=database_url,
            env={
                "REDIS_URL": REDIS_URL,
                "FEDMCP_REDIS_PREFIX": prefix,
                **({"FEDMCP_DB_CONN_MAX_AGE": str(opts.pg_conn_max_age)} if opts.pg_conn_max_age is not None else {}),
            },
        )
        try:
            log("PostgreSQL + Redis: migrating a fresh database")
            gw.setup([("fast", "streamable-http", f"{up}/mcp")])
            gw.start_worker()
            gw.start_worker()
            spec = {"transport": "http-legacy", "token": gw.bearer, "tool": "fast__echo", "arguments": {"message": "hello"}}
            out["latency_one_worker"] = loadgen({**spec, "url": gw.url("/mcp", 0), "mode": "latency", "n": opts.n, "warmup": opts.warmup})
            for workers in (1, 2):
                urls = [gw.url("/mcp", w) for w in range(workers)]
                log(f"PostgreSQL + Redis: throughput with {workers} worker(s)")
                cpu0 = [cpu_seconds(gw.pid(w)) for w in range(2)]
                result = loadgen(
                    {**spec, "url": urls[0], "urls": urls, "mode": "throughput", "concurrency": opts.concurrency, "duration": opts.duration}
                )
                result["worker_cpu_seconds"] = [round(cpu_seconds(gw.pid(w)) - cpu0[w], 2) for w in range(2)]
                out[f"throughput_{workers}_workers"] = result
            # For reference: the default FEDMCP_DB_CONN_MAX_AGE=0 opens a PostgreSQL connection per query.
            gw.env["FEDMCP_DB_CONN_MAX_AGE"] = "0"
            gw.start_worker()
            log("PostgreSQL + Redis: latency with FEDMCP_DB_CONN_MAX_AGE=0")
            out["latency_conn_max_age_0"] = loadgen(
                {**spec, "url": gw.url("/mcp", 2), "mode": "latency", "n": min(opts.n, 500), "warmup": min(opts.warmup, 50)}
            )
            one, two = out["throughput_1_workers"]["calls_per_s"], out["throughput_2_workers"]["calls_per_s"]
            out["speedup_2_over_1"] = round(two / one, 2) if one else None
        finally:
            gw.cleanup()
            redis_cleanup(prefix)
    return out


# --- the report -------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(results: JsonDict) -> str:
    m = results["machine"]
    lines = [
        f"Run **{results['name']}** on {results['date']} — {m['nproc']} CPUs ({m['cpu']}), {m['memory']} RAM, "
        f"Linux {m['kernel']}, Python {m['python']}; load average at start {', '.join(f'{x:.2f}' for x in m['loadavg_start'])}, "
        f"at end {', '.join(f'{x:.2f}' for x in results.get('loadavg_end', []))}; CPU pressure (PSI some avg60) "
        f"{fmt(m.get('cpu_pressure_avg60_start'))}% at start, {fmt(results.get('cpu_pressure_avg60_end'))}% at end. "
        f"{results['config']['concurrency']} concurrent hosts for {results['config']['duration']:g} s per throughput run; "
        f"{results['config']['n']} sequential calls per latency run. Raw data: `{results['file']}`.",
        "",
    ]
    if results.get("transports"):
        lines += [
            "### tools/call over a warm session",
            "",
            "| Host transport → gateway → upstream | direct p50 / p99 ms | gateway p50 / p99 ms | added p50 / p99 ms | direct calls/s | "
            "gateway calls/s | ratio | by |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
    for row in results.get("transports", []):
        d, g, s = row["direct"]["latency"], row["gateway"]["latency"], row["summary"]
        label = f"{row['label']}: {row['host_transport']} → {row['upstream_leg']}"
        lines.append(
            f"| {label} | {fmt(d['p50_ms'])} / {fmt(d['p99_ms'])} | {fmt(g['p50_ms'])} / {fmt(g['p99_ms'])} | "
            f"{fmt(s['added_p50_ms'])} / {fmt(s['added_p99_ms'])} | {fmt(s['direct_calls_per_s'], 0)} | "
            f"{fmt(s['gateway_calls_per_s'], 0)} | {fmt(s['throughput_ratio'], 3)} | {s['throughput_by']} |"
        )
    if results.get("transports"):
        lines += [
            "",
            "Throughput by both load generators (calls/s; `bench.loadgen` is Python, `wrk` is C):",
            "",
            "| Row | direct loadgen | gateway loadgen | direct wrk | gateway wrk | upstream / gateway cores used | "
            "upstream / gateway CPU ms per call |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in results["transports"]:
            d, g = row["direct"], row["gateway"]
            lines.append(
                f"| {row['label']} | {fmt(d['throughput']['calls_per_s'], 0)} | {fmt(g['throughput']['calls_per_s'], 0)} | "
                f"{fmt((d.get('wrk') or {}).get('calls_per_s'), 0)} | {fmt((g.get('wrk') or {}).get('calls_per_s'), 0)} | "
                f"{fmt(d['throughput'].get('server_cores'))} / {fmt(g['throughput'].get('server_cores'))} | "
                f"{fmt(d['latency'].get('server_cpu_ms_per_call'), 3)} / {fmt(g['latency'].get('server_cpu_ms_per_call'), 3)} |"
            )
    ceiling = results.get("ceiling")
    if ceiling and ceiling.get("rows"):
        first = ceiling["rows"][0]["direct"]
        gateway_row = next((r for r in results.get("transports", []) if r["label"].startswith("Streamable HTTP 2025-11-25")), None)
        lines += [
            "",
            "### What is reachable at all (Streamable HTTP 2025-11-25 tools/call, fedmcp's code left out)",
            "",
            "| Server | p50 / p99 ms | calls/s | ratio to direct | by | CPU ms per call |",
            "| --- | --- | --- | --- | --- | --- |",
            _ceiling_row("the fast upstream, directly", first, "1", "wrk" if first.get("wrk") else "bench.loadgen"),
        ]
        for row in ceiling["rows"]:
            s = row["summary"]
            lines.append(_ceiling_row(row["label"], row["gateway"], fmt(s["throughput_ratio"], 3), s["throughput_by"]))
        if gateway_row:
            s = gateway_row["summary"]
            lines.append(_ceiling_row("fedmcp gateway (the first row above)", gateway_row["gateway"], fmt(s["throughput_ratio"], 3), s["throughput_by"]))
    lists = results.get("lists")
    if lists and "skipped" not in lists:
        direct, per_peer, everything = lists["direct_one_upstream"], lists["per_peer_endpoint"], lists["aggregated"]
        lines += [
            "",
            "### tools/list",
            "",
            "| What | p50 ms | p99 ms | ratio to direct (p50) |",
            "| --- | --- | --- | --- |",
            _list_row(f"direct: one upstream listing {direct['tools']} tools", direct, "1"),
            _list_row(
                f"gateway /peers/bench-000/mcp ({lists['tools_per_peer']} tools)",
                per_peer,
                f"{fmt(per_peer['p50_ms'] / direct['p50_ms'], 1)}×",
            ),
            _list_row(
                f"gateway /mcp, first page of {everything['tools']} tools ({lists['peers']} peers × {lists['tools_per_peer']})",
                lists["aggregated_first_page"],
                "–",
            ),
            _list_row(f"gateway /mcp, all {everything['pages']} pages ({everything['tools']} tools)", everything["full_list"], "–"),
        ]
    idle = results.get("idle_ws")
    if idle and "skipped" not in idle:
        lines += [
            "",
            "### Idle WebSocket sessions, one worker",
            "",
            f"{idle['sessions']} of {idle['requested']} sessions opened within the time allowed.",
            "",
            "| Sessions | failed | connect time s | RSS before MB | RSS after MB | MB per 1k sessions | KB per session | "
            "worker CPU while idle (cores) | tools/call p50 / p99 ms meanwhile |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            f"| {idle['sessions']} | {idle['failed']} | {fmt(idle['connect_seconds'], 1)} | {fmt(idle['rss_before_mb'], 1)} | "
            f"{fmt(idle['rss_after_mb'], 1)} | {fmt(idle['mb_per_1k_sessions'])} | {fmt(idle['kb_per_session'], 1)} | "
            f"{fmt(idle['idle_worker_cores'], 3)} | "
            f"{fmt(idle['call_latency_while_held']['p50_ms'])} / {fmt(idle['call_latency_while_held']['p99_ms'])} |",
        ]
    pg = results.get("scale_out")
    if pg and "throughput_1_workers" in pg:
        one, two = pg["throughput_1_workers"], pg["throughput_2_workers"]
        lat = pg["latency_one_worker"]
        lines += [
            "",
            f"### PostgreSQL + Redis (Streamable HTTP 2025-11-25, CONN_MAX_AGE={pg['conn_max_age']})",
            "",
            "| Workers | calls/s | p50 / p99 ms under load | worker CPU s (A, B) | sequential p50 / p99 ms |",
            "| --- | --- | --- | --- | --- |",
            f"| 1 | {fmt(one['calls_per_s'], 0)} | {fmt(one['under_load'].get('p50_ms'))} / {fmt(one['under_load'].get('p99_ms'))} | "
            f"{', '.join(fmt(x, 1) for x in one['worker_cpu_seconds'])} | {fmt(lat['p50_ms'])} / {fmt(lat['p99_ms'])} |",
            f"| 2 | {fmt(two['calls_per_s'], 0)} | {fmt(two['under_load'].get('p50_ms'))} / {fmt(two['under_load'].get('p99_ms'))} | "
            f"{', '.join(fmt(x, 1) for x in two['worker_cpu_seconds'])} | – |",
            "",
            f"Two workers give {fmt(pg['speedup_2_over_1'])}× the throughput of one. With FEDMCP_DB_CONN_MAX_AGE=0 "
            f"(a new PostgreSQL connection per query) one worker's sequential p50 / p99 is "
            f"{fmt(pg['latency_conn_max_age_0']['p50_ms'])} / {fmt(pg['latency_conn_max_age_0']['p99_ms'])} ms.",
        ]
    prof = results.get("profile")
    if prof and "by_area" in prof:
        lines += [
            "",
            f"### Where the worker's time goes (py-spy, {prof['samples']} samples, Streamable HTTP throughput run)",
            "",
            "| Area (innermost known frame) | share |",
            "| --- | --- |",
        ]
        lines += [f"| {a['area']} | {a['share'] * 100:.1f}% |" for a in prof["by_area"]]
    skipped = [k for k in ("lists", "idle_ws", "scale_out") if isinstance(results.get(k), dict) and "skipped" in results[k]]
    if skipped:
        lines += ["", f"Skipped to stay inside the time budget: {', '.join(skipped)}."]
    return "\n".join(lines) + "\n"


def _ceiling_row(what: str, side: JsonDict, ratio: str, by: str) -> str:
    primary = side.get("wrk") or side["throughput"]
    return (
        f"| {what} | {fmt(side['latency']['p50_ms'])} / {fmt(side['latency']['p99_ms'])} | {fmt(primary['calls_per_s'], 0)} | "
        f"{ratio} | {by} | {fmt(side['latency'].get('server_cpu_ms_per_call'), 3)} |"
    )


def _list_row(what: str, figures: JsonDict, ratio: str) -> str:
    return f"| {what} | {fmt(figures['p50_ms'])} | {fmt(figures['p99_ms'])} | {ratio} |"


def update_docs(table: str) -> None:
    text = DOC.read_text() if DOC.exists() else f"# Performance\n\n{DOC_BEGIN}\n{DOC_END}\n"
    if DOC_BEGIN not in text:
        text += f"\n{DOC_BEGIN}\n{DOC_END}\n"
    head, rest = text.split(DOC_BEGIN, 1)
    _, tail = rest.split(DOC_END, 1)
    DOC.write_text(f"{head}{DOC_BEGIN}\n{table}{DOC_END}{tail}")


# --- main -------------------------------------------------------------------------------------------


def _terminate(signum: int, frame: Any) -> None:
    # Unwind through the context managers, so every process this run started is stopped.
    raise SystemExit(128 + signum)


def main() -> None:
    parser = argparse.ArgumentParser(description="fedmcp benchmark: direct vs through the gateway")
    parser.add_argument("--name", default=socket.gethostname().split(".")[0] or "local")
    parser.add_argument("--n", type=int, default=1000, help="timed sequential calls per latency run")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per throughput run")
    parser.add_argument("--peers", type=int, default=100)
    parser.add_argument("--tools-per-peer", type=int, default=100)
    parser.add_argument("--list-rounds", type=int, default=2)
    parser.add_argument("--budget", type=float, default=560.0, help="seconds; phases that would not fit are skipped")
    parser.add_argument("--idle-seconds", type=float, default=150.0, help="time allowed for opening the idle WebSockets")
    parser.add_argument("--idle-ws", type=int, default=10_000)
    parser.add_argument(
        "--pg-conn-max-age",
        type=int,
        default=None,
        help="FEDMCP_DB_CONN_MAX_AGE for the PostgreSQL workers (default: the settings default)",
    )
    parser.add_argument("--skip", default="", help="comma-separated phases to skip: transports,sdk,ceiling,profile,lists,idle,pg")
    parser.add_argument("--only", default="", help="comma-separated words: run only transport rows whose label contains one")
    parser.add_argument("--no-wrk", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small numbers, for trying the harness")
    parser.add_argument("--docs", action="store_true", help="rewrite the generated section of docs/PERFORMANCE.md")
    opts = parser.parse_args()
    opts.skip = {s for s in opts.skip.split(",") if s}
    opts.only = [s for s in opts.only.split(",") if s]
    signal.signal(signal.SIGTERM, _terminate)
    if opts.quick:
        opts.n, opts.warmup, opts.duration, opts.idle_ws, opts.peers, opts.list_rounds = 300, 50, 3.0, 1000, 20, 2

    # Hold 10,000 sockets: the soft limit up to the hard one (children inherit it).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    RESULTS.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    stamp = f"{now:%Y-%m-%d}-{opts.name}"
    results: JsonDict = {
        "name": opts.name,
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "file": f"bench/results/{stamp}.json",
        "config": {
            "n": opts.n,
            "warmup": opts.warmup,
            "concurrency": opts.concurrency,
            "duration": opts.duration,
            "gateway_env": GATEWAY_ENV,
            "nofile": hard,
            "wrk": shutil.which("wrk") is not None and not opts.no_wrk,
            "server": "daphne (one process per worker), SQLite unless stated",
            "upstream": "bench.fast_upstream",
        },
    }
    log(f"machine: {results['machine']['nproc']} CPUs, {results['machine']['cpu']}, load {results['machine']['loadavg_start']}")
    with contextlib.ExitStack() as stack:
        up = stack.enter_context(fast_upstream())
        sdk = None if "sdk" in opts.skip else stack.enter_context(fixture_server(name="sdk"))
        gw = stack.enter_context(BenchGateway("bench"))
        log("gateway: migrate, register peers, mint a token")
        peers = [
            ("fast", "streamable-http", f"{up}/mcp"),
            ("fast-ws", "websocket", f"{up.replace('http://', 'ws://')}/ws"),
            ("fast-sse", "sse", f"{up}/sse"),
        ]
        if sdk:
            peers.append(("sdk", "streamable-http", sdk))
        gw.setup(peers)
        gw.start_worker()
        if "transports" not in opts.skip:
            results["transports"] = phase_transports(opts, gw, up, sdk)
        if "ceiling" not in opts.skip:
            results["ceiling"] = phase_ceiling(opts, up, results.get("transports", []))
        # Rough seconds each phase needs; one that would overrun the budget is skipped, and says so.
        phases = [
            ("profile", "profile", 15, lambda: phase_profile(opts, gw, stamp)),
            ("lists", "lists", 70, lambda: phase_lists(opts, gw)),
            ("idle_ws", "idle", opts.idle_seconds + 30, lambda: phase_idle(opts, gw)),
            ("scale_out", "pg", 90, lambda: phase_scale_out(opts, up)),
        ]
        for key, name, needs, run in phases:
            if name in opts.skip:
                continue
            if time.monotonic() - STARTED + needs > opts.budget:
                log(f"{key}: skipped, it would not finish inside the {opts.budget:g} s budget")
                results[key] = {"skipped": "time budget"}
                continue
            results[key] = run()
    results["loadavg_end"] = os.getloadavg()
    results["cpu_pressure_avg60_end"] = cpu_pressure()
    results["elapsed_seconds"] = round(time.monotonic() - STARTED, 1)
    (RESULTS / f"{stamp}.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (RESULTS / f"{stamp}.md").write_text(table)
    if opts.docs:
        update_docs(table)
    print(table)
    log(f"done in {results['elapsed_seconds']} s: {results['file']}")


if __name__ == "__main__":
    main()
