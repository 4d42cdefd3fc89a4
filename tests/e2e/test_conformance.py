"""The official MCP conformance suite: its server scenarios directly against the fixture server and
through the gateway, and its client scenarios with fedmcp as the client.

For each requirement set (`2025-11-25`, `2026-07-28`) the suite runs three times: against the
fixture server itself (the baseline: the fixture must be conformant for the gateway result to
mean anything), through the gateway's per-peer endpoint `/peers/fixture/mcp`, and through a
chain (a second gateway whose peer `chained` is the first one's `/peers/fixture/mcp`). Every scored
scenario must pass. Results land in `build/conformance/<target>-<requirements>/` (one folder
per scenario with its `checks.json`, plus the suite's console output and, for the gateway, the
worker log).

A run passes only if the suite exits 0 *and* no scored scenario has a failing check in its
`checks.json` *and* every scenario the requirement set scores actually ran. Which scenarios are
scored comes from the suite itself (`conformance list --requirements R --server`); extension and
pending scenarios (tasks-*, json-schema-2020-12, ...) are reported but not scored. The fixture
is held to more than the scored set: the pending and extension scenarios whose tools it provides
(`FIXTURE_EXTRAS`) must pass directly too, so a gateway run of them means something; the
gateway is held to the tasks extension's scenarios as well (`GATEWAY_EXTRAS`).

Client scenarios (every one the suite lists but auth/* and extensions, at each version of ours it
applies to): the suite serves the scenario and runs tests/e2e/conformance_client.py, which adds
that server as a peer of a real gateway and drives it through `/peers/<peer>/mcp` as a host; no
check may fail. Results in `build/conformance/client/<scenario>-<version>/`.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.auth_proxy import auth_proxy
from tests.e2e.harness import CONFORMANCE_JS, NODE, PY, ROOT, Gateway, fixture_server, free_port

pytestmark = pytest.mark.e2e

REQUIREMENTS = ("2025-11-25", "2026-07-28")
TARGETS = ("fixture", "gateway", "chain")
PEER = "fixture"
CHAINED = "chained"
"""The chain's peer at the second gateway: the first gateway's `/peers/fixture/mcp`."""
RESULTS_ROOT = ROOT / "build" / "conformance"
TASKS_SCENARIOS = frozenset({
    "tasks-lifecycle", "tasks-capability-negotiation", "tasks-wire-fields", "tasks-request-state-removal", "tasks-mrtr-input",
    "tasks-request-headers", "tasks-dispatch-and-envelope", "tasks-status-notifications", "tasks-required-task-error",
    "tasks-mrtr-composition",
})
"""The tasks extension's scenarios (2026-07-28 only, unscored as an extension): the fixture serves the
extension (tests/fixtures/tasks_extension.py), so they must pass directly and through the gateway alike."""
FIXTURE_EXTRAS = {
    "2025-11-25": frozenset({"json-schema-2020-12", "server-sse-polling"}),
    "2026-07-28": frozenset({"json-schema-2020-12", "http-header-validation", "http-custom-header-server-validation"}) | TASKS_SCENARIOS,
}
"""Unscored (pending, extension) scenarios the fixture server must pass directly as well."""
GATEWAY_EXTRAS = {"2025-11-25": frozenset(), "2026-07-28": TASKS_SCENARIOS}
"""Unscored scenarios the gateway must pass too: tasks pass through as good as directly (issue 17.3)."""
SUITE_TIMEOUT = 600
# Scenario result folders are named server-<scenario>-<ISO timestamp with dashes>Z.
RESULT_DIR = re.compile(r"^server-(?P<scenario>.+)-\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}-\d{3}Z$")


@dataclass
class SuiteReport:
    """What one suite run proved, from its checks.json files."""

    ran: dict[str, list[dict]] = field(default_factory=dict)
    """Scenario name -> its checks, for every scenario that wrote results."""
    scored: frozenset[str] = frozenset()

    @property
    def failures(self) -> list[str]:
        """Return "scenario: check-id (message)" for each failing check of a scored scenario."""
        lines = []
        for scenario in sorted(self.ran):
            if scenario not in self.scored:
                continue
            for check in self.ran[scenario]:
                if check.get("status") == "FAILURE":
                    message = str(check.get("errorMessage") or "")[:300]
                    lines.append(f"{scenario}: {check.get('id')} ({message})")
        return lines

    @property
    def missing(self) -> list[str]:
        """Return the scored scenarios that wrote no results."""
        return sorted(self.scored - set(self.ran))

    def counts(self, *, scored: bool) -> tuple[int, int]:
        """Return (passed, failed) checks over the scored or the unscored scenarios."""
        checks = [c for s, cs in self.ran.items() if (s in self.scored) == scored for c in cs]
        return (
            sum(c.get("status") == "SUCCESS" for c in checks),
            sum(c.get("status") == "FAILURE" for c in checks),
        )


def require_suite() -> None:
    if not NODE.exists() or not CONFORMANCE_JS.exists():
        pytest.fail(f"the conformance suite is not installed ({NODE}, {CONFORMANCE_JS}); run `make tools`")


def scored_scenarios(requirements: str) -> frozenset[str]:
    """Ask the suite which server scenarios the requirement set scores."""
    listing = subprocess.run(
        [str(NODE), str(CONFORMANCE_JS), "list", "--requirements", requirements, "--server"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    scenarios: set[str] = set()
    in_section = False
    for line in listing.splitlines():
        if line.startswith("Server scenarios"):
            in_section = True
        elif in_section and line.strip().startswith("- "):
            scenarios.add(line.strip()[2:].strip())
        elif in_section and line.strip():
            break
    assert scenarios, f"could not read the scored scenarios of {requirements} from:\n{listing}"
    return frozenset(scenarios)


def read_results(output_dir: Path, scored: frozenset[str]) -> SuiteReport:
    """Collect every scenario's checks.json under `output_dir`."""
    report = SuiteReport(scored=scored)
    for checks_file in sorted(output_dir.glob("*/checks.json")):
        match = RESULT_DIR.match(checks_file.parent.name)
        scenario = match["scenario"] if match else checks_file.parent.name
        checks = json.loads(checks_file.read_text())
        report.ran.setdefault(scenario, []).extend(c for c in checks if isinstance(c, dict))
    return report


def run_suite(url: str, requirements: str, output_dir: Path) -> tuple[int, str]:
    """Run the suite's server scenarios of one requirement set; return (exit code, output)."""
    if output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True)
    result = subprocess.run(
        [str(NODE), str(CONFORMANCE_JS), "server", "--url", url, "--requirements", requirements, "-o", str(output_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=SUITE_TIMEOUT,
    )
    output = f"{result.stdout}\n--- stderr\n{result.stderr}"
    (output_dir / "suite-output.txt").write_text(output)
    return result.returncode, output


def verdict(target: str, requirements: str, exit_code: int, output: str, report: SuiteReport, output_dir: Path) -> str:
    """Return "" if the run is conformant, else a message naming what failed."""
    problems = []
    if report.failures:
        problems.append("failing checks in scored scenarios:\n  " + "\n  ".join(report.failures))
    if report.missing:
        problems.append("scored scenarios that wrote no results: " + ", ".join(report.missing))
    if exit_code != 0:
        problems.append(f"the suite exited with {exit_code}")
        if not report.failures and not report.missing:
            problems.append("suite output (tail):\n" + output[-3000:])
    if not problems:
        return ""
    return f"conformance {target} --requirements {requirements} (results in {output_dir}):\n" + "\n".join(problems)


@pytest.fixture(scope="module")
def fixture_url() -> Iterator[str]:
    with fixture_server(PEER) as url:
        yield url


@pytest.fixture(scope="module")
def conformance_gateway(fixture_url: str) -> Iterator[tuple[Gateway, str]]:
    """A gateway of its own (one worker, SQLite) with the fixture as its only peer.

    The suite cannot send a bearer token, so it talks to a loopback proxy that adds one; the
    proxy's origin is the gateway's public URL (the token's audience). Yields (gateway, proxy URL).
    """
    proxy_port = free_port()
    proxy_url = f"http://127.0.0.1:{proxy_port}"
    gateway = Gateway(name="conformance", env={"FEDMCP_PUBLIC_URL": proxy_url})
    try:
        gateway.migrate()
        gateway.command("peer", "add", PEER, "--url", fixture_url)
        gateway.start_worker()
        token = gateway.token(user="conformance", resource=proxy_url)
        with auth_proxy(gateway.url(""), token, proxy_port) as base:
            yield gateway, base
    finally:
        gateway.cleanup()


@pytest.fixture(scope="module")
def conformance_chain(conformance_gateway: tuple[Gateway, str]) -> Iterator[tuple[Gateway, str]]:
    """A second gateway in front of the first: its peer `chained` is the first gateway's
    `/peers/fixture/mcp` (through that gateway's token-adding proxy). Yields (gateway, its own proxy URL)."""
    _, first_proxy = conformance_gateway
    proxy_port = free_port()
    proxy_url = f"http://127.0.0.1:{proxy_port}"
    gateway = Gateway(name="conformance-chain", env={"FEDMCP_PUBLIC_URL": proxy_url})
    try:
        gateway.migrate()
        gateway.command("peer", "add", CHAINED, "--url", f"{first_proxy}/peers/{PEER}/mcp")
        gateway.start_worker()
        token = gateway.token(user="conformance", resource=proxy_url)
        with auth_proxy(gateway.url(""), token, proxy_port) as base:
            yield gateway, base
    finally:
        gateway.cleanup()


def target_url(target: str, request: pytest.FixtureRequest) -> tuple[str, Gateway | None]:
    """The URL the suite is run against for `target`, and the gateway in front of the fixture (if any)."""
    if target == "gateway":
        gateway, proxy_url = request.getfixturevalue("conformance_gateway")
        return f"{proxy_url}/peers/{PEER}/mcp", gateway
    if target == "chain":
        gateway, proxy_url = request.getfixturevalue("conformance_chain")
        return f"{proxy_url}/peers/{CHAINED}/mcp", gateway
    return request.getfixturevalue("fixture_url"), None


@pytest.mark.parametrize("requirements", REQUIREMENTS)
@pytest.mark.parametrize("target", TARGETS)
def test_every_scored_scenario_passes(target: str, requirements: str, request: pytest.FixtureRequest) -> None:
    require_suite()
    url, gateway = target_url(target, request)
    output_dir = RESULTS_ROOT / f"{target}-{requirements}"

    exit_code, output = run_suite(url, requirements, output_dir)
    if gateway is not None:
        (output_dir / "gateway-logs.txt").write_text(gateway.logs())
    required = scored_scenarios(requirements) | (FIXTURE_EXTRAS if target == "fixture" else GATEWAY_EXTRAS)[requirements]
    report = read_results(output_dir, required)

    passed, failed = report.counts(scored=True)
    (output_dir / "summary.json").write_text(json.dumps({
        "target": target, "requirements": requirements, "exit_code": exit_code,
        "scored_scenarios": len(report.scored), "scored_checks_passed": passed, "scored_checks_failed": failed,
        "unscored_checks": dict(zip(("passed", "failed"), report.counts(scored=False), strict=True)),
        "failures": report.failures, "missing": report.missing,
    }, indent=2))
    problem = verdict(target, requirements, exit_code, output, report, output_dir)
    assert not problem, problem


# --- client scenarios: fedmcp as the client of the suite's servers ---------------------------------

CLIENT_SCENARIOS: dict[str, tuple[str, ...]] = {
    "initialize": ("2025-11-25",),
    "tools_call": ("2025-11-25", "2026-07-28"),
    "elicitation-sep1034-client-defaults": ("2025-11-25",),
    "sse-retry": ("2025-11-25",),
    "request-metadata": ("2026-07-28",),
    "sep-2322-client-request-state": ("2026-07-28",),
    "http-standard-headers": ("2026-07-28",),
    "http-custom-headers": ("2026-07-28",),
    "http-invalid-tool-headers": ("2026-07-28",),
    "json-schema-ref-no-deref": ("2026-07-28",),
    "json-schema-2020-12-preservation": ("2025-11-25", "2026-07-28"),
}
"""Every client scenario the suite lists, auth/* and extensions excepted, at each of its versions we serve."""
CLIENT_TIMEOUT = 60


def listed_client_scenarios() -> dict[str, tuple[str, ...]]:
    """Ask the suite for its client scenarios (auth/* and extensions left out) and their versions."""
    listing = subprocess.run([str(NODE), str(CONFORMANCE_JS), "list"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
    found: dict[str, tuple[str, ...]] = {}
    section = listing.split("Client scenarios", 1)[1].split("\n\n", 1)[0]
    for name, versions in re.findall(r"^\s*- (\S+) \[([^\]]*)\]", section, re.MULTILINE):
        if name.startswith("auth/") or versions == "extension":
            continue
        found[name] = tuple(v for v in versions.split(",") if v in REQUIREMENTS)
    return found


@pytest.fixture(scope="module")
def client_gateway() -> Iterator[tuple[Gateway, str]]:
    """A gateway (one worker, SQLite) for the client scenarios; yields it and an admin + MCP token."""
    gateway = Gateway(name="conformance-client")
    try:
        gateway.migrate()
        gateway.start_worker()
        # Staff: the driver adds each scenario's server as a peer through the REST API.
        gateway.create_users({"operator": secrets.token_urlsafe(12)}, superuser=True)
        yield gateway, gateway.token(user="operator", scope="admin mcp:tools mcp:resources mcp:prompts")
    finally:
        gateway.cleanup()


def test_the_client_scenario_list_is_the_suites() -> None:
    require_suite()
    assert listed_client_scenarios() == CLIENT_SCENARIOS


@pytest.mark.parametrize(("scenario", "version"), [(s, v) for s, versions in CLIENT_SCENARIOS.items() for v in versions])
def test_every_client_scenario_passes(scenario: str, version: str, client_gateway: tuple[Gateway, str]) -> None:
    """fedmcp, as the client of the scenario's server (tests/e2e/conformance_client.py), fails no check."""
    require_suite()
    gateway, token = client_gateway
    output_dir = RESULTS_ROOT / "client" / f"{scenario}-{version}"
    if output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True)
    env = {**gateway.env, "FEDMCP_CONFORMANCE_GATEWAY": gateway.url(""), "FEDMCP_CONFORMANCE_TOKEN": token}
    command = f"{PY} -m tests.e2e.conformance_client"
    try:
        result = subprocess.run(
            [str(NODE), str(CONFORMANCE_JS), "client", "--command", command, "--scenario", scenario, "--spec-version", version, "-o", str(output_dir)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=CLIENT_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        (output_dir / "gateway-logs.txt").write_text(gateway.logs())
        pytest.fail(f"client scenario {scenario} at {version} did not finish within {CLIENT_TIMEOUT} s (results in {output_dir}): {exc.stderr!r}")
    output = f"{result.stdout}\n--- stderr\n{result.stderr}"
    (output_dir / "suite-output.txt").write_text(output)
    checks = [c for f in sorted(output_dir.glob("*/checks.json")) for c in json.loads(f.read_text()) if isinstance(c, dict)]
    failures = [f"{c.get('id')} ({str(c.get('errorMessage') or '')[:300]})" for c in checks if c.get("status") == "FAILURE"]
    (output_dir / "gateway-logs.txt").write_text(gateway.logs())
    assert checks, f"{scenario} at {version} wrote no checks:\n{output[-3000:]}"
    assert not failures and result.returncode == 0, (
        f"client scenario {scenario} at {version} (results in {output_dir}, exit {result.returncode}):\n  " + "\n  ".join(failures)
        + f"\n{output[-2000:]}"
    )


def test_a_failing_scored_check_fails_the_verdict(tmp_path: Path) -> None:
    """The verdict names failing scored checks and missing scenarios, and ignores unscored ones."""
    for scenario, status in (("tools-list", "FAILURE"), ("tasks-lifecycle", "FAILURE"), ("ping", "SUCCESS")):
        folder = tmp_path / f"server-{scenario}-2026-11-24T05-02-12-380Z"
        folder.mkdir()
        (folder / "checks.json").write_text(json.dumps([{"id": f"{scenario}-check", "status": status, "errorMessage": "x"}]))
    report = read_results(tmp_path, frozenset({"tools-list", "ping", "caching"}))

    problem = verdict("gateway", "2026-07-28", 0, "", report, tmp_path)

    assert report.failures == ["tools-list: tools-list-check (x)"]
    assert report.missing == ["caching"]
    assert "tools-list: tools-list-check" in problem
    assert "tasks-lifecycle" not in problem
    assert verdict("fixture", "2026-07-28", 1, "boom", read_results(tmp_path / "none", frozenset()), tmp_path)
