"""Distributed consent with real gateways: the owner of a tool asks, the user answers at home.

Three gateways, each its own daphne process, database and keys: A -> B -> C, trust set up with
the operator commands (as tests/e2e/test_federation.py). B has the fixture server as peer
`tools`, C has it as peer `fixture`. B's policy asks before `tools/add`; C's before `fixture/add`.
alice is a user of A only: B knows her as alice@A, C as alice@A@B (asserted by B).

* A host on A calls `b.tools__add`: B challenges A, the prompt appears on A's /consent (alice
  signs in there and approves), the call completes on B, B's audit says alice@A, approved.
* Deny, remember, a 2026-07-28 host, and the ask at C (relayed by B) likewise; a 2026-07-28
  host is asked once for a call whose upstream at B answers with input_required rounds of its own.
* C's upstream samples and elicits during a call, C asks about them and has nobody to ask, so it
  leaves them to alice's home (signed deferral mark), B passes them on: A's /consent names the
  server and gateway C as B's report, and, once A trusts C, verified by C's signature.
* Playing gateway A by hand (A's real key, through `manage.py shell`), the test replays a
  decision, uses one for another call, forges one and sends one to the wrong gateway: B
  refuses each with -32017 and the reason.
* In a real browser: headless Chromium, signed in on A's /consent as bea (another user of A,
  so her call has audit rows of its own at B), sits on the page; a host on A calls
  `b.tools__add` and waits; the prompt must appear WITHOUT a reload, naming the owner gateway
  `b` and the path a → b; she presses "Approve once"; the call completes on B, and B's audit
  has the approval for bea@A. Screenshots go to build/screenshots/distributed-consent-*.png.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions

from mcp_endpoint import jsonrpc
from tests.e2e import harness
from tests.e2e.browser import screenshot, sign_in_on_consent_page
from tests.e2e.harness import Gateway, fixture_server, gateways, peer_gateway
from tests.e2e.hosts import BackgroundHost
from tests.e2e.test_consent_sampling import StreamingHost
from tests.e2e.test_federation import gateway_token, modern_call

pytestmark = pytest.mark.e2e

WAIT = 60.0
"""Upper bound for each wait; a healthy run needs a fraction of it."""
USERNAME = "alice"
BROWSER_USER = "bea"
"""The user of A who answers in Chromium."""
ADD_AT_B = {"name": "b.tools__add", "arguments": {"a": 20, "b": 22}}
ADD_AT_C = {"name": "c.fixture__add", "arguments": {"a": 40, "b": 2}}
MULTI_ROUND_AT_B = "b.tools__test_input_required_result_multi_round"
"""A fixture tool that answers with two input_required rounds (elicitations) of its own."""
ELICITING = {"io.modelcontextprotocol/clientCapabilities": {"elicitation": {"form": {}}}}
CONSENT_ENV = {"FEDMCP_CONSENT_TIMEOUT": str(WAIT), "FEDMCP_CONSENT_POLL_INTERVAL": "1"}


def ask_policy(gateway: Gateway, peer: str) -> None:
    """`gateway` asks before every call of `add` on `peer`, and hides argument `b` on the page."""
    gateway.python(
        "from identity.models import ConsentPolicy; "
        f"ConsentPolicy.objects.create(peer={peer!r}, kind='tool', name_pattern='add', decision='ask', redact_fields=['b'])"
    )


@pytest.fixture(scope="module")
def chain() -> Iterator[dict[str, Any]]:
    """A -> B -> C, B and C with the fixture as `tools` / `fixture`; alice and bea (with passwords) on A."""
    passwords = {USERNAME: secrets.token_urlsafe(16), BROWSER_USER: secrets.token_urlsafe(16)}
    with fixture_server(name="fixture") as fixture_url, gateways("c", "b", "a", env=CONSENT_ENV) as made:
        c, b, a = made["c"], made["b"], made["a"]
        a.create_users(passwords)
        for user in passwords:
            a.auth_headers(user)
        c.command("peer", "add", "fixture", "--url", fixture_url)
        ask_policy(c, "fixture")
        c.start_worker()
        peer_gateway(b, c)
        b.command("peer", "add", "tools", "--url", fixture_url)
        ask_policy(b, "tools")
        b.start_worker()
        a_at_b = peer_gateway(a, b)
        a.start_worker()
        yield {**made, "a_at_b": a_at_b, "passwords": passwords}


# --- helpers: a host, alice's browser session on A, the audit trail --------------------------------


class ConsentPage:
    """alice signed in on A's /consent with a plain HTTP client, posting the page's forms."""

    def __init__(self, gateway: Gateway, password: str) -> None:
        self.base = gateway.url("")
        self.client = httpx.Client(base_url=self.base, timeout=WAIT, follow_redirects=False)
        page = self.client.get("/accounts/login/", params={"next": "/consent"})
        signed_in = self.client.post(
            "/accounts/login/", data={"username": USERNAME, "password": password, "next": "/consent", "csrfmiddlewaretoken": csrf_of(page.text)}
        )
        assert signed_in.status_code == 302, signed_in.text

    def wait_for_prompt(self, known: set[str] = frozenset()) -> tuple[str, str]:  # type: ignore[assignment]
        """Poll /consent until a new prompt shows; return its id and its section's HTML."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            page = self.client.get("/consent")
            assert page.status_code == 200
            for match in re.finditer(r'<section class="prompt" id="prompt-([^"]+)".*?</section>', page.text, re.S):
                if match.group(1) not in known:
                    return match.group(1), match.group(0)
            time.sleep(0.3)
        raise AssertionError("no consent prompt appeared on A's /consent")

    def answer(self, prompt_id: str, action: str, **extra: str) -> int:
        page = self.client.get(f"/consent/{prompt_id}")
        response = self.client.post(f"/consent/{prompt_id}", data={"action": action, "csrfmiddlewaretoken": csrf_of(page.text), **extra})
        return response.status_code

    def close(self) -> None:
        self.client.close()


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html)
    assert match, "no CSRF token on the page"
    return match.group(1)


@pytest.fixture
def page(chain: dict[str, Any]) -> Iterator[ConsentPage]:
    browser = ConsentPage(chain["a"], chain["passwords"][USERNAME])
    try:
        yield browser
    finally:
        browser.close()


@pytest.fixture
def host(chain: dict[str, Any]) -> Iterator[BackgroundHost]:
    """alice's handshake-era host on A, its session open."""
    client = BackgroundHost(chain["a"], wait=WAIT, user=USERNAME)
    try:
        client.initialize()
        yield client
    finally:
        client.close()


def audit_events(gateway: Gateway, *, poll: bool = False) -> list[dict[str, Any]]:
    """`gateway`'s audit trail, oldest first; `poll` reads it through the gateway's interpreter (for polling loops)."""
    code = (
        "import json; from identity.models import AuditEvent;"
        "print(json.dumps(list(AuditEvent.objects.order_by('at').values("
        "'username', 'federated_issuer', 'federated_subject', 'via', 'peer', 'method', 'name', 'outcome', 'error_code', 'decision'))))"
    )
    return json.loads((gateway.python if poll else gateway.shell)(code))


def wait_for_audit(gateway: Gateway, match: dict[str, Any], count: int = 1) -> list[dict[str, Any]]:
    """Poll `gateway`'s audit trail (written off the response path) for `count` events with `match`."""
    deadline = time.monotonic() + WAIT
    while True:
        found = [e for e in audit_events(gateway, poll=True) if all(e.get(k) == v for k, v in match.items())]
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no audit event {match} on {gateway.env['FEDMCP_GATEWAY_NAME']}: {audit_events(gateway)}")
        time.sleep(0.3)


def text_of(reply: dict[str, Any]) -> str:
    assert "result" in reply, reply
    return str(reply["result"]["content"][0]["text"])


# --- alice on A, the ask at B -------------------------------------------------------------------


def test_approval_at_home_completes_the_call_at_the_owner(chain: dict[str, Any], page: ConsentPage, host: BackgroundHost) -> None:
    a, b = chain["a"], chain["b"]
    host.call_in_background(ADD_AT_B)
    prompt_id, section = page.wait_for_prompt()

    # The page on A says who asks, about what, through which gateways; B's redaction holds.
    assert "gateway <code>b</code>" in section and "a → b" in section
    assert "<code>add</code> on <code>tools</code>" in section
    assert "&quot;b&quot;: &quot;[redacted]&quot;" in section and "&quot;a&quot;: 20" in section
    assert page.answer(prompt_id, "approve") == 302

    assert text_of(host.wait()) == "42"
    (event,) = wait_for_audit(b, {"peer": "tools", "name": "add", "outcome": "ok"})
    assert (event["federated_subject"], event["federated_issuer"], event["username"]) == ("alice", a.public_url, "")
    assert (event["decision"], event["via"]) == ("approved", ["a"])
    # B asked first (-32019, "ask-home"), then ran the approved call.
    wait_for_audit(b, {"peer": "tools", "name": "add", "error_code": jsonrpc.CONSENT_REQUIRED_AT_HOME, "decision": "ask-home"})
    # A, alice's home, records her answer for the call it forwarded.
    wait_for_audit(a, {"peer": "b", "name": "tools__add", "outcome": "ok", "decision": "approved"})


def test_deny_at_home_answers_consent_denied_and_the_owner_audits_it(chain: dict[str, Any], page: ConsentPage, host: BackgroundHost) -> None:
    a, b = chain["a"], chain["b"]
    host.call_in_background({**ADD_AT_B, "arguments": {"a": 1, "b": 1}})
    prompt_id, _ = page.wait_for_prompt()
    assert page.answer(prompt_id, "deny") == 302

    reply = host.wait()

    assert reply["error"]["code"] == jsonrpc.CONSENT_DENIED
    (event,) = wait_for_audit(b, {"peer": "tools", "decision": "denied"})
    assert (event["federated_subject"], event["federated_issuer"], event["error_code"]) == ("alice", a.public_url, jsonrpc.CONSENT_DENIED)
    wait_for_audit(a, {"peer": "b", "name": "tools__add", "decision": "denied", "error_code": jsonrpc.CONSENT_DENIED})


def test_a_2026_host_gets_input_required_pointing_at_as_consent_page(chain: dict[str, Any], page: ConsentPage) -> None:
    a = chain["a"]
    params = {**ADD_AT_B, "arguments": {"a": 2, "b": 3}}
    first = modern_call(a, "tools/call", params, name=ADD_AT_B["name"], headers=a.auth_headers(USERNAME), timeout=WAIT)
    result = first["result"]
    assert result["resultType"] == "input_required", first
    (request,) = result["inputRequests"].values()
    prompt_id, _ = page.wait_for_prompt()
    assert request["params"]["url"] == f"{a.public_url}/consent/{prompt_id}"
    assert page.answer(prompt_id, "approve") == 302

    retry = {**params, "requestState": result["requestState"], "inputResponses": {"fedmcp-consent": {"action": "accept"}}}
    done = modern_call(a, "tools/call", retry, name=ADD_AT_B["name"], headers=a.auth_headers(USERNAME), timeout=WAIT)

    assert text_of(done) == "5"
    # The approval was spent at A: the same state again is refused there.
    again = modern_call(a, "tools/call", retry, name=ADD_AT_B["name"], headers=a.auth_headers(USERNAME), timeout=WAIT)
    assert again["error"]["code"] == jsonrpc.INVALID_PARAMS


def test_a_2026_host_is_asked_once_however_many_rounds_bs_upstream_asks(chain: dict[str, Any], page: ConsentPage) -> None:
    a, b = chain["a"], chain["b"]
    b.python(
        "from identity.models import ConsentPolicy; "
        "ConsentPolicy.objects.create(peer='tools', kind='tool', name_pattern='test_input_required_*', decision='ask')"
    )
    params = {"name": MULTI_ROUND_AT_B, "arguments": {}}

    def call(**extra: Any) -> dict[str, Any]:
        headers = a.auth_headers(USERNAME)
        return modern_call(a, "tools/call", {**params, **extra}, name=MULTI_ROUND_AT_B, headers=headers, meta=ELICITING, timeout=WAIT)

    asked = call()["result"]
    prompt_id, _ = page.wait_for_prompt()
    assert page.answer(prompt_id, "approve") == 302
    step1 = call(requestState=asked["requestState"], inputResponses={"fedmcp-consent": {"action": "accept"}})["result"]
    assert list(step1["inputRequests"]) == ["step1"], step1
    step2 = call(requestState=step1["requestState"], inputResponses={"step1": {"action": "accept", "content": {"name": "Alice"}}})["result"]
    assert list(step2["inputRequests"]) == ["step2"], step2
    done = call(requestState=step2["requestState"], inputResponses={"step2": {"action": "accept", "content": {"color": "green"}}})

    assert text_of(done) == "Alice's favorite color is green"
    # B, the owner, continued both rounds of the call alice approved at A; A asked her once.
    match = {"peer": "tools", "name": "test_input_required_result_multi_round", "method": "tools/call", "decision": "continued"}
    continued = wait_for_audit(b, match, count=2)
    assert {(e["federated_subject"], e["federated_issuer"]) for e in continued} == {("alice", a.public_url)}
    # The first retry was answered with the upstream's next question (outcome input), the second completed.
    assert [e["outcome"] for e in continued] == ["input", "ok"]
    asked_at_a = a.python(
        "from identity.models import ConsentPrompt; print(ConsentPrompt.objects.filter(name='test_input_required_result_multi_round').count())"
    )
    assert asked_at_a.strip() == "1"


def test_remember_keeps_a_grant_for_alice_at_a_on_b(chain: dict[str, Any], page: ConsentPage, host: BackgroundHost) -> None:
    a, b = chain["a"], chain["b"]
    params = {**ADD_AT_B, "arguments": {"a": 3, "b": 4}}
    host.call_in_background(params)
    prompt_id, _ = page.wait_for_prompt()
    assert page.answer(prompt_id, "remember", duration="3600") == 302
    assert text_of(host.wait()) == "7"

    grants = json.loads(
        b.shell(
            "import json; from identity.models import ConsentGrant; "
            "print(json.dumps(list(ConsentGrant.objects.active().values('user', 'federated_issuer', 'federated_subject', 'peer', 'name'))))"
        )
    )
    assert grants == [{"user": None, "federated_issuer": a.public_url, "federated_subject": "alice", "peer": "tools", "name": "add"}]
    # No grant at A: B owns the call and keeps it.
    assert a.shell("from identity.models import ConsentGrant; print(ConsentGrant.objects.count())") == "0"

    # Remembered: the next call (other arguments too) passes without a prompt.
    again = modern_call(a, "tools/call", {**ADD_AT_B, "arguments": {"a": 5, "b": 5}}, name=ADD_AT_B["name"], headers=a.auth_headers(USERNAME), timeout=WAIT)
    assert text_of(again) == "10"
    wait_for_audit(b, {"peer": "tools", "decision": "grant", "outcome": "ok"})
    b.shell("from django.utils import timezone; from identity.models import ConsentGrant; ConsentGrant.objects.update(revoked_at=timezone.now())")


# --- the ask at C, two hops away: B relays --------------------------------------------------------


def test_an_ask_at_c_is_relayed_by_b_and_answered_at_a(chain: dict[str, Any], page: ConsentPage, host: BackgroundHost) -> None:
    a, b, c = chain["a"], chain["b"], chain["c"]
    host.call_in_background(ADD_AT_C)
    prompt_id, section = page.wait_for_prompt()

    assert "gateway <code>c</code>" in section and "a → b → c" in section
    assert "<code>add</code> on <code>fixture</code>" in section
    assert page.answer(prompt_id, "approve") == 302

    assert text_of(host.wait()) == "42"
    # C trusts B only: the decision it accepted is B's, for alice as B asserted her.
    (on_c,) = wait_for_audit(c, {"peer": "fixture", "name": "add", "outcome": "ok"})
    assert (on_c["federated_subject"], on_c["federated_issuer"], on_c["decision"]) == (f"alice@{a.public_url}", b.public_url, "approved")
    assert on_c["via"] == ["a", "b"]
    wait_for_audit(b, {"peer": "c", "name": "fixture__add", "outcome": "ok"})


# --- an upstream's sampling and elicitation at C, left to alice's home ---------------------------


def consent_policies(gateway: Gateway, peer: str, decision: str | None) -> None:
    """`gateway` asks (or whatever `decision` says) about sampling and elicitation from `peer`; None removes those policies."""
    code = f"from identity.models import ConsentPolicy; ConsentPolicy.objects.filter(peer={peer!r}, kind__in=['sampling', 'elicitation']).delete()"
    if decision is not None:
        code += "".join(f"; ConsentPolicy.objects.create(peer={peer!r}, kind={k!r}, decision={decision!r})" for k in ("sampling", "elicitation"))
    gateway.python(code)


def test_requests_c_leaves_to_alices_home_are_asked_at_a_naming_c_as_far_as_a_can_vouch(chain: dict[str, Any], page: ConsentPage) -> None:
    a, b, c = chain["a"], chain["b"], chain["c"]
    # C asks about its upstream's requests and has nobody to ask: it defers them, signed. B allows
    # (the e2e default) and passes the mark on. A, alice's home, asks her.
    consent_policies(c, "fixture", "ask")
    consent_policies(a, "b", "ask")
    host = StreamingHost(a)
    try:
        host.initialize()
        host.call_in_background({"name": "c.fixture__test_sampling", "arguments": {"prompt": "Capital of France?"}})
        prompt_id, section = page.wait_for_prompt()
        # A does not trust C: the source is B's report, and the page says so.
        assert (
            "Sampling request from <code>fixture</code> of gateway <code>c</code>, as reported by <code>b</code> during <code>test_sampling</code>"
            in section
        )
        assert '<dd class="source" data-vouched="reported">' in section and "not verified: signed by a gateway this one does not trust" in section
        assert "Capital of France?" in section
        assert page.answer(prompt_id, "approve") == 302
        assert text_of(host.wait()) == "LLM response: Paris"
    finally:
        host.close()
    assert host.methods() == ["elicitation/create", "sampling/createMessage"]  # A's pointer to its page, then the request
    wait_for_audit(
        c, {"method": "sampling/createMessage", "peer": "fixture", "decision": "home", "outcome": "ok", "federated_subject": f"alice@{a.public_url}"}
    )
    wait_for_audit(b, {"method": "sampling/createMessage", "peer": "c", "decision": "allow", "outcome": "ok"})
    wait_for_audit(a, {"method": "sampling/createMessage", "peer": "b", "decision": "approved", "outcome": "ok", "username": USERNAME})

    # A trusts C now (its keys from C's JWKS): C's signature is checked, and A names C its own way.
    harness.trust(a, c, "c-corp")
    host = StreamingHost(a)
    try:
        host.initialize()
        host.call_in_background({"name": "c.fixture__test_elicitation", "arguments": {"message": "Your name?"}})
        prompt_id, section = page.wait_for_prompt({prompt_id})
        assert "Elicitation request from <code>fixture</code> of gateway <code>c-corp</code> during <code>test_elicitation</code>" in section
        assert '<dd class="source" data-vouched="signature">' in section and f"({c.public_url}, signature verified), through peer gateway" in section
        assert page.answer(prompt_id, "deny") == 302
        reply = host.wait()
    finally:
        host.close()
        consent_policies(c, "fixture", None)
        consent_policies(a, "b", None)
        a.python(
            "from identity.models import TrustedGateway; from identity.trust.gateways import gateway_untrust; "
            "gateway_untrust(gateway=TrustedGateway.objects.get(name='c-corp'))"
        )
    assert host.methods() == ["elicitation/create"]  # only A's pointer: the request itself never reached the host
    assert "error" in reply or reply["result"].get("isError") is True, reply
    wait_for_audit(c, {"method": "elicitation/create", "decision": "home", "error_code": jsonrpc.CONSENT_DENIED})
    wait_for_audit(a, {"method": "elicitation/create", "peer": "b", "decision": "denied", "error_code": jsonrpc.CONSENT_DENIED})


# --- decisions that must not work ----------------------------------------------------------------


class PlayingA:
    """The test acts as gateway A at B: A's credentials, A's real signing key (via `manage.py shell` on A)."""

    def __init__(self, chain: dict[str, Any]) -> None:
        self.a, self.b = chain["a"], chain["b"]
        self.headers = {"Authorization": f"Bearer {gateway_token(self.b, chain['a_at_b'])}"}

    def sign(self, code: str) -> str:
        """Run `code` on A (with `claims`-building helpers imported); return what it printed."""
        return self.a.python("import jwt, json, time, secrets; from identity.consent import remote; from identity.trust.signing import *; " + code)

    def assertion(self) -> str:
        return self.sign(f"print(assertion_create(subject='alice', audience={self.b.public_url!r}, client_id='host', via=['a']))")

    def decision(self, challenge: str, **overrides: Any) -> str:
        """A's decision (approve) for `challenge`, with claims overridden as given."""
        return self.sign(
            f"claims = jwt.decode({challenge!r}, options={{'verify_signature': False}}); d = remote.decision_create(challenge=claims, approve=True);"
            f"c = jwt.decode(d, options={{'verify_signature': False}}); c.update({overrides!r}); key = signing_key();"
            "print(jwt.encode(c, key.private_key, algorithm=key.algorithm, headers={'kid': key.kid, 'typ': remote.DECISION_TYPE}))"
        )

    def call(self, arguments: dict[str, Any], decision: str | None = None) -> dict[str, Any]:
        meta: dict[str, Any] = {"io.fedmcp/hops": ["a"], "io.fedmcp/assertion": self.assertion()}
        if decision is not None:
            meta["io.fedmcp/consent-decision"] = decision
        params = {"name": "tools__add", "arguments": arguments}
        return modern_call(self.b, "tools/call", params, name="tools__add", headers=self.headers, meta=meta, timeout=WAIT)

    def challenge(self, arguments: dict[str, Any]) -> str:
        reply = self.call(arguments)
        assert reply["error"]["code"] == jsonrpc.CONSENT_REQUIRED_AT_HOME, reply
        assert reply["error"]["data"]["gateway"] == "b"
        return str(reply["error"]["data"]["challenge"])


def test_a_decision_is_good_once_for_its_call_and_only_from_alices_home(chain: dict[str, Any]) -> None:
    a_side = PlayingA(chain)
    arguments = {"a": 30, "b": 12}
    challenge = a_side.challenge(arguments)
    decision = a_side.decision(challenge)

    assert text_of(a_side.call(arguments, decision)) == "42"

    def refusal(reply: dict[str, Any]) -> tuple[int, str]:
        return reply["error"]["code"], reply["error"]["data"]["reason"]

    assert refusal(a_side.call(arguments, decision)) == (jsonrpc.CONSENT_DENIED, "replayed")
    other_call = a_side.decision(a_side.challenge({"a": 1, "b": 2}))
    assert refusal(a_side.call({"a": 1000, "b": 2}, other_call)) == (jsonrpc.CONSENT_DENIED, "other_call")

    fresh = a_side.challenge(arguments)
    misaddressed = a_side.decision(fresh, aud=chain["c"].public_url)
    assert refusal(a_side.call(arguments, misaddressed)) == (jsonrpc.CONSENT_DENIED, "audience")
    not_home = a_side.decision(fresh, iss=chain["c"].public_url)
    assert refusal(a_side.call(arguments, not_home)) == (jsonrpc.CONSENT_DENIED, "issuer")
    expired = a_side.decision(fresh, iat=int(time.time()) - 200, exp=int(time.time()) - 100)
    assert refusal(a_side.call(arguments, expired)) == (jsonrpc.CONSENT_DENIED, "expired")
    # Forged: alice's home claimed, but signed with B's own key (which A's JWKS lacks).
    forged = chain["b"].python(
        "import jwt; from identity.consent import remote; from identity.trust.signing import signing_key; key = signing_key();"
        f"c = jwt.decode({a_side.decision(fresh)!r}, options={{'verify_signature': False}});"
        "print(jwt.encode(c, key.private_key, algorithm=key.algorithm, headers={'kid': key.kid, 'typ': remote.DECISION_TYPE}))"
    )
    assert refusal(a_side.call(arguments, forged))[0] == jsonrpc.CONSENT_DENIED
    assert refusal(a_side.call(arguments, forged))[1] in ("signature", "keys_unavailable")
    # None of those spent the question: A's genuine decision still works, once.
    assert text_of(a_side.call(arguments, a_side.decision(fresh))) == "42"
    wait_for_audit(chain["b"], {"peer": "tools", "decision": "rejected", "error_code": jsonrpc.CONSENT_DENIED}, count=6)


# --- in a real browser -----------------------------------------------------------------------------


def test_bs_question_appears_live_on_as_page_and_the_approval_completes_the_call_on_b(chain: dict[str, Any], browser: webdriver.Chrome) -> None:
    a, b = chain["a"], chain["b"]
    wait = sign_in_on_consent_page(browser, a.url("/consent"), chain["passwords"][BROWSER_USER], username=BROWSER_USER)
    host = BackgroundHost(a, wait=WAIT, user=BROWSER_USER)
    try:
        host.initialize()
        host.call_in_background(ADD_AT_B)
        prompt = wait.until(expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, "#prompts .prompt")))
        assert browser.execute_script("return window.__notReloaded === true"), "the page was reloaded"
        assert "add" in prompt.text and "tools" in prompt.text
        assert prompt.find_element(By.CSS_SELECTOR, "[data-f=owner]").text == "gateway b, which owns this tool"
        assert prompt.find_element(By.CSS_SELECTOR, ".via").text == "a → b"
        assert '"b": "[redacted]"' in prompt.find_element(By.CSS_SELECTOR, "pre").text
        screenshot(browser, "distributed-consent-pending.png")

        prompt.find_element(By.CSS_SELECTOR, "button[value=approve]").click()
        wait.until(expected_conditions.presence_of_element_located((By.ID, "consent-messages")))
        screenshot(browser, "distributed-consent-approved.png")
        reply = host.wait()
    finally:
        host.close()

    assert text_of(reply) == "42"
    (event,) = wait_for_audit(b, {"peer": "tools", "name": "add", "outcome": "ok", "federated_subject": BROWSER_USER})
    assert (event["federated_subject"], event["federated_issuer"], event["decision"]) == (BROWSER_USER, a.public_url, "approved")
