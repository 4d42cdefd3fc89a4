"""Settings for fedmcp, driven by environment variables.

The defaults run a fresh checkout on SQLite with the in-memory channel layer in one daphne
process. `DATABASE_URL` (PostgreSQL) and `REDIS_URL` (channels-redis) switch to the scale-out
setup where several workers share state.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

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
    "oauth2_provider",
    "identity",
    "federation",
    "mcp_endpoint",
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
        conn_max_age=env_int("FEDMCP_DB_CONN_MAX_AGE", 0),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    (BASE_DIR / "var").mkdir(exist_ok=True)
    # Several workers may touch one SQLite file in tests; wait for locks instead of failing.
    DATABASES["default"].setdefault("OPTIONS", {})["timeout"] = 20
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Channel layer --------------------------------------------------------------------------
# In-memory for one process; Redis when REDIS_URL is set so workers share groups.
REDIS_URL = os.environ.get("REDIS_URL") or None
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": [REDIS_URL],
                "prefix": os.environ.get("FEDMCP_REDIS_PREFIX", "fedmcp"),
                "capacity": 1000,
                "expiry": 120,
            },
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

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
# Idle handshake-era sessions older than this are expired (seconds).
MCP_SESSION_IDLE_TIMEOUT = env_int("FEDMCP_SESSION_IDLE_TIMEOUT", 24 * 3600)

# --- Identity -------------------------------------------------------------------------------
# This gateway's public origin (e.g. https://mcp.example.org). Tokens must name it as their
# audience (RFC 8707 resource). Unset: derived from each request's scheme and Host.
FEDMCP_PUBLIC_URL = os.environ.get("FEDMCP_PUBLIC_URL", "")
# TODO(lead): transitional test switch while the test suite moves to real tokens; removed before landing.
FEDMCP_TRANSITIONAL_ANONYMOUS = env_bool("FEDMCP_TRANSITIONAL_ANONYMOUS", False)

OAUTH2_PROVIDER = {
    "SCOPES": {
        "mcp:tools": "List and call tools",
        "mcp:resources": "List, read and subscribe to resources",
        "mcp:prompts": "List and get prompts",
        "admin": "Administer the gateway (REST API)",
        "gateway": "Act as a peer gateway on behalf of your own users",
    },
    "DEFAULT_SCOPES": ["mcp:tools", "mcp:resources", "mcp:prompts"],
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
}

# --- Federation -----------------------------------------------------------------------------
# Outbound calls to private and loopback addresses are refused unless allowed. The embedded
# default allows loopback so local upstream servers work out of the box.
FEDERATION_ALLOW_LOOPBACK = env_bool("FEDERATION_ALLOW_LOOPBACK", True)
FEDERATION_ALLOW_PRIVATE_IPS = env_bool("FEDERATION_ALLOW_PRIVATE_IPS", False)
# Default per-peer timeouts (seconds); each peer can override them.
FEDERATION_CONNECT_TIMEOUT = env_float("FEDERATION_CONNECT_TIMEOUT", 10.0)
FEDERATION_CALL_TIMEOUT = env_float("FEDERATION_CALL_TIMEOUT", 60.0)
# Name this gateway gives itself in serverInfo, in hop records and in the homes of its peers'
# catalog items on other gateways (docs/NAMING.md). Peered gateways must have distinct names.
FEDMCP_GATEWAY_NAME = os.environ.get("FEDMCP_GATEWAY_NAME", "fedmcp")
if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", FEDMCP_GATEWAY_NAME):
    raise ImproperlyConfigured("FEDMCP_GATEWAY_NAME must be lowercase letters, digits and single hyphens")
# A request that has passed through this many gateways is refused (loops are refused anyway).
FEDERATION_MAX_HOPS = env_int("FEDERATION_MAX_HOPS", 8)
# Circuit breaker per peer and worker: open after N consecutive transport failures, probe again after the cooldown.
FEDERATION_BREAKER_FAILURES = env_int("FEDERATION_BREAKER_FAILURES", 5)
FEDERATION_BREAKER_COOLDOWN = env_float("FEDERATION_BREAKER_COOLDOWN", 30.0)
# Health checks and catalog refreshes that each worker runs in the background (seconds; 0 = off).
FEDERATION_HEALTH_INTERVAL = env_float("FEDERATION_HEALTH_INTERVAL", 30.0)
FEDERATION_REFRESH_INTERVAL = env_float("FEDERATION_REFRESH_INTERVAL", 300.0)
FEDERATION_HEALTH_HISTORY = env_int("FEDERATION_HEALTH_HISTORY", 200)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("FEDMCP_LOG_LEVEL", "INFO")},
    "loggers": {
        "daphne": {"level": "WARNING"},
        "httpx": {"level": "WARNING"},
    },
}
