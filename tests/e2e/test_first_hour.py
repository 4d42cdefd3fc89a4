"""The README's first steps against a real gateway (daphne), as a newcomer runs them.

* The "mint one" block: `TOKEN=$(manage.py token …)` and the curl that lists the tools, run by
  bash verbatim (only the port is this test's gateway's, not 8000).
* The TypeScript SDK's `registerClient()` at `/o/register/`: it sends no `application_type`.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.e2e import harness

README = harness.ROOT / "README.md"
SDK_CLIENT = harness.TOOLS / "node_modules" / "@modelcontextprotocol" / "client" / "dist" / "index.mjs"


def readme_block(containing: str) -> str:
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(), re.DOTALL):
        if containing in block:
            return block
    raise AssertionError(f"no sh block with {containing!r} in the README")


@pytest.fixture(scope="module")
def gateway() -> harness.Gateway:
    with harness.Gateway(name="firsthour") as gw:
        gw.migrate()
        gw.start_worker()
        yield gw


def test_the_readme_token_example_lists_tools(gateway: harness.Gateway) -> None:
    with harness.fixture_server("web") as web_url:
        gateway.manage("peer", "add", "web", "--url", web_url)
        script = readme_block("manage.py token").replace("127.0.0.1:8000", f"127.0.0.1:{gateway.port}")

        result = subprocess.run(["bash", "-e", "-c", script], cwd=harness.ROOT, env=gateway.env, capture_output=True, text=True, timeout=120, check=False)

    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert "error" not in reply, reply
    assert any(tool["name"] == "web__whoami" for tool in reply["result"]["tools"])


REGISTER_JS = """
const [sdk, origin] = process.argv.slice(1);  // with -e there is no script path
const { discoverAuthorizationServerMetadata, registerClient } = await import(sdk);
const metadata = await discoverAuthorizationServerMetadata(origin);
try {
  const info = await registerClient(origin, {
    metadata,
    clientMetadata: {
      client_name: "TypeScript SDK host",
      redirect_uris: ["http://127.0.0.1:33418/callback"],
      grant_types: ["authorization_code", "refresh_token"],
      response_types: ["code"],
      token_endpoint_auth_method: "none",
    },
  });
  console.log(JSON.stringify({ ok: true, client_id: info.client_id }));
} catch (error) {
  console.log(JSON.stringify({ ok: false, error: String(error), body: error.body ?? null }));
}
"""


def test_the_typescript_sdk_registers_a_client(gateway: harness.Gateway) -> None:
    result = subprocess.run(
        [str(harness.NODE), "--input-type=module", "-e", REGISTER_JS, SDK_CLIENT.as_uri(), gateway.public_url],
        capture_output=True, text=True, timeout=60, check=False,
    )

    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["ok"], outcome
    registered = gateway.python(
        "from oauth2_provider.models import Application\n"
        f"a = Application.objects.get(client_id={outcome['client_id']!r}); print(a.client_type, a.registration_source)"
    )
    assert registered == "public dcr"
