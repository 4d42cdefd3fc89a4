"""The per-worker caches of the call path (fedmcp_lib/caching.py) and the batched audit trail.

What must never weaken: a revoked token, a revoked grant, a new deny policy, a disabled peer
or a closed session take effect at the next message, in whichever process the change was
made; a token's expiry is honoured exactly. tests/e2e/test_cache_invalidation.py proves the
same across real processes.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from unittest import mock

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from django.test import SimpleTestCase, TransactionTestCase, override_settings
from django.utils import timezone
from oauth2_provider.models import AccessToken

from federation import catalog, router
from federation.models import CatalogEntry, CatalogKind, Peer
from federation.services import catalog_set_enabled, peer_set_enabled
from fedmcp_lib import caching
from identity import audit
from identity.consent import decisions
from identity.consent.policy import Decision, consent_grant_revoke
from identity.hostauth import tokens
from identity.models import AuditEvent, ConsentDecision, ConsentGrant, ConsentPolicy
from mcp_endpoint import sessions
from tests.base import ALICE, audience, mint_token, persona

ROOT = Path(__file__).resolve().parents[2]


# --- generations ---------------------------------------------------------------------------------


class GenerationCacheTests(SimpleTestCase):
    def test_a_value_is_served_until_its_domain_changes(self) -> None:
        cache: caching.GenerationCache[str] = caching.GenerationCache("test", ("catalog",))
        cache.put("k", "v", cache.stamp())
        assert cache.get("k") == "v"

        caching.bump("tokens")
        assert cache.get("k") == "v", "another domain changed"
        caching.bump("catalog")
        assert cache.get("k") is caching.MISSING

    def test_a_value_read_before_a_change_is_not_kept(self) -> None:
        cache: caching.GenerationCache[str] = caching.GenerationCache("test", ("consent",))
        stamp = cache.stamp()  # taken before the (slow) read ...
        caching.bump("consent")  # ... which a change overtakes
        cache.put("k", "stale", stamp)
        assert cache.get("k") is caching.MISSING

    def test_nothing_is_cached_while_the_shared_generations_are_unreadable(self) -> None:
        cache: caching.GenerationCache[str] = caching.GenerationCache("test", ("sessions",))
        caching.generations.shared = None
        assert cache.stamp() is None
        cache.put("k", "v", cache.stamp())
        assert cache.get("k") is caching.MISSING

    def test_an_older_read_of_the_generations_never_wins_over_a_newer_one(self) -> None:
        class Slow:
            """Answers reads in the order the test releases them."""

            def __init__(self) -> None:
                self.gates: list[tuple[asyncio.Event, dict[str, str]]] = []

            async def read(self) -> dict[str, str]:
                gate = asyncio.Event()
                answer = {"tokens": f"g{len(self.gates)}"}
                self.gates.append((gate, answer))
                await gate.wait()
                return answer

        async def scenario() -> dict[str, str] | None:
            worker = caching.Generations()
            worker._backend = Slow()
            older = asyncio.create_task(worker.refresh())
            await asyncio.sleep(0)
            newer = asyncio.create_task(worker.refresh())
            await asyncio.sleep(0)
            worker._backend.gates[1][0].set()
            await newer
            worker._backend.gates[0][0].set()
            await older
            return worker.shared

        assert async_to_sync(scenario)() == {"tokens": "g1"}

    def test_the_cache_is_bounded(self) -> None:
        cache: caching.GenerationCache[int] = caching.GenerationCache("test", ("catalog",), maxsize=3)
        for i in range(5):
            cache.put(i, i, cache.stamp())
        assert len(cache) == 3
        assert cache.get(0) is caching.MISSING and cache.get(4) == 4

    def test_an_entry_is_not_used_past_the_maximum_age(self) -> None:
        cache: caching.GenerationCache[str] = caching.GenerationCache("test", ("catalog",))
        cache.put("k", "v", cache.stamp())
        with override_settings(FEDMCP_CACHE_MAX_AGE=0):
            # override_settings empties the caches too: store again under the new settings.
            cache.put("k", "v", cache.stamp())
            assert cache.get("k") is caching.MISSING

    @override_settings(FEDMCP_CACHES_ENABLED=False)
    def test_caching_can_be_switched_off(self) -> None:
        cache: caching.GenerationCache[str] = caching.GenerationCache("test", ("catalog",))
        cache.put("k", "v", cache.stamp())
        assert cache.get("k") is caching.MISSING


class RoundTrip:
    """A backend like Redis's: each read is a round trip, answered with the generation current when it was sent.

    Reads wait for `gate` (set at first: the test clears it to hold reads on their way).
    """

    shared_reads = True

    def __init__(self) -> None:
        self.generation = 0
        self.reads = 0
        self.fail_from = 0  # reads from this number on raise (0: none)
        self.gate = asyncio.Event()
        self.gate.set()

    async def read(self) -> dict[str, str]:
        self.reads += 1
        number, answer = self.reads, {"tokens": f"g{self.generation}"}
        await self.gate.wait()
        if self.fail_from and number >= self.fail_from:
            raise RuntimeError("connection reset")
        return answer


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0)


class SharedReadTests(SimpleTestCase):
    def test_requests_that_arrive_while_a_read_is_on_its_way_share_the_next(self) -> None:
        async def scenario() -> tuple[int, dict[str, str] | None]:
            worker = caching.Generations()
            worker._backend = backend = RoundTrip()
            backend.gate.clear()
            first = asyncio.create_task(worker.refresh())
            await until(lambda: backend.reads == 1)
            others = [asyncio.create_task(worker.refresh()) for _ in range(9)]
            await asyncio.sleep(0.01)
            backend.gate.set()
            await asyncio.gather(first, *others)
            return backend.reads, worker.shared

        assert async_to_sync(scenario)() == (2, {"tokens": "g0"})

    def test_a_request_alone_sends_its_read_at_once(self) -> None:
        async def scenario() -> int:
            worker = caching.Generations()
            worker._backend = backend = RoundTrip()
            for _ in range(3):
                await worker.refresh()
            return backend.reads

        assert async_to_sync(scenario)() == 3

    def test_a_request_that_arrives_after_a_read_was_sent_sees_changes_published_before_it_came(self) -> None:
        async def scenario() -> tuple[int, dict[str, str] | None]:
            worker = caching.Generations()
            worker._backend = backend = RoundTrip()
            backend.gate.clear()
            early = asyncio.create_task(worker.refresh())
            await until(lambda: backend.reads == 1)  # on its way, answering g0
            backend.generation = 1  # another worker publishes a change ...
            late = asyncio.create_task(worker.refresh())  # ... before this request arrives
            await asyncio.sleep(0.01)
            backend.gate.set()
            await asyncio.gather(early, late)
            return backend.reads, worker.shared

        # Had the late request used the read already on its way, it would have had g0.
        assert async_to_sync(scenario)() == (2, {"tokens": "g1"})

    def test_cancelled_requests_do_not_cancel_the_reads_the_others_wait_for(self) -> None:
        async def scenario() -> tuple[bool, bool, int, dict[str, str] | None]:
            worker = caching.Generations()
            worker._backend = backend = RoundTrip()
            backend.gate.clear()
            sender = asyncio.create_task(worker.refresh())
            await until(lambda: backend.reads == 1)
            leaving, staying = asyncio.create_task(worker.refresh()), asyncio.create_task(worker.refresh())
            await asyncio.sleep(0.01)
            backend.generation = 1
            sender.cancel()
            leaving.cancel()
            await asyncio.sleep(0.01)
            backend.gate.set()
            await staying
            return sender.cancelled(), leaving.cancelled(), backend.reads, worker.shared

        assert async_to_sync(scenario)() == (True, True, 2, {"tokens": "g1"})

    def test_a_failed_shared_read_turns_the_caches_off_for_the_requests_that_waited(self) -> None:
        async def scenario() -> dict[str, str] | None:
            worker = caching.Generations()
            worker._backend = backend = RoundTrip()
            backend.gate.clear()
            backend.fail_from = 2
            first = asyncio.create_task(worker.refresh())
            await until(lambda: backend.reads == 1)
            waiting = asyncio.create_task(worker.refresh())
            await asyncio.sleep(0.01)
            backend.gate.set()
            await asyncio.gather(first, waiting)
            return worker.shared

        assert async_to_sync(scenario)() is None


class FileGenerationTests(SimpleTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name) / "db.sqlite3.cachegen"

    def tearDown(self) -> None:
        self.dir.cleanup()

    def test_a_change_published_by_another_process_is_seen_at_the_next_refresh(self) -> None:
        worker = caching.Generations()
        worker._backend = caching._FileGenerations(self.path)
        async_to_sync(worker.refresh)()
        before = worker.stamp(("tokens", "catalog"))

        code = f"from pathlib import Path; from fedmcp_lib.caching import _FileGenerations; _FileGenerations(Path({str(self.path)!r})).bump(['tokens'])"
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
        assert worker.stamp(("tokens", "catalog")) == before, "not seen before the request reads them"

        async_to_sync(worker.refresh)()
        after = worker.stamp(("tokens", "catalog"))
        assert after[0] != before[0] and after[1] == before[1]

    def test_an_unchanged_file_is_not_read_again_and_a_replaced_one_is(self) -> None:
        backend = caching._FileGenerations(self.path)
        backend.bump(["sessions"])
        first = backend.read_sync()
        with mock.patch("fedmcp_lib.caching.os.open", wraps=os.open) as opened:
            assert [backend.read_sync() for _ in range(5)] == [first] * 5
            assert opened.call_count == 0
            backend.bump(["catalog"])  # a new file renamed over the old one (its own open: the lock)
            opened.reset_mock()
            second = backend.read_sync()
        assert opened.call_count == 1
        assert second["sessions"] == first["sessions"] and second["catalog"] != first.get("catalog")

    def test_a_file_rewritten_in_place_is_read_again(self) -> None:
        backend = caching._FileGenerations(self.path)
        self.path.write_text("tokens=aaaa\n")
        assert backend.read_sync() == {"tokens": "aaaa"}
        with open(self.path, "w") as same_file:  # same inode, not the atomic replace bump() does
            same_file.write("tokens=bbbbbb\n")
        assert backend.read_sync() == {"tokens": "bbbbbb"}

    def test_every_bump_gives_a_new_generation(self) -> None:
        backend = caching._FileGenerations(self.path)
        seen = set()
        for _ in range(20):
            backend.bump(["sessions"])
            seen.add(backend.read_sync()["sessions"])
        assert len(seen) == 20


# --- tokens --------------------------------------------------------------------------------------


class TokenCacheTests(TransactionTestCase):
    def setUp(self) -> None:
        self.raw = mint_token(ALICE)

    async def authenticate(self, raw: str | None = None) -> tokens.Identity:
        await caching.refresh()
        return await tokens.authenticate(raw or self.raw, audience())

    async def test_a_warm_token_is_not_read_from_the_database_again(self) -> None:
        await self.authenticate()
        with mock.patch("identity.hostauth.tokens._authenticate", side_effect=AssertionError("read again")):
            identity = await self.authenticate()
        assert identity.username == ALICE

    async def test_a_revoked_token_is_refused_at_the_next_request(self) -> None:
        identity = await self.authenticate()
        assert await tokens.still_valid(identity)
        await AccessToken.objects.filter(pk=identity.token_id).adelete()

        with pytest.raises(tokens.TokenError):
            await self.authenticate()
        assert not await tokens.still_valid(identity)

    async def test_expiry_is_honoured_exactly_on_a_cached_token(self) -> None:
        identity = await self.authenticate()
        with mock.patch("identity.hostauth.tokens.timezone.now", return_value=identity.expires - timedelta(microseconds=1)):
            assert (await self.authenticate()).token_id == identity.token_id
            assert await tokens.still_valid(identity)
        with mock.patch("identity.hostauth.tokens.timezone.now", return_value=identity.expires):
            with pytest.raises(tokens.TokenError, match="expired"):
                await self.authenticate()
            assert not await tokens.still_valid(identity)

    async def test_a_changed_token_is_read_again(self) -> None:
        identity = await self.authenticate()
        token = await AccessToken.objects.aget(pk=identity.token_id)
        token.scope = "mcp:tools"
        await token.asave()
        assert (await self.authenticate()).scopes == frozenset({"mcp:tools"})


# --- sessions ------------------------------------------------------------------------------------


class SessionCacheTests(TransactionTestCase):
    async def start(self) -> None:
        raw = await database_sync_to_async(mint_token)(ALICE)
        await caching.refresh()
        self.identity = await tokens.authenticate(raw, audience())
        self.session = await sessions.session_create(transport="streamable-http", scope="", identity=self.identity)

    async def test_a_closed_session_is_gone_at_the_next_message(self) -> None:
        await self.start()
        assert await sessions.session_load(self.session.id, self.identity) is not None
        assert await sessions.session_close(session_id=self.session.id)
        assert await sessions.session_load(self.session.id, self.identity) is None

    async def test_a_session_is_served_only_to_its_owner(self) -> None:
        await self.start()
        assert await sessions.session_load(self.session.id, self.identity) is not None
        other = tokens.Identity(**{**self.identity.__dict__, "user_id": (self.identity.user_id or 0) + 1})
        assert await sessions.session_load(self.session.id, other) is None

    async def test_a_level_set_on_another_worker_is_read_again(self) -> None:
        await self.start()
        cached = await sessions.session_load(self.session.id, self.identity)
        # What another worker does: its own copy of the row, then the update.
        elsewhere = await sessions._session_load(self.session.id, self.identity)
        await sessions.session_set_log_level(session=elsewhere, level="error")
        fresh = await sessions.session_load(self.session.id, self.identity)
        assert fresh is not cached and fresh.log_level == "error"


# --- routes and lists ----------------------------------------------------------------------------


class CatalogCacheTests(TransactionTestCase):
    def setUp(self) -> None:
        self.peer = Peer.objects.create(name="files", transport="streamable-http", url="http://127.0.0.1:9/mcp")
        self.entry = CatalogEntry.objects.create(
            peer=self.peer, kind=CatalogKind.TOOL, upstream_name="read", name="files__read", home="files", position=0, payload={"name": "read"}
        )

    async def names(self) -> list[str]:
        return [item["name"] for item in await catalog.list_items("", CatalogKind.TOOL)]

    async def test_a_disabled_peer_disappears_at_once(self) -> None:
        assert (await router.resolve("", CatalogKind.TOOL, "files__read")).upstream_name == "read"
        assert await self.names() == ["files__read"]
        assert await router.peer_for_scope("files") is not None

        await peer_set_enabled(peer_ids=[self.peer.pk], enabled=False)  # a QuerySet.update()

        with pytest.raises(router.NotRoutableError):
            await router.resolve("", CatalogKind.TOOL, "files__read")
        assert await self.names() == []
        assert await router.peer_for_scope("files") is None

    async def test_a_tool_switched_off_disappears_and_a_new_one_appears(self) -> None:
        with pytest.raises(router.NotRoutableError):
            await router.resolve("", CatalogKind.TOOL, "files__write")
        await catalog_set_enabled(entry_ids=[self.entry.pk], enabled=False)
        await CatalogEntry.objects.acreate(
            peer=self.peer, kind=CatalogKind.TOOL, upstream_name="write", name="files__write", home="files", position=1, payload={"name": "write"}
        )
        assert await self.names() == ["files__write"]
        assert (await router.resolve("", CatalogKind.TOOL, "files__write")).upstream_name == "write"
        with pytest.raises(router.NotRoutableError):
            await router.resolve("", CatalogKind.TOOL, "files__read")

    async def test_changed_credentials_are_used_at_the_next_call(self) -> None:
        assert (await router.resolve("", CatalogKind.TOOL, "files__read")).peer.client_id == ""
        self.peer.client_id = "gateway-a"
        await self.peer.asave()
        assert (await router.resolve("", CatalogKind.TOOL, "files__read")).peer.client_id == "gateway-a"


# --- consent -------------------------------------------------------------------------------------


class ConsentCacheTests(TransactionTestCase):
    def setUp(self) -> None:
        self.user = persona(ALICE)
        self.identity = tokens.Identity(
            token_id=1, user_id=self.user.pk, username=ALICE, application_id=None, client_id="host",
            scopes=frozenset(), expires=timezone.now() + timedelta(hours=1),
        )

    async def decide(self) -> Decision:
        return await decisions.consent_decide(identity=self.identity, peer="files", kind="tool", name="read")

    @override_settings(FEDMCP_CONSENT_DEFAULT="allow")
    async def test_a_deny_policy_applies_to_the_next_call(self) -> None:
        assert (await self.decide()).action == ConsentDecision.ALLOW
        with mock.patch("identity.consent.policy.decision_load", side_effect=AssertionError("decided again")):
            assert (await self.decide()).action == ConsentDecision.ALLOW
        policy = await ConsentPolicy.objects.acreate(peer="files", decision="deny")
        assert (await self.decide()).action == ConsentDecision.DENY
        await policy.adelete()
        assert (await self.decide()).action == ConsentDecision.ALLOW

    async def test_a_revoked_grant_applies_to_the_next_call(self) -> None:
        await ConsentPolicy.objects.acreate(peer="files", decision="ask")
        assert (await self.decide()).action == ConsentDecision.ASK
        grant = await ConsentGrant.objects.acreate(
            user=self.user, peer="files", kind="tool", name="read", expires_at=timezone.now() + timedelta(hours=1)
        )
        assert (await self.decide()).grant_id == grant.pk
        await database_sync_to_async(consent_grant_revoke)(grant=grant)  # a QuerySet.update()
        assert (await self.decide()).action == ConsentDecision.ASK

    async def test_a_cached_grant_is_not_used_past_its_expiry(self) -> None:
        await ConsentPolicy.objects.acreate(peer="files", decision="ask")
        expires = timezone.now() + timedelta(hours=1)
        await ConsentGrant.objects.acreate(user=self.user, peer="files", kind="tool", name="read", expires_at=expires)
        assert (await self.decide()).action == ConsentDecision.ALLOW
        with mock.patch("django.utils.timezone.now", return_value=expires):
            assert (await self.decide()).action == ConsentDecision.ASK

    @override_settings(FEDMCP_CONSENT_DEFAULT="ask-new-peers")
    async def test_the_first_successful_call_counts_even_before_its_audit_row_is_written(self) -> None:
        assert (await self.decide()).action == ConsentDecision.ASK
        with override_settings(FEDMCP_AUDIT_FLUSH_INTERVAL=60):
            # The first call the user approved (only an allowed or approved call counts: identity/consent/policy.py PEER_USED_DECISIONS).
            audit.audit_record(identity=self.identity, peer="files", method="tools/call", name="read", error_code=None, latency_ms=1.0, decision="approved")
            assert (await self.decide()).action == ConsentDecision.ALLOW

    async def test_a_federated_users_decisions_are_not_kept(self) -> None:
        federated = tokens.Identity(**{**self.identity.__dict__, "federated_issuer": "https://a.example", "federated_subject": "alice"})
        with override_settings(FEDMCP_CONSENT_DEFAULT="allow"):
            await decisions.consent_decide(identity=federated, peer="files", kind="tool", name="read")
            with mock.patch("identity.consent.policy.decision_load", return_value=Decision(ConsentDecision.DENY)) as decide:
                await decisions.consent_decide(identity=federated, peer="files", kind="tool", name="read")
            assert decide.called


# --- the audit trail -----------------------------------------------------------------------------


class AuditBatchTests(TransactionTestCase):
    def record(self, n: int) -> None:
        for i in range(n):
            audit.audit_record(identity=None, peer="files", method="tools/call", name=f"t{i}", error_code=None, latency_ms=1.0)

    @override_settings(FEDMCP_AUDIT_FLUSH_INTERVAL=60)
    async def test_events_are_written_together_when_flushed(self) -> None:
        with mock.patch.object(audit, "_insert_rows", wraps=audit._insert_rows) as bulk:
            self.record(5)
            assert audit.audit_pending() == 5
            await audit.audit_flush()
        assert bulk.call_count == 1
        assert audit.audit_pending() == 0
        assert sorted(await database_sync_to_async(list)(AuditEvent.objects.values_list("name", flat=True))) == [f"t{i}" for i in range(5)]

    @override_settings(FEDMCP_AUDIT_FLUSH_INTERVAL=60)
    async def test_a_refused_batch_is_written_one_event_at_a_time(self) -> None:
        with mock.patch.object(audit, "_insert_rows", side_effect=RuntimeError("refused")):
            self.record(3)
            await audit.audit_flush()
        assert await AuditEvent.objects.acount() == 3

    @override_settings(FEDMCP_AUDIT_FLUSH_INTERVAL=60, FEDMCP_AUDIT_BATCH_SIZE=4)
    async def test_a_full_batch_does_not_wait_for_the_interval(self) -> None:
        self.record(4)
        # No flush: the writer wakes for a full batch. Bounded wait, far below the 60 s interval.
        for _ in range(200):
            if await AuditEvent.objects.acount() == 4:
                break
            await asyncio.sleep(0.05)
        assert await AuditEvent.objects.acount() == 4
