"""The trust boundaries as invariants, checked against whatever an attacker may try (issue 15, item 10).

Each finding of the outside review has its own test, named after it, beside the code it is
about (docs/SECURITY.md "Review findings" lists them). This module states the rules those
findings broke, and checks them over generated inputs rather than the cases we thought of:

1. **No call reaches an upstream without a recorded decision bound to it.** Every tools/call
   that leaves for an upstream has an audit row that allowed it (`allow`, `grant`, `approved`
   or `continued`) naming the same user, client application, peer, tool and arguments digest;
   an `approved` row has a prompt the user approved for exactly that call, a `grant` row a
   grant for that user, client, peer and tool. Checked over random sequences of calls, answers
   (approve, deny, remember) and replays of any earlier `requestState` with other arguments,
   from another client of the same user and from another user, with the shipped default policy
   and with each explicit one.
2. **No token without an active staff user carries `admin`**, whatever it was issued with: at
   issuance (client credentials asking for any set of scopes) and at use (a token row holding
   any scopes, for any kind of principal, against /api/).
3. **A peer is a gateway only by operator action.** Whatever an upstream says of itself in
   `server/discover`, a peer added without `--gateway` is stored as a plain peer, believed for
   nothing, and its names live under its own home.
4. **Policy sees canonical URIs only.** Any spelling of a resource URI (percent-encoding,
   case, dot segments) reaches the policy and the audit trail in its one canonical form, so a
   deny on it holds for every spelling.

The number of generated examples per rule is FEDMCP_INVARIANT_EXAMPLES (`make test` runs the
default; `make harden` runs more).
"""

from __future__ import annotations

import base64
import os
import secrets
import string
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any
from unittest import mock

from asgiref.sync import async_to_sync
from django.contrib.auth import get_user_model
from django.test import AsyncClient, Client, override_settings
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oauth2_provider.models import AccessToken, Application, set_token_value

from federation import naming
from federation.models import CatalogEntry, Peer
from federation.upstream.base import PeerConfig
from fedmcp_lib import caching
from identity import audit
from identity.audit import audit_flush
from identity.call_digest import arguments_hash
from identity.consent import decisions
from identity.hostauth import scopes
from identity.hostauth.tokens import operator_application
from identity.models import AuditEvent, ConsentGrant, ConsentPolicy, ConsentPrompt
from identity.trust.gateways import gateway_trust
from mcp_endpoint.pipeline import exchange as exchange_step
from mcp_endpoint.pipeline.asking import INPUT_KEY
from tests.base import (
    AsgiTestCase,
    FixturePeerTestCase,
    McpClient,
    audience,
    mint_token,
    register_peer,
    release_process_state,
)
from tests.federation.hostile_upstream import HostileUpstream, install
from tests.identity.consent.test_flow import CALL_TIMEOUT, final_message

EXAMPLES = int(os.environ.get("FEDMCP_INVARIANT_EXAMPLES", "12"))
INVARIANT_SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


def run_property(check: Callable[..., None], **strategies: st.SearchStrategy[Any]) -> None:
    """Run `check` on generated keyword arguments.

    Hypothesis refuses @given on the methods of Django's own test cases (it wants its variants,
    which reset the database between examples; these tests reset what they use themselves, and
    keep the fixture peer their setUp registered).
    """

    @INVARIANT_SETTINGS
    @given(st.fixed_dictionaries(strategies))
    def run(values: dict[str, Any]) -> None:
        check(**values)

    run()


ALLOWING = frozenset({"allow", "grant", "approved", "continued"})
"""Audit words of a call that went on to its upstream (docs/CONSENT.md "Audit")."""


# --- 1. no call reaches an upstream without a decision bound to it ---------------------------------

TOOL = "everything__add"
ARGUMENTS = ({"a": 1, "b": 2}, {"a": 1000, "b": 337})
CALLERS = ("alice", "alice-other-client", "bob")
PROMPT_TIMEOUT = 3
"""Seconds a prompt waits: a replay of an unanswered prompt's state waits for it, then times out."""
POLICIES = (None, "allow", "deny", "ask")
"""None: the shipped default (ask-new-peers); else an explicit policy for the tool."""

callers = st.sampled_from(CALLERS)
arguments = st.sampled_from(range(len(ARGUMENTS)))
rounds = st.tuples(
    callers, arguments,
    st.sampled_from([None, "approve", "deny", "remember"]),
    st.lists(st.tuples(st.integers(0, 3), callers, arguments), max_size=3),
)
"""One round: a call (caller, arguments); the owner's answer to the newest prompt, if any; then
replays of a `requestState` seen so far (0 = this round's, 1 = the one before…) by any caller
with any arguments."""
programs = st.lists(rounds, min_size=1, max_size=3)


class DecisionBindingInvariant(FixturePeerTestCase):
    """Rule 1, over random programs of host calls, user answers and replays."""

    def setUp(self) -> None:
        super().setUp()
        self.enterContext(override_settings(
            FEDMCP_CONSENT_DEFAULT="ask-new-peers", FEDMCP_CONSENT_TIMEOUT=PROMPT_TIMEOUT, FEDMCP_CONSENT_POLL_INTERVAL=0.2
        ))
        other = Application.objects.create(
            name="another host", client_type=Application.CLIENT_PUBLIC,
            authorization_grant_type=Application.GRANT_AUTHORIZATION_CODE, redirect_uris="http://127.0.0.1/callback",
        )
        self.tokens = {"alice": self.token, "alice-other-client": mint_token(application=other), "bob": mint_token("bob")}
        self.sent = self.enterContext(mock.patch.object(exchange_step, "peer_request", wraps=exchange_step.peer_request))

    def test_no_call_reaches_an_upstream_without_a_recorded_decision_bound_to_it(self) -> None:
        run_property(self.check_program, policy=st.sampled_from(POLICIES), program=programs)

    def check_program(self, policy: str | None, program: list[tuple]) -> None:
        self.start_example(policy)
        async_to_sync(self.run_program)(program)
        self.check_bindings()

    def start_example(self, policy: str | None) -> None:
        for model in (ConsentPrompt, ConsentGrant, ConsentPolicy, AuditEvent):
            model.objects.all().delete()
        caching.clear_all()
        audit.audit_reset()
        self.sent.reset_mock()
        if policy is not None:
            ConsentPolicy.objects.create(peer=self.peer_name, kind="tool", name_pattern="add", decision=policy)

    async def run_program(self, program: list[tuple]) -> None:
        states: list[str] = []
        try:
            for caller, args, answer, replays in program:
                await self.call(caller, ARGUMENTS[args], states)
                if answer is not None:
                    await self.answer(answer)
                for back, replayer, replayed in replays:
                    if states:
                        state = states[max(0, len(states) - 1 - back)]
                        extra = {"requestState": state, "inputResponses": {INPUT_KEY: {"action": "accept"}}}
                        await self.call(replayer, ARGUMENTS[replayed], states, **extra)
            await audit_flush()
        finally:
            await release_process_state()

    async def call(self, caller: str, arguments: dict[str, Any], states: list[str], **extra: Any) -> None:
        client = McpClient(token=self.tokens[caller])
        reply = await client.call_modern("tools/call", {"name": TOOL, "arguments": arguments, **extra}, name=TOOL, timeout=CALL_TIMEOUT)
        result = final_message(reply).get("result") or {}
        if result.get("resultType") == "input_required" and isinstance(result.get("requestState"), str):
            states.append(result["requestState"])

    async def answer(self, action: str) -> None:
        """The owner of the newest pending prompt answers it on /consent."""
        prompt = await ConsentPrompt.objects.filter(status=ConsentPrompt.Status.PENDING).select_related("user").order_by("-created_at").afirst()
        if prompt is None:
            return
        browser = AsyncClient()
        await browser.aforce_login(prompt.user)
        form = {"action": action, **({"duration": "3600"} if action == "remember" else {})}
        response = await browser.post(f"/consent/{prompt.id}", form)
        assert response.status_code == 302, response.status_code

    def check_bindings(self) -> None:
        sent = Counter()
        for call in self.sent.call_args_list:
            ctx, connection, method, params = call.args[:4]
            if method == "tools/call":
                who = (ctx.identity.user_id, ctx.identity.client_id, connection.peer.name, params.get("name"))
                sent[(*who, arguments_hash(params.get("arguments") or {}))] += 1
        rows = list(AuditEvent.objects.filter(method="tools/call"))
        allowed = Counter(
            (row.user_id, row.client_id, row.peer, row.name, row.arguments_hash)
            for row in rows if row.decision in ALLOWING and row.outcome == AuditEvent.Outcome.OK
        )
        self.assertEqual(sent, allowed, "every call sent upstream, and only those, has an audit row that allowed it")
        for row in rows:
            if row.decision == "approved":
                shown = ConsentPrompt.objects.filter(
                    status=ConsentPrompt.Status.APPROVED, user_id=row.user_id, client_id=row.client_id, peer=row.peer, name=row.name
                )
                self.assertIn(row.arguments_hash, {arguments_hash(p.arguments) for p in shown}, f"approved without a prompt for this call: {row}")
            elif row.decision == "grant":
                self.assertTrue(
                    ConsentGrant.objects.filter(user_id=row.user_id, peer=row.peer, name=row.name, client_id__in=["", row.client_id]).exists(),
                    f"granted without a grant for this user, client and tool: {row}",
                )
            elif row.decision in ("denied", "deny", "timeout", "ask"):
                self.assertNotEqual(row.outcome, AuditEvent.Outcome.OK, f"a refused or unanswered call is not a completed one: {row}")


# --- 2. no token without an active staff user carries admin -----------------------------------------

PRINCIPALS = ("no user", "user", "staff", "inactive staff", "trusted gateway")
scope_sets = st.sets(st.sampled_from(sorted(scopes.SCOPES)), min_size=1)


class AdminScopeInvariant(AsgiTestCase):
    """Rule 2, at issuance and at use."""

    def setUp(self) -> None:
        super().setUp()
        self.app = Application.objects.create(
            name="machine", client_type=Application.CLIENT_CONFIDENTIAL,
            authorization_grant_type=Application.GRANT_CLIENT_CREDENTIALS, client_secret="s3cret", hash_client_secret=False,
        )
        self.gateway_app = gateway_trust(name="gb", issuer="http://127.0.0.1:10")[0].application

    def test_no_token_without_an_active_staff_user_carries_admin_at_use(self) -> None:
        run_property(self.check_use, principal=st.sampled_from(PRINCIPALS), requested=scope_sets)

    def check_use(self, principal: str, requested: set[str]) -> None:
        caching.clear_all()
        user, application = self.principal(principal)
        raw = token_row(user=user, scope=" ".join(sorted(requested)), application=application)
        status = Client().get("/api/peers/", HTTP_AUTHORIZATION=f"Bearer {raw}", HTTP_HOST="127.0.0.1").status_code
        may_administer = principal == "staff" and scopes.ADMIN in requested
        self.assertEqual(status == 200, may_administer, f"{principal} with {sorted(requested)}: /api/ answered {status}")
        if not may_administer:
            self.assertIn(status, (401, 403))

    def test_client_credentials_never_issue_admin(self) -> None:
        run_property(self.check_issuance, gateway=st.booleans(), requested=scope_sets)

    def check_issuance(self, gateway: bool, requested: set[str]) -> None:
        application = self.gateway_app if gateway else self.app
        secret = "s3cret"
        if gateway:
            application.client_secret, application.hash_client_secret = "gw-s3cret", False
            application.save()
            secret = "gw-s3cret"
        basic = base64.b64encode(f"{application.client_id}:{secret}".encode()).decode()
        response = Client().post(
            "/o/token/", {"grant_type": "client_credentials", "scope": " ".join(sorted(requested)), "resource": audience()},
            HTTP_AUTHORIZATION=f"Basic {basic}", HTTP_HOST="127.0.0.1",
        )
        if response.status_code == 200:
            self.assertNotIn(scopes.ADMIN, response.json()["scope"].split())
        else:
            self.assertEqual(response.status_code, 400, response.content)
        self.assertFalse(any(scopes.ADMIN in t.scope.split() for t in AccessToken.objects.filter(user=None)))

    def principal(self, kind: str) -> tuple[Any, Application | None]:
        users = get_user_model()
        if kind == "no user":
            return None, self.app
        if kind == "trusted gateway":
            return None, self.gateway_app
        user, _ = users.objects.get_or_create(username=kind.replace(" ", "-"))
        user.is_staff = kind != "user"
        user.is_active = kind != "inactive staff"
        user.save()
        return user, None


def token_row(*, user: Any, scope: str, application: Application | None) -> str:
    """A token row holding `scope` as stored, however it came to be (an old issuance, a bug, an import)."""
    raw = secrets.token_urlsafe(32)
    token = AccessToken(
        user=user, application=application or operator_application(), expires=timezone.now() + timedelta(hours=1),
        scope=scope, resource=[audience()],
    )
    set_token_value(token, raw)
    token.save()
    return raw


# --- 3. a peer is a gateway only by operator action ------------------------------------------------

claims = st.text(alphabet=string.ascii_lowercase + string.digits + "-.", min_size=1, max_size=12)
listed = st.lists(st.text(alphabet=string.ascii_lowercase + "._", min_size=1, max_size=16), min_size=1, max_size=4, unique=True)


class GatewayStandingInvariant(AsgiTestCase):
    """Rule 3: what an upstream says of itself is never standing."""

    def test_a_peer_is_a_gateway_only_by_operator_action(self) -> None:
        run_property(self.check_claim, claim=claims, tools=listed)

    def check_claim(self, claim: str, tools: list[str]) -> None:
        Peer.objects.all().delete()
        caching.clear_all()
        upstream = HostileUpstream(gateway=claim, tools=tools)
        install(self, upstream)
        peer = register_peer("evil", upstream.url)
        self.assertFalse(peer.is_gateway)
        self.assertEqual(peer.remote_gateway, "")
        self.assertFalse(PeerConfig.from_peer(peer).trusted_gateway)
        homes = set(CatalogEntry.objects.filter(peer=peer).values_list("home", flat=True))
        self.assertEqual(homes, {"evil"}, f"an upstream claiming {claim!r} placed names under {homes}")


# --- 4. policy sees canonical URIs only ----------------------------------------------------------

DENIED = "test://template/42/data"
UNRESERVED = set(string.ascii_letters + string.digits + "-._~")


@st.composite
def spellings(draw: st.DrawFn, uri: str) -> str:
    """Another way to write `uri`: escapes for unreserved characters, case, dot segments."""
    scheme, rest = uri.split("://", 1)
    host, path = rest.split("/", 1)
    out = []
    for char in path:
        if char in UNRESERVED and draw(st.booleans()):
            escape = f"%{ord(char):02X}"
            out.append(escape if draw(st.booleans()) else escape.lower())
        else:
            out.append(char)
    path = "".join(out)
    if draw(st.booleans()):
        path = "./" + path
    if draw(st.booleans()):
        path = "x/../" + path
    scheme = draw(st.sampled_from([scheme, scheme.upper()]))
    host = draw(st.sampled_from([host, host.upper()]))
    return f"{scheme}://{host}/{path}"


class CanonicalUriInvariant(FixturePeerTestCase):
    """Rule 4, through the real endpoints, with a deny policy on one canonical URI."""

    def setUp(self) -> None:
        super().setUp()
        ConsentPolicy.objects.create(peer=self.peer_name, kind="resource", name_pattern=DENIED, decision="deny")
        self.seen = self.enterContext(mock.patch.object(decisions, "consent_decide", wraps=decisions.consent_decide))

    def test_policy_sees_canonical_uris_only(self) -> None:
        run_property(self.check_spelling, spelling=spellings(DENIED), aggregated=st.booleans())

    def check_spelling(self, spelling: str, aggregated: bool) -> None:
        caching.clear_all()
        self.seen.reset_mock()
        uri = f"fedmcp://{self.peer_name}/{spelling}" if aggregated else spelling
        reply = async_to_sync(self.read)("/mcp" if aggregated else f"/peers/{self.peer_name}/mcp", uri)
        self.assertIn("error", reply, f"{uri} was served despite the deny on {DENIED}")
        names = [call.kwargs.get("name") for call in self.seen.call_args_list if call.kwargs.get("kind") == "resource"]
        self.assertTrue(names, f"{uri}: no policy decision was made")
        for name in names:
            self.assertEqual(naming.canonical_uri(name), name, f"the policy saw a non-canonical URI {name!r}")

    async def read(self, path: str, uri: str) -> dict[str, Any]:
        try:
            client = McpClient(path)
            await client.initialize()
            return (await client.call("resources/read", {"uri": uri}, timeout=CALL_TIMEOUT)).json()
        finally:
            await release_process_state()


def test_every_spelling_of_a_uri_has_one_canonical_form() -> None:
    @INVARIANT_SETTINGS
    @given(spelling=spellings(DENIED))
    def check(spelling: str) -> None:
        canonical = naming.canonical_uri(spelling)
        assert canonical == naming.canonical_uri(DENIED), (spelling, canonical)
        assert naming.canonical_uri(canonical) == canonical

    check()

