"""Per-worker caches of the call path, kept correct across processes by shared generations.

Each worker keeps in memory what every call would otherwise read from the database: the
identity behind a bearer token, the route table, the session row, consent decisions and the
aggregated lists. Each cache belongs to one or more *domains* ("tokens", "sessions",
"consent", "catalog"). A domain has a **generation**: a token that changes whenever something
in the domain changes, in any process. An entry is stored with the generations read *before*
its data was loaded, and is used only while they are still current.

Generations live where every process of one installation can see them:

* with `REDIS_URL`: Redis keys `<FEDMCP_REDIS_PREFIX>:cachegen:<domain>` (INCR on change, one
  MGET per request; the requests that arrive while an MGET is on its way share the next one,
  sent when it is answered);
* otherwise: a small file next to the SQLite database (or `FEDMCP_CACHE_GENERATION_FILE`),
  rewritten atomically on change and checked once per request (a `stat`; read when it changed);
* an in-memory SQLite database (tests) has no other process: in-process counters only.

Entries are also dropped after FEDMCP_CACHE_MAX_AGE seconds (30), a safety net should a
change ever go unpublished (Redis unreachable from the process that made it).

A change is published twice: at once (so this process and a test transaction that never
commits see it) and again after the transaction commits (so another worker that re-read the
old rows in between drops them). What changes is found by model signals (`bump_on_change`, wired by each app's AppConfig.ready())
and, for `QuerySet.update()` calls that signals cannot see, by explicit `bump()` calls.

`refresh()` reads the shared generations; the MCP edge (mcp_endpoint/auth.py) calls it once
per HTTP request and per WebSocket message, before the token is looked at. If the shared
generations cannot be read, caching is off for that request (everything is read from the
database): failure never serves stale data.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Any, Generic, TypeVar

from django.conf import settings
from django.db import connections, transaction

logger = logging.getLogger(__name__)

DOMAINS = ("tokens", "sessions", "consent", "catalog")
T = TypeVar("T")
MISSING: Any = object()
Stamp = tuple[Any, ...]


_flags: tuple[bool, float] | None = None
"""(FEDMCP_CACHES_ENABLED, FEDMCP_CACHE_MAX_AGE), read once: they are asked several times a
request. Forgotten by `clear_all`, which runs on every settings change (`clear_on_setting_change`)."""


def _settings_flags() -> tuple[bool, float]:
    global _flags
    flags = _flags
    if flags is None:
        flags = _flags = (bool(getattr(settings, "FEDMCP_CACHES_ENABLED", True)), float(getattr(settings, "FEDMCP_CACHE_MAX_AGE", 30.0)))
    return flags


def enabled() -> bool:
    return _settings_flags()[0]


def max_age() -> float:
    """Seconds an entry may be used at most: the safety net should a change go unpublished."""
    return _settings_flags()[1]


# --- where the shared generations live -------------------------------------------------------


class _LocalOnly:
    """No other process can change the data (an in-memory database): nothing is shared."""

    name = "local"

    async def read(self) -> dict[str, str] | None:
        return {}

    def bump(self, domains: Iterable[str]) -> None:
        return None


def _read_fd(fd: int) -> bytes:
    parts = []
    while chunk := os.read(fd, 65536):
        parts.append(chunk)
    return b"".join(parts)


class _FileGenerations:
    """One small file of `domain=token` lines, replaced atomically under a lock file.

    It is read once per request, so the common case, nothing changed, costs one `stat`: a bump
    writes a new file and renames it over the old one, so the file this process last read is
    current exactly while the path still names it (device and inode, with size and mtime as a
    guard against a change made in place). That file is kept open, so its inode cannot be reused
    by a later version while it is compared with.
    """

    name = "file"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        self._last: tuple[tuple[int, int, int, int] | None, int | None, dict[str, str]] = (None, None, {})
        """(identity of the file read, its open descriptor, what it said), swapped as one."""
        self._reading = threading.Lock()

    def _parse(self, text: str) -> dict[str, str]:
        values: dict[str, str] = {}
        for line in text.splitlines():
            domain, _, token = line.partition("=")
            if token:
                values[domain] = token
        return values

    def read_sync(self) -> dict[str, str] | None:
        try:
            st = os.stat(self.path)
            last = self._last  # threads may read at the same time: one attribute, read once
            if last[0] == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns):
                return dict(last[2])
            return dict(self._read_changed())
        except FileNotFoundError:
            return {}
        except OSError as exc:
            logger.warning("cache generations unreadable (%s): caching is off for this request", exc)
            return None

    def __del__(self) -> None:
        fd = self._last[1]
        if fd is not None:
            with contextlib.suppress(Exception):
                os.close(fd)

    def _read_changed(self) -> dict[str, str]:
        with self._reading:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                st = os.fstat(fd)  # of the file opened: the path may name a newer one already
                values = self._parse(_read_fd(fd).decode())
            except BaseException:
                os.close(fd)
                raise
            old_fd = self._last[1]
            self._last = ((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), fd, values)
            if old_fd is not None:
                os.close(old_fd)
            return values

    async def read(self) -> dict[str, str] | None:
        # A few microseconds on a local file: cheaper than a hop to a thread.
        return self.read_sync()

    def bump(self, domains: Iterable[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                values = self.read_sync() or {}
                for domain in domains:
                    values[domain] = secrets.token_hex(8)
                tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
                tmp.write_text("".join(f"{k}={v}\n" for k, v in sorted(values.items())))
                os.replace(tmp, self.path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


class _RedisGenerations:
    """Redis counters: INCR on change, one MGET per request (one async client per event loop)."""

    name = "redis"
    shared_reads = True
    """A read is a round trip: the requests that arrive while one is on its way share the next (`Generations.refresh`)."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix
        self._client: Any = None
        self._loop_id: int | None = None
        self._sync: Any = None

    def key(self, domain: str) -> str:
        return f"{self.prefix}:{domain}"

    async def read(self) -> dict[str, str] | None:
        import redis.asyncio

        loop_id = id(asyncio.get_running_loop())
        if self._loop_id != loop_id:
            self._client = redis.asyncio.Redis.from_url(self.url, socket_connect_timeout=2.0, socket_timeout=2.0)
            self._loop_id = loop_id
        try:
            values = await self._client.mget([self.key(d) for d in DOMAINS])
        except Exception as exc:
            logger.warning("cache generations unreadable in Redis (%s): caching is off for this request", exc)
            return None
        return {d: (v.decode() if isinstance(v, bytes) else "0") for d, v in zip(DOMAINS, values, strict=True)}

    def bump(self, domains: Iterable[str]) -> None:
        import redis

        if self._sync is None:
            self._sync = redis.Redis.from_url(self.url, socket_connect_timeout=2.0, socket_timeout=2.0)
        pipe = self._sync.pipeline(transaction=False)
        for domain in domains:
            pipe.incr(self.key(domain))
        pipe.execute()

    async def close(self) -> None:
        client, self._client, self._loop_id = self._client, None, None
        if client is not None:
            await client.aclose()


def _backend() -> _LocalOnly | _FileGenerations | _RedisGenerations:
    if getattr(settings, "REDIS_URL", None):
        prefix = getattr(settings, "FEDMCP_CACHE_REDIS_PREFIX", "") or f"{os.environ.get('FEDMCP_REDIS_PREFIX', 'fedmcp')}:cachegen"
        return _RedisGenerations(settings.REDIS_URL, prefix)
    configured = getattr(settings, "FEDMCP_CACHE_GENERATION_FILE", "")
    if configured:
        return _FileGenerations(Path(configured))
    db = connections["default"].settings_dict
    name = str(db.get("NAME") or "")
    if db["ENGINE"].endswith("sqlite3"):
        if not name or name == ":memory:" or "mode=memory" in name:
            return _LocalOnly()
        return _FileGenerations(Path(f"{name}.cachegen"))
    # A server database without Redis: every process on this host shares the file.
    digest = hashlib.sha256(f"{db.get('HOST')}:{db.get('PORT')}/{name}".encode()).hexdigest()[:16]
    return _FileGenerations(Path(settings.BASE_DIR) / "var" / f"cachegen-{digest}")


# --- the generations this process knows --------------------------------------------------------


class Generations:
    """This process's view of every domain's generation: local counter plus shared token."""

    def __init__(self) -> None:
        self.local = dict.fromkeys(DOMAINS, 0)
        self.shared: dict[str, str] | None = {}
        self._backend: Any = None
        self._lock = threading.Lock()
        self._issued = 0
        self._applied = 0
        self._reading: asyncio.AbstractEventLoop | None = None
        """The loop a shared read is on its way in (backends with `shared_reads`), else None."""
        self._next_read: asyncio.Future[None] | None = None
        """What the requests that arrived while that read was on its way wait for: the next read."""
        self.version = 0
        """Changes whenever a local counter or the shared generations change (stamps are kept until then)."""

    @property
    def backend(self) -> Any:
        if self._backend is None:
            self._backend = _backend()
        return self._backend

    async def refresh(self) -> None:
        """Read the shared generations (once per request, before any cache is consulted).

        With a backend whose read is a network round trip, a request that arrives while a read
        is on its way does not send its own: the requests that arrive meanwhile share the next
        read, sent as soon as that one is answered. Each still sees every change published
        before it came in (its read is sent after it arrived), with one MGET per round trip
        instead of one per request. A request that finds no read on its way sends one at once.
        """
        if not enabled():
            return
        backend = self.backend
        loop = asyncio.get_running_loop()
        if not getattr(backend, "shared_reads", False) or (self._reading is not None and self._reading is not loop):
            await self._read(backend)
            return
        if self._reading is None:
            self._reading = loop
            try:
                await self._read(backend)
            finally:
                self._send_next_read(backend)
            return
        if self._next_read is None:
            self._next_read = loop.create_future()
        # Shielded: a request cancelled while waiting must not cancel the others' read.
        await asyncio.shield(self._next_read)

    def _send_next_read(self, backend: Any) -> None:
        """A read was answered: send one for the requests that arrived meanwhile, if any."""
        waiting, self._next_read = self._next_read, None
        if waiting is None:
            self._reading = None
            return
        task = asyncio.get_running_loop().create_task(self._read(backend))
        task.add_done_callback(lambda done: self._next_read_done(done, waiting, backend))

    def _next_read_done(self, task: asyncio.Task[None], waiting: asyncio.Future[None], backend: Any) -> None:
        if task.cancelled() or task.exception() is not None:
            # Not known now (the read itself failed, or was cancelled at shutdown): nothing is
            # served from the caches until a read succeeds, as when the backend answers None.
            self.shared = None
            self.version += 1
        if not waiting.done():
            waiting.set_result(None)
        self._send_next_read(backend)

    async def _read(self, backend: Any) -> None:
        self._issued += 1
        ticket = self._issued
        shared = await backend.read()
        # Concurrent reads may complete out of order: never go back to an older answer.
        if ticket > self._applied:
            self._applied = ticket
            if shared != self.shared:
                self.shared = shared
                self.version += 1

    def stamp(self, domains: tuple[str, ...]) -> Stamp | None:
        """The generations of `domains` now, or None when caching is off."""
        shared = self.shared
        if shared is None or not enabled():
            return None
        return tuple((self.local[d], shared.get(d, "")) for d in domains)

    def bump(self, *domains: str) -> None:
        """Mark `domains` changed: here at once, everywhere now and again after commit."""
        with self._lock:
            for domain in domains:
                self.local[domain] += 1
            self.version += 1
        self._publish(domains)
        if transaction.get_connection().in_atomic_block:
            transaction.on_commit(lambda: self._after_commit(domains))

    def _after_commit(self, domains: tuple[str, ...]) -> None:
        with self._lock:
            for domain in domains:
                self.local[domain] += 1
            self.version += 1
        self._publish(domains)

    def _publish(self, domains: tuple[str, ...]) -> None:
        try:
            self.backend.bump(domains)
        except Exception:
            # Another worker cannot learn of the change: say so loudly; its caches would be stale.
            logger.exception("could not publish a cache generation change for %s", ", ".join(domains))

    def reset(self) -> None:
        """Forget the backend and drop every cache entry (tests; settings changes)."""
        with self._lock:
            for domain in DOMAINS:
                self.local[domain] += 1
            self.version += 1
        self._backend = None
        self.shared = {}


generations = Generations()


async def refresh() -> None:
    await generations.refresh()


def bump(*domains: str) -> None:
    generations.bump(*domains)


# --- a cache bound to domains --------------------------------------------------------------------


class GenerationCache(Generic[T]):
    """A bounded dict whose entries are valid while the generations of `domains` are unchanged.

    Use: `stamp = cache.stamp()` *before* reading the database, then `cache.put(key, value,
    stamp)`. `get` returns MISSING for anything stored under other generations.
    """

    def __init__(self, name: str, domains: tuple[str, ...], maxsize: int = 10_000) -> None:
        self.name = name
        self.domains = domains
        self.maxsize = maxsize
        self._entries: dict[Hashable, tuple[Stamp, float, T]] = {}
        self._current: Stamp | None = None
        self._version = -1
        """`generations.version` when `_current` was computed: until it changes, `_current` stands."""
        _caches.append(self)

    def stamp(self) -> Stamp | None:
        version = generations.version
        if version == self._version:
            return self._current
        stamp = generations.stamp(self.domains)
        if stamp != self._current:
            # A new generation: everything stored under the old one is dead weight.
            self._entries.clear()
            self._current = stamp
        self._version = version
        return stamp

    def get(self, key: Hashable) -> T:
        stamp = self.stamp()
        if stamp is None:
            return MISSING
        entry = self._entries.get(key)
        if entry is None or entry[0] != stamp or time.monotonic() - entry[1] >= max_age():
            return MISSING
        return entry[2]

    def put(self, key: Hashable, value: T, stamp: Stamp | None) -> None:
        if stamp is None or stamp != self._current:
            return
        if len(self._entries) >= self.maxsize:
            # Drop the oldest entry (dicts keep insertion order).
            self._entries.pop(next(iter(self._entries)))
        self._entries[key] = (stamp, time.monotonic(), value)

    def discard(self, key: Hashable) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


_caches: list[GenerationCache[Any]] = []


def clear_all() -> None:
    """Empty every cache in this process (tests call this between cases; every settings change)."""
    global _flags
    _flags = None
    generations.reset()
    for cache in _caches:
        cache.clear()


async def cached(cache: GenerationCache[T], key: Hashable, load: Callable[[], Any]) -> T:
    """Return the cached value for `key`, else `await load()` and keep it."""
    value = cache.get(key)
    if value is not MISSING:
        return value
    stamp = cache.stamp()
    value = await load()
    cache.put(key, value, stamp)
    return value


async def close() -> None:
    """Close this worker's Redis client (at shutdown)."""
    backend = generations._backend
    if isinstance(backend, _RedisGenerations):
        with contextlib.suppress(Exception):
            await backend.close()


# --- what changes which domain ------------------------------------------------------------------


def bump_on_change(model: Any, *domains: str, skip_created: bool = False) -> None:
    """Bump `domains` whenever a row of `model` is saved or deleted, in whatever process does it.

    Each app calls this for its own models in its AppConfig.ready(). `skip_created`: a new row
    is simply a cache miss (tokens, sessions); only changes and deletions invalidate.
    """
    from django.db.models.signals import post_delete, post_save

    def receiver(sender: Any, created: bool = False, **kwargs: Any) -> None:
        if skip_created and created:
            return
        bump(*domains)

    uid = f"fedmcp.caching.{model._meta.label}"
    post_save.connect(receiver, sender=model, weak=False, dispatch_uid=uid + ".save")
    post_delete.connect(receiver, sender=model, weak=False, dispatch_uid=uid + ".delete")


def bump_on_m2m_change(through: Any, *domains: str) -> None:
    """Bump `domains` whenever the many-to-many relation `through` changes."""
    from django.db.models.signals import m2m_changed

    m2m_changed.connect(lambda **kwargs: bump(*domains), sender=through, weak=False, dispatch_uid=f"fedmcp.caching.{through._meta.label}")


def clear_on_setting_change() -> None:
    """Forget every cache when a setting changes (tests' override_settings): decisions depend on settings, the database may be another."""
    from django.core.signals import setting_changed

    setting_changed.connect(_on_setting_changed, weak=False, dispatch_uid="fedmcp.caching.settings")


def _on_setting_changed(**kwargs: Any) -> None:
    # Decisions depend on settings (FEDMCP_CONSENT_DEFAULT, …); the database may be another.
    clear_all()
