"""Settings for fedmcp, driven by environment variables.

The defaults run a fresh checkout on SQLite with the in-memory channel layer in one daphne
process. `DATABASE_URL` (PostgreSQL) and `REDIS_URL` (channels-redis) switch to the scale-out
setup where several workers share state.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from pathlib import Path
from urllib.parse import urlsplit

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from identity.hostauth import scopes as scope_names

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool) -> bool:
    """Read a boolean that must be spelled "True" or "False"."""
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value not in ("True", "False"):
        raise ImproperlyConfigured(f"{name} must be 'True' or 'False', got {value!r}")
    return value == "True"


def env_int(name: str, default: int) -> int:
    """Read an integer setting, failing loudly on anything else."""
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be an integer, got {value!r}") from exc


def env_float(name: str, default: float) -> float:
    """Read a float setting, failing loudly on anything else."""
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be a number, got {value!r}") from exc


def env_list(name: str, default: list[str]) -> list[str]:
    """Read a comma-separated list."""
    value = os.environ.get(name)
    if value is None:
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


def env_secret(name: str) -> str | None:
    """Read a secret from NAME_FILE (preferred) or NAME; a named file that is missing is fatal."""
    path = os.environ.get(f"{name}_FILE")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise ImproperlyConfigured(f"{name}_FILE={path!r} cannot be read: {exc}") from exc
    return os.environ.get(name) or None


def _local_secret_key() -> str:
    """Return a per-checkout secret kept in var/secret_key, creating it on first use.

    A fresh checkout must run without configuration, yet no secret may be committed: the key
    is generated locally and never leaves the machine.
    """
    path = BASE_DIR / "var" / "secret_key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(50))
    return path.read_text().strip()


SECRET_KEY = env_secret("FEDMCP_SECRET_KEY") or _local_secret_key()
DEBUG = env_bool("FEDMCP_DEBUG", False)
ALLOWED_HOSTS = env_list("FEDMCP_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "oauth2_provider",
    "identity",
    "federation",
    "mcp_endpoint",
    "console",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Serves the admin's static files from daphne itself, so `make run` needs no web server.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "fedmcp_site.urls"
ASGI_APPLICATION = "fedmcp_site.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------
# SQLite by default; DATABASE_URL=postgres://... for the scale-out setup.
_default_sqlite = f"sqlite:///{BASE_DIR / 'var' / 'fedmcp.sqlite3'}"
DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL") or _default_sqlite,
        # Keep connections: without, every database_sync_to_async call reconnects (a PostgreSQL
        # connection costs ~6 ms; SQLite re-registers its functions), several times per MCP call.
        conn_max_age=env_int("FEDMCP_DB_CONN_MAX_AGE", 60),
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    (BASE_DIR / "var").mkdir(exist_ok=True)
    # Several workers may touch one SQLite file in tests; wait for locks instead of failing.
    DATABASES["default"].setdefault("OPTIONS", {})["timeout"] = 20
    # Every forwarded call commits (the audit row). In the default rollback-journal mode each
    # commit waits for fsyncs (~15 ms on a VM disk, measured by `make bench`); WAL with
    # synchronous=NORMAL commits without an fsync, stays consistent after a crash, and lets
    # readers run beside the writer. IMMEDIATE transactions take the write lock at BEGIN, so a
    # transaction that reads and then writes waits for another writer instead of failing with
    # "database is locked" (Django's advice for SQLite under concurrency).
    DATABASES["default"]["OPTIONS"]["init_command"] = "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL"
    DATABASES["default"]["OPTIONS"]["transaction_mode"] = "IMMEDIATE"
elif DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # A database that vanishes without a reset (a dropped route, a frozen host) must not hang
    # the worker: its database work runs on one thread. libpq gives up on a connect after
    # FEDMCP_DB_CONNECT_TIMEOUT seconds, and on a connection whose sent data stays
    # unacknowledged (tcp_user_timeout) or whose keepalive probes go unanswered for about
    # FEDMCP_DB_DEAD_AFTER seconds. A slow query on a live server is not cut: its host still
    # acknowledges. Then the 503 path of docs/SECURITY.md applies, and Django reconnects.
    _dead_after = max(3, env_int("FEDMCP_DB_DEAD_AFTER", 15))
    DATABASES["default"].setdefault("OPTIONS", {}).update({
        "connect_timeout": max(2, env_int("FEDMCP_DB_CONNECT_TIMEOUT", 5)),
        "keepalives": 1,
        "keepalives_idle": max(1, _dead_after // 3),
        "keepalives_interval": max(1, _dead_after // 6),
        "keepalives_count": 4,
        "tcp_user_timeout": _dead_after * 1000,
    })
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Channel layer --------------------------------------------------------------------------
# In-memory for one process; Redis when REDIS_URL is set so workers share groups.
REDIS_URL = os.environ.get("REDIS_URL") or None
# channels-redis waits for messages with BZPOPMIN for up to 5 s; redis-py 8 gives every read a
# 5 s socket timeout by default, so an idle receive failed at the 5 s mark (a stream's or a
# worker's listener erred, and a message popped at that instant was lost). Reads may take the
# blocking wait plus this margin; connecting stays quick to fail.
REDIS_LAYER_SOCKET_TIMEOUT = 10.0
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": [{"address": REDIS_URL, "socket_timeout": REDIS_LAYER_SOCKET_TIMEOUT, "socket_connect_timeout": 5.0}],
                "prefix": os.environ.get("FEDMCP_REDIS_PREFIX", "fedmcp"),
                "capacity": 1000,
                "expiry": 120,
            },
        }
    }
else:
    # Channels' in-memory layer, sweeping for expired entries once a second, not on every
    # receive (fedmcp_lib/layers.py: O(open sessions) per request otherwise).
    CHANNEL_LAYERS = {"default": {"BACKEND": "fedmcp_lib.layers.InMemoryChannelLayer"}}

# --- Static files, i18n ---------------------------------------------------------------------
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "var" / "static"
# WhiteNoise warns (an error under the tests' warning filter) when the folder is missing.
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# --- Security headers -----------------------------------------------------------------------
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = True

# --- MCP endpoint ---------------------------------------------------------------------------
# Largest request body accepted on any MCP transport (bytes); larger bodies get 413.
MCP_MAX_BODY_BYTES = env_int("FEDMCP_MAX_BODY_BYTES", 4 * 1024 * 1024)
# Under daphne, a request's head and its body must each arrive within these totals (seconds),
# or the client gets 408 (fedmcp_site/runtime/request_guard.py): slowloris clients are cut off.
FEDMCP_REQUEST_HEADER_TIMEOUT = env_float("FEDMCP_REQUEST_HEADER_TIMEOUT", 10.0)
FEDMCP_REQUEST_BODY_TIMEOUT = env_float("FEDMCP_REQUEST_BODY_TIMEOUT", 30.0)
# Origins accepted on MCP transports besides same-host ones (e.g. "https://app.example").
MCP_ALLOWED_ORIGINS = env_list("FEDMCP_ALLOWED_ORIGINS", [])
# How long the gateway waits for a host to answer a server->client request (sampling, ...).
MCP_HOST_REQUEST_TIMEOUT = env_float("FEDMCP_HOST_REQUEST_TIMEOUT", 300.0)
# Page size for the gateway's own paginated list results.
MCP_PAGE_SIZE = env_int("FEDMCP_PAGE_SIZE", 200)
# Cache hints the gateway puts on 2026-07-28 list results.
MCP_LIST_TTL_MS = env_int("FEDMCP_LIST_TTL_MS", 60_000)
# Seconds between SSE keep-alive comments on idle streams.
MCP_SSE_KEEPALIVE = env_float("FEDMCP_SSE_KEEPALIVE", 15.0)
# A legacy SSE POST accepted (202) by a worker other than the stream's: the accepting worker tells
# the stream's worker, and renews that every third of this while it works on the request; a
# request whose renewals stop (its worker died, or the channel layer failed) is answered -32603 on
# the stream once this has passed. Seconds.
MCP_SSE_ACCEPTED_LEASE = env_float("FEDMCP_SSE_ACCEPTED_LEASE", 15.0)
# Idle handshake-era sessions older than this are expired (seconds).
MCP_SESSION_IDLE_TIMEOUT = env_int("FEDMCP_SESSION_IDLE_TIMEOUT", 24 * 3600)
# Open handshake-era sessions one user (or, for a client-only token, one client) may hold at once,
# whatever their transport: Streamable HTTP sessions, /sse streams and WebSockets. The next one is
# refused (HTTP 429, -32031; WebSocket close 1008). Each worker also holds at most this many
# Streamable HTTP GET streams and subscriptions/listen streams per user. 0 = no bound.
MCP_MAX_SESSIONS_PER_USER = env_int("FEDMCP_MAX_SESSIONS_PER_USER", 100)
# Messages in one JSON-RPC batch (protocol 2025-03-26 only); a longer batch is refused whole (-32600).
MCP_MAX_BATCH = env_int("FEDMCP_MAX_BATCH", 50)
# WebSocket and legacy SSE sessions live as long as their connection, on the worker holding it:
# that worker renews their lease every third of this, and any worker closes a session whose lease
# ran out (its worker was killed, or could not write the close). Seconds.
MCP_SESSION_LEASE = env_float("FEDMCP_SESSION_LEASE", 90.0)
# Rows of closed sessions are deleted after this long (seconds; default 7 days).
MCP_SESSION_RETENTION = env_int("FEDMCP_SESSION_RETENTION", 7 * 24 * 3600)

# --- Identity -------------------------------------------------------------------------------
# This gateway's public origin (e.g. https://mcp.example.org). Tokens must name it as their
# audience (RFC 8707 resource). Unset: derived from each request's scheme and Host.
FEDMCP_PUBLIC_URL = os.environ.get("FEDMCP_PUBLIC_URL", "")

OAUTH2_PROVIDER = {
    # One list of scopes, with their descriptions: identity/hostauth/scopes.py (no Django imports there).
    "SCOPES": dict(scope_names.SCOPES),
    "DEFAULT_SCOPES": list(scope_names.MCP_SCOPES),
    "PKCE_REQUIRED": True,
    "ROTATE_REFRESH_TOKEN": True,
    "REFRESH_TOKEN_REUSE_PROTECTION": True,
    "ACCESS_TOKEN_EXPIRE_SECONDS": env_int("FEDMCP_ACCESS_TOKEN_SECONDS", 3600),
    # RFC 9700 (OAuth security BCP): S256 only, no implicit or password grants, `iss` in
    # authorization responses, exact redirect URIs, and only token checksums stored.
    "COMPLIANT_BCP_RFC9700_PKCE_METHOD": True,
    "COMPLIANT_BCP_RFC9700_IMPLICIT_GRANT": True,
    "COMPLIANT_BCP_RFC9700_PASSWORD_GRANT": True,
    "COMPLIANT_BCP_RFC9700_AUTHZ_RESPONSE_ISS": True,
    "COMPLIANT_BCP_RFC9700_REDIRECT_URI_MATCHING": True,
    "COMPLIANT_BCP_RFC9700_TOKEN_STORAGE": True,
    "COMPLIANT_BCP_RFC9700_REFRESH_TOKEN": True,
    "COMPLIANT_BCP_RFC9700_ACCESS_TOKEN_TRANSPORT": True,
    # Redirect URIs match exactly and are https or loopback http; tokens are only minted for
    # this gateway's origin (the default audience when a client names none).
    "OAUTH2_VALIDATOR_CLASS": "identity.hostauth.oauth_validators.GatewayOAuth2Validator",
    # /api/ checks a token's audience with the MCP endpoints' rule (identity.hostauth.tokens.audience_error).
    "RESOURCE_SERVER_TOKEN_RESOURCE_VALIDATOR": "identity.hostauth.oauth_validators.token_fits_gateway",
    # Refresh tokens rotate on every use; an unused one lapses after this long.
    "REFRESH_TOKEN_EXPIRE_SECONDS": env_int("FEDMCP_REFRESH_TOKEN_SECONDS", 30 * 86400),
    # The issuer: FEDMCP_PUBLIC_URL when set, else the origin each request came to.
    "OIDC_ISS_ENDPOINT": FEDMCP_PUBLIC_URL.rstrip("/"),
    # Clients register themselves: Client ID Metadata Documents (an https client_id that is
    # the URL of its metadata) and, for older clients, open RFC 7591 registration.
    "CIMD_ENABLED": True,
    "DCR_ENABLED": True,
    "DCR_REGISTRATION_PERMISSION_CLASSES": ("oauth2_provider.dcr.AllowAllDCRPermission",),
    # What RFC 8414 metadata advertises: only what is served.
    "OAUTH2_RESPONSE_TYPES_SUPPORTED": ["code"],
    "OAUTH2_GRANT_TYPES_SUPPORTED": ["authorization_code", "refresh_token", "client_credentials"],
    "OAUTH2_TOKEN_ENDPOINT_AUTH_METHODS_SUPPORTED": ["none", "client_secret_basic", "client_secret_post"],
}
# People sign in on the gateway's own page (the consent page needs a signed-in user).
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "index"
LOGOUT_REDIRECT_URL = "login"

# --- Gateway trust and secrets at rest ------------------------------------------------------
# Fernet keys that encrypt peer secrets in the database, comma-separated; the first encrypts,
# all decrypt. Rotate: put a new key first, run `manage.py rotate_secrets`, drop the old one.
# Unset: a key generated on first use into var/secrets_key (never committed).
FEDMCP_SECRETS_KEYS = env_secret("FEDMCP_SECRETS_KEYS") or ""
# Ed25519 private key (PEM) that signs the identity assertions this gateway sends to peer
# gateways; its public half is served at /.well-known/jwks.json. Unset: var/signing_key.pem.
FEDMCP_SIGNING_KEY = env_secret("FEDMCP_SIGNING_KEY") or ""
# The `iss` of those assertions; peer gateways trust it by this exact value.
FEDMCP_ISSUER = (os.environ.get("FEDMCP_ISSUER") or FEDMCP_PUBLIC_URL).rstrip("/")
# Lifetime of one assertion (seconds, at most 60) and how long peers' JWKS are cached.
FEDMCP_ASSERTION_LIFETIME = min(env_int("FEDMCP_ASSERTION_LIFETIME", 60), 60)
FEDMCP_JWKS_CACHE_SECONDS = env_int("FEDMCP_JWKS_CACHE_SECONDS", 300)
# DOT's default, named so migrations of models that point at OAuth applications can refer to it.
OAUTH2_PROVIDER_APPLICATION_MODEL = "oauth2_provider.Application"

# --- Federation -----------------------------------------------------------------------------
# Outbound calls to private and loopback addresses are refused unless allowed. The embedded
# default allows loopback so local upstream servers work out of the box.
FEDERATION_ALLOW_LOOPBACK = env_bool("FEDERATION_ALLOW_LOOPBACK", True)
FEDERATION_ALLOW_PRIVATE_IPS = env_bool("FEDERATION_ALLOW_PRIVATE_IPS", False)
# Default per-peer timeouts (seconds); each peer can override them.
FEDERATION_CONNECT_TIMEOUT = env_float("FEDERATION_CONNECT_TIMEOUT", 10.0)
FEDERATION_CALL_TIMEOUT = env_float("FEDERATION_CALL_TIMEOUT", 60.0)
# Bounds on each message an upstream sends, on every transport (federation/upstream/wire.py):
# nesting depth (arrays and objects) and size in bytes. A message past either fails the call it
# answers with -32010; the connection stays in use.
FEDMCP_UPSTREAM_MAX_DEPTH = env_int("FEDMCP_UPSTREAM_MAX_DEPTH", 128)
FEDMCP_UPSTREAM_MAX_MESSAGE_BYTES = env_int("FEDMCP_UPSTREAM_MAX_MESSAGE_BYTES", 64 * 1024 * 1024)
# Name this gateway gives itself in serverInfo, in hop records and in the homes of its peers'
# catalog items on other gateways (docs/NAMING.md). Peered gateways must have distinct names.
FEDMCP_GATEWAY_NAME = os.environ.get("FEDMCP_GATEWAY_NAME", "fedmcp")
if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", FEDMCP_GATEWAY_NAME):
    raise ImproperlyConfigured("FEDMCP_GATEWAY_NAME must be lowercase letters, digits and single hyphens")
# A request that has passed through this many gateways is refused (loops are refused anyway).
FEDERATION_MAX_HOPS = env_int("FEDERATION_MAX_HOPS", 8)
# Circuit breaker per peer and worker: open after N consecutive transport failures; while open, the
# worker probes the peer after FIRST_PROBE seconds, doubling up to COOLDOWN, and closes it on the
# first good probe (seconds).
FEDERATION_BREAKER_FAILURES = env_int("FEDERATION_BREAKER_FAILURES", 5)
FEDERATION_BREAKER_COOLDOWN = env_float("FEDERATION_BREAKER_COOLDOWN", 3.0)
FEDERATION_BREAKER_FIRST_PROBE = env_float("FEDERATION_BREAKER_FIRST_PROBE", 0.5)
# Health checks and catalog refreshes that each worker runs in the background (seconds; 0 = off).
FEDERATION_HEALTH_INTERVAL = env_float("FEDERATION_HEALTH_INTERVAL", 30.0)
FEDERATION_REFRESH_INTERVAL = env_float("FEDERATION_REFRESH_INTERVAL", 300.0)
FEDERATION_HEALTH_HISTORY = env_int("FEDERATION_HEALTH_HISTORY", 200)
# Bounds on what one peer's catalog may hold: items of each kind (tools, resources, templates,
# prompts), bytes of one item as JSON (its description and schemas), and bytes of all its items.
# A sync over a bound keeps the stored items of that kind and says why in the peer's last error.
FEDERATION_MAX_CATALOG_ENTRIES = env_int("FEDERATION_MAX_CATALOG_ENTRIES", 5000)
FEDERATION_MAX_CATALOG_ITEM_BYTES = env_int("FEDERATION_MAX_CATALOG_ITEM_BYTES", 256 * 1024)
FEDERATION_MAX_CATALOG_BYTES = env_int("FEDERATION_MAX_CATALOG_BYTES", 32 * 1024 * 1024)

# --- Rate limits ----------------------------------------------------------------------------
# Token buckets on forwarded calls, per identity and per peer; the rules are RateLimit rows in
# the admin (no row: no limit). Buckets live in Redis when REDIS_URL is set, else in memory.
FEDMCP_RATE_LIMITS_ENABLED = env_bool("FEDMCP_RATE_LIMITS_ENABLED", True)
# How long each worker keeps the rules before reading them again (seconds).
FEDMCP_RATE_LIMIT_CACHE_SECONDS = env_float("FEDMCP_RATE_LIMIT_CACHE_SECONDS", 10.0)
# Redis key prefix of the buckets.
FEDMCP_RATE_LIMIT_PREFIX = os.environ.get("FEDMCP_RATE_LIMIT_PREFIX") or f"{os.environ.get('FEDMCP_REDIS_PREFIX', 'fedmcp')}:ratelimit"

# --- Per-worker caches and the audit writer (fedmcp_lib/caching.py, identity/audit.py) ----------
# Tokens, sessions, routes, lists and consent decisions are cached per worker and dropped when
# a shared generation changes: Redis keys under FEDMCP_CACHE_REDIS_PREFIX with REDIS_URL, else
# the file FEDMCP_CACHE_GENERATION_FILE (default: next to the SQLite database). Every process
# that changes the database (workers, manage.py, the admin) must see the same one.
FEDMCP_CACHES_ENABLED = env_bool("FEDMCP_CACHES_ENABLED", True)
# A safety net, not the mechanism: no entry is used longer than this (seconds).
FEDMCP_CACHE_MAX_AGE = env_float("FEDMCP_CACHE_MAX_AGE", 30.0)
FEDMCP_CACHE_GENERATION_FILE = os.environ.get("FEDMCP_CACHE_GENERATION_FILE", "")
FEDMCP_CACHE_REDIS_PREFIX = os.environ.get("FEDMCP_CACHE_REDIS_PREFIX") or f"{os.environ.get('FEDMCP_REDIS_PREFIX', 'fedmcp')}:cachegen"
# Audit events are written in batches: at most this many seconds after the call, or at once
# when this many wait.
FEDMCP_AUDIT_FLUSH_INTERVAL = env_float("FEDMCP_AUDIT_FLUSH_INTERVAL", 0.05)
FEDMCP_AUDIT_BATCH_SIZE = env_int("FEDMCP_AUDIT_BATCH_SIZE", 500)
FEDMCP_AUDIT_MAX_PENDING = env_int("FEDMCP_AUDIT_MAX_PENDING", 100_000)
# A call sent upstream has a committed intent row first; the worker renews its lease every third
# of this while the call runs. Once it has run out (the worker was killed), any worker's upkeep
# writes the call's event as `interrupted`.
FEDMCP_AUDIT_INTENT_LEASE = env_float("FEDMCP_AUDIT_INTENT_LEASE", 60.0)

# --- Operations: metrics, readiness, shutdown, logs ---------------------------------------------
# Who may read /metrics: client addresses in these networks (daphne's peer address; see
# docs/DEPLOYMENT.md before enabling --proxy-headers). Each worker serves its own.
FEDMCP_METRICS_ALLOWED_NETWORKS = env_list("FEDMCP_METRICS_ALLOWED_NETWORKS", ["127.0.0.0/8", "::1/128"])
for _network in FEDMCP_METRICS_ALLOWED_NETWORKS:
    try:
        ipaddress.ip_network(_network, strict=False)
    except ValueError as _exc:
        raise ImproperlyConfigured(f"FEDMCP_METRICS_ALLOWED_NETWORKS: {_network!r} is not a network") from _exc
# Bound on each /readyz check (seconds).
FEDMCP_READYZ_TIMEOUT = env_float("FEDMCP_READYZ_TIMEOUT", 2.0)
# On SIGTERM a worker drains: it keeps listening (/readyz 503, `Connection: close` on every
# response, idle keep-alive connections closed) until nothing is in flight and no request came
# for FEDMCP_DRAIN_QUIET seconds, or at the latest FEDMCP_DRAIN_LISTEN seconds after the SIGTERM
# (nginx keeps sending to a worker that still accepts), then stops listening; requests in
# progress get up to FEDMCP_SHUTDOWN_GRACE seconds from the SIGTERM before they are cancelled.
# Keep the orchestrator's kill timeout above the grace (docs/DEPLOYMENT.md).
FEDMCP_SHUTDOWN_GRACE = env_float("FEDMCP_SHUTDOWN_GRACE", 25.0)
FEDMCP_DRAIN_QUIET = env_float("FEDMCP_DRAIN_QUIET", 1.0)
FEDMCP_DRAIN_LISTEN = env_float("FEDMCP_DRAIN_LISTEN", 10.0)
# Consent (docs/CONSENT.md): what happens when no policy matches a tools/call
# (ask-new-peers | allow | ask | deny), how long a call waits for the user (seconds), and how
# often a waiting call re-reads its prompt should a channel-layer message be lost.
FEDMCP_CONSENT_DEFAULT = os.environ.get("FEDMCP_CONSENT_DEFAULT", "ask-new-peers")
if FEDMCP_CONSENT_DEFAULT not in ("ask-new-peers", "allow", "ask", "deny"):
    raise ImproperlyConfigured("FEDMCP_CONSENT_DEFAULT must be ask-new-peers, allow, ask or deny")
FEDMCP_CONSENT_TIMEOUT = env_float("FEDMCP_CONSENT_TIMEOUT", 120.0)
FEDMCP_CONSENT_POLL_INTERVAL = env_float("FEDMCP_CONSENT_POLL_INTERVAL", 2.0)
# Which calls wait while the user is asked (docs/CONSENT.md "Hosts that cannot show a URL"):
# url-hosts (default): only those whose host is shown the consent page (URL elicitation); any
# other is refused at once with the page's URL (-32032) and its retry goes through once approved.
# all: every handshake-era call waits, up to FEDMCP_CONSENT_TIMEOUT.
FEDMCP_CONSENT_HOLD = os.environ.get("FEDMCP_CONSENT_HOLD", "url-hosts")
if FEDMCP_CONSENT_HOLD not in ("url-hosts", "all"):
    raise ImproperlyConfigured("FEDMCP_CONSENT_HOLD must be url-hosts or all")
# How long (seconds) a 2026-07-28 host has to retry an approved call's further input_required
# round without being asked again (docs/CONSENT.md "Further rounds of an approved call").
FEDMCP_CONSENT_CONTINUE_TIMEOUT = env_float("FEDMCP_CONSENT_CONTINUE_TIMEOUT", 600.0)
# What happens to sampling/createMessage and elicitation/create requests from upstreams when no
# policy of their kind matches (allow | ask | deny).
FEDMCP_CONSENT_SAMPLING_DEFAULT = os.environ.get("FEDMCP_CONSENT_SAMPLING_DEFAULT", "ask")
FEDMCP_CONSENT_ELICITATION_DEFAULT = os.environ.get("FEDMCP_CONSENT_ELICITATION_DEFAULT", "ask")
for _name in ("FEDMCP_CONSENT_SAMPLING_DEFAULT", "FEDMCP_CONSENT_ELICITATION_DEFAULT"):
    if globals()[_name] not in ("allow", "ask", "deny"):
        raise ImproperlyConfigured(f"{_name} must be allow, ask or deny")
# Bounds on what one upstream answer can ask of a user (docs/CONSENT.md "Bounds"): requests in
# one input_required round (and, in the handshake era, server->client requests in flight during
# one call), and consent prompts waiting for one user at once.
FEDMCP_MAX_INPUT_REQUESTS_PER_ROUND = env_int("FEDMCP_MAX_INPUT_REQUESTS_PER_ROUND", 16)
FEDMCP_MAX_PENDING_PROMPTS_PER_USER = env_int("FEDMCP_MAX_PENDING_PROMPTS_PER_USER", 50)
for _name in ("FEDMCP_MAX_INPUT_REQUESTS_PER_ROUND", "FEDMCP_MAX_PENDING_PROMPTS_PER_USER"):
    if globals()[_name] < 1:
        raise ImproperlyConfigured(f"{_name} must be at least 1")
# Per-user OAuth peers (docs/IDENTITY.md): how long a 2026-07-28 retry waits for the user to
# finish connecting their account on /connect/<peer> (seconds).
FEDMCP_UPSTREAM_CONNECT_WAIT = env_float("FEDMCP_UPSTREAM_CONNECT_WAIT", 120.0)
# Behind a TLS-terminating load balancer (docs/DEPLOYMENT.md): the public origin is trusted for
# CSRF (admin, sign-in and consent forms), cookies are Secure when it is https, and, only when
# the balancer overwrites X-Forwarded-Proto, Django may believe it for request.is_secure().
if FEDMCP_PUBLIC_URL:
    _public = urlsplit(FEDMCP_PUBLIC_URL)
    CSRF_TRUSTED_ORIGINS = [f"{_public.scheme}://{_public.netloc}"]
    SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = _public.scheme == "https"
if env_bool("FEDMCP_TRUST_X_FORWARDED_PROTO", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# One log line per forwarded call (logger fedmcp.calls, level INFO).
FEDMCP_CALL_LOG = env_bool("FEDMCP_CALL_LOG", True)
# "plain" (human-readable) or "json" (one object per line, for log shippers).
FEDMCP_LOG_FORMAT = os.environ.get("FEDMCP_LOG_FORMAT") or "plain"
if FEDMCP_LOG_FORMAT not in ("plain", "json"):
    raise ImproperlyConfigured(f"FEDMCP_LOG_FORMAT must be 'plain' or 'json', got {FEDMCP_LOG_FORMAT!r}")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_context": {"()": "fedmcp_lib.observability.ContextFilter"}},
    "formatters": {
        "plain": {"()": "fedmcp_lib.observability.PlainFormatter"},
        "json": {"()": "fedmcp_lib.observability.JsonFormatter"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": FEDMCP_LOG_FORMAT, "filters": ["request_context"]},
    },
    "root": {"handlers": ["console"], "level": os.environ.get("FEDMCP_LOG_LEVEL", "INFO")},
    "loggers": {
        "daphne": {"level": "WARNING"},
        "httpx": {"level": "WARNING"},
    },
}


# --- REST API (/api/, console/api.py) ----------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "oauth2_provider.contrib.rest_framework.OAuth2Authentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAdminUser"],
}
SPECTACULAR_SETTINGS = {
    "TITLE": "fedmcp admin API",
    "DESCRIPTION": "Peers, catalog, audit log and configuration of a fedmcp gateway. Needs an OAuth token with the `admin` scope.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAdminUser"],
    "SERVE_AUTHENTICATION": [
        "oauth2_provider.contrib.rest_framework.OAuth2Authentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    # Swagger UI and Redoc from drf-spectacular-sidecar's static files: nothing loads from a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "ENUM_NAME_OVERRIDES": {
        "CatalogKindEnum": "federation.models.CatalogKind",
        "ConsentKindEnum": "identity.models.ConsentKind",
    },
}
