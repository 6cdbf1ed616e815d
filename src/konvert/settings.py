"""Typed, frozen settings built once at start-up from ``KONVERT_*`` environment variables.

Nothing else in konvert reads the environment: the CLI builds a :class:`Settings` and passes it
into :func:`konvert.app.create_app`, the jobs and the migrations. Tests build their own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from cryptography.fernet import Fernet
from msgspec import Meta

from konvert.errors import ConfigurationError
from konvert.redis_client import parse_redis_url

ENV_PREFIX = "KONVERT_"
# Variables under this prefix belong to the test suite and loadtests, not to the service.
_IGNORED_PREFIXES = ("KONVERT_TEST_", "KONVERT_BENCH_")

PositiveInt = Annotated[int, Meta(ge=1)]
Seconds = Annotated[float, Meta(gt=0, le=3600)]


def _default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "konvert")


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Every knob of the service. Field ``x`` is set by the variable ``KONVERT_X``."""

    # Where PostgreSQL and Redis are. Empty means: start the embedded ones under data_dir.
    database_url: str = ""
    redis_url: str = ""
    # Every Redis key konvert writes starts with this, so that several konvert deployments (or
    # test runs) can share one Redis.
    redis_key_prefix: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")] = "konvert"
    data_dir: str = msgspec.field(default_factory=_default_data_dir)
    # The program file (TOML). Empty means the example program shipped with konvert.
    program_file: str = ""

    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=1, le=65535)] = 8000
    workers: Annotated[int, Meta(ge=1, le=64)] = 1

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"
    # Access logs show route templates, never member ids from URLs, unless this is set.
    log_member_ids: bool = False

    request_max_body_bytes: Annotated[int, Meta(ge=1024, le=16 * 1024 * 1024)] = 256 * 1024
    # A client must send a request's headers within this time, and its body within this time
    # after them, or its connection is closed (headers) or its request answered 408 (body).
    header_read_timeout_seconds: Annotated[float, Meta(ge=0.1, le=300)] = 10.0
    body_read_timeout_seconds: Annotated[float, Meta(ge=0.1, le=300)] = 30.0
    # Connections each worker serves at once; more wait in the listen backlog until one closes.
    connections_max_per_worker: Annotated[int, Meta(ge=1, le=100_000)] = 1000
    db_pool_min: Annotated[int, Meta(ge=1, le=200)] = 2
    db_pool_max: Annotated[int, Meta(ge=1, le=200)] = 20
    db_statement_timeout_seconds: Seconds = 10.0
    db_connect_timeout_seconds: Seconds = 5.0
    redis_timeout_seconds: Seconds = 0.5
    health_timeout_seconds: Seconds = 2.0
    # How long a verified API key is trusted before it is looked up again (so revocation by
    # another process takes effect within this time). 0 looks every key up on every request.
    auth_cache_seconds: Annotated[float, Meta(ge=0, le=300)] = 5.0
    # A client (by address) whose API keys failed this many times within a minute is answered
    # 429 until the minute is over, without a database lookup (each worker counts its own).
    auth_failures_per_minute: Annotated[int, Meta(ge=1, le=1_000_000)] = 60
    balance_cache_ttl_seconds: Annotated[int, Meta(ge=1, le=30 * 86400)] = 3600
    # Background jobs (vesting, hold timeouts, expiry) run every this many seconds in each
    # service process; 0 turns them off (run `konvert jobs run` from cron instead).
    jobs_interval_seconds: Annotated[float, Meta(ge=0, le=86400)] = 30.0
    jobs_batch_size: Annotated[int, Meta(ge=1, le=100_000)] = 250
    # Group commit of purchase postings: at most this many per shared transaction, and this many
    # such transactions in flight per process (each holds a pool connection while it writes).
    write_batch_size_max: Annotated[int, Meta(ge=1, le=10_000)] = 256
    write_batches_in_flight_max: Annotated[int, Meta(ge=1, le=64)] = 4
    # A batch starts beside one in flight only once that one has been in flight this long.
    write_batch_overlap_after_seconds: Annotated[float, Meta(ge=0, le=10)] = 0.005
    # Balance reads that miss the cache, batched the same way: at most this many members per
    # query, and this many queries in flight per process (each holds a pool connection).
    read_batch_size_max: Annotated[int, Meta(ge=1, le=1000)] = 100
    read_batches_in_flight_max: Annotated[int, Meta(ge=1, le=64)] = 4
    # How rows of several members are locked (a purchase batch's members, a kudos' author and
    # giver, a job's batch, webhook leases, pruning): together, one statement naming them all; or
    # one_by_one, a statement per member (still in member_uid order, all sent in one round trip),
    # which Citus needs: it locks rows only with a statement that goes to one shard.
    lock_members: Literal["together", "one_by_one"] = "together"
    # Page sizes are bounded everywhere.
    page_size_max: Annotated[int, Meta(ge=1, le=1000)] = 200
    # Encrypts integrations' webhook secrets at rest: one or more Fernet keys (`konvert
    # integrations generate-key`), comma-separated, the first encrypting. Empty stores them as
    # they are. Never logged.
    secret_key: str = msgspec.field(default="")
    # A delivery waiting for its customer to be linked to a member is dropped after this many days.
    parked_delivery_days: Annotated[int, Meta(ge=1, le=365)] = 30

    # Events out (konvert.events). The Redis Stream's key; empty means "<redis_key_prefix>:events".
    events_stream: Annotated[str, Meta(max_length=200)] = ""
    # The stream keeps about this many entries (XADD MAXLEN ~).
    events_stream_maxlen: Annotated[int, Meta(ge=1000, le=100_000_000)] = 1_000_000
    # Each service process publishes (stream, webhooks); off, `konvert events publish` does it.
    events_publish: bool = True
    # How often an idle publisher looks for new events and due webhook messages.
    events_poll_interval_seconds: Annotated[float, Meta(gt=0, le=60)] = 0.25
    # Events per publishing statement (stream entries, webhook fan-out, pruning).
    events_batch_size: Annotated[int, Meta(ge=1, le=10_000)] = 1000
    # Delivered events are pruned after this many days.
    events_retention_days: Annotated[float, Meta(gt=0, le=3650)] = 7.0
    # points.expiring_soon is announced this many days before a lot expires; 0 announces none.
    events_expiring_soon_days: Annotated[int, Meta(ge=0, le=3650)] = 14
    # Webhook delivery: one attempt's timeout, and attempts in flight per endpoint per process.
    webhook_timeout_seconds: Annotated[float, Meta(gt=0, le=120)] = 10.0
    webhook_concurrency_per_endpoint: Annotated[int, Meta(ge=1, le=256)] = 16
    # A message is retried (exponential back-off from base to max, with jitter) until this long
    # after its first attempt; then it is dead-lettered.
    webhook_retry_seconds: Annotated[float, Meta(gt=0, le=30 * 86400)] = 86400.0
    webhook_backoff_base_seconds: Annotated[float, Meta(gt=0, le=86400)] = 5.0
    webhook_backoff_max_seconds: Annotated[float, Meta(gt=0, le=86400)] = 4 * 3600.0
    # An endpoint whose every attempt failed for this long is disabled.
    webhook_disable_after_seconds: Annotated[float, Meta(gt=0, le=365 * 86400)] = 5 * 86400.0
    # After a secret rotation the previous secret signs too, for this long.
    webhook_secret_grace_seconds: Annotated[float, Meta(ge=0, le=30 * 86400)] = 86400.0
    # Endpoints on loopback, private, link-local or other non-public addresses are refused (when
    # registered, and again at every connection), so that konvert cannot be made to post into the
    # network it runs in; true allows them (a receiver beside konvert, the tests).
    webhook_allow_private_addresses: bool = False
    # The member portal. Links point at this base URL (how members reach konvert, e.g.
    # https://loyalty.example.com); empty: the URL the API request came in on.
    public_url: Annotated[str, Meta(max_length=2000, pattern=r"^(https?://[^\s/?#]+(/[^\s?#]*)?)?$")] = ""
    # How long a portal link can be opened (once).
    portal_link_ttl_seconds: Annotated[int, Meta(ge=10, le=3600)] = 300
    # A member's portal session ends after this long without a request, and this long after it
    # started whatever happens.
    portal_session_idle_seconds: Annotated[int, Meta(ge=60, le=86400)] = 1800
    portal_session_absolute_seconds: Annotated[int, Meta(ge=60, le=7 * 86400)] = 8 * 3600
    # The Secure attribute of the portal's cookies: keep it unless konvert is reached over plain
    # HTTP (a local trial).
    portal_cookie_secure: bool = True

    @property
    def embedded_database(self) -> bool:
        return not self.database_url

    @property
    def embedded_redis(self) -> bool:
        return not self.redis_url

    @property
    def lock_one_by_one(self) -> bool:
        return self.lock_members == "one_by_one"

    @property
    def events_stream_key(self) -> str:
        return self.events_stream or f"{self.redis_key_prefix}:events"

    def replace(self, **changes: object) -> Settings:
        return msgspec.structs.replace(self, **changes)


_FIELD_NAMES = frozenset(Settings.__struct_fields__)


def load_settings(environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Build settings from ``KONVERT_*`` variables; a bad or unknown one raises ConfigurationError."""
    environ = os.environ if environ is None else environ
    raw: dict[str, object] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name.startswith(_IGNORED_PREFIXES):
            continue
        field = name[len(ENV_PREFIX) :].lower()
        if field not in _FIELD_NAMES:
            raise ConfigurationError(f"unknown setting {name}: konvert has no such variable")
        raw[field] = value
    raw.update(overrides)
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigurationError(f"invalid setting: {_name_the_variable(str(exc))}") from None
    if settings.secret_key:
        try:
            secret_keys(settings)
        except ValueError:
            raise ConfigurationError(
                "invalid setting: KONVERT_SECRET_KEY must be Fernet keys (32 url-safe base64 bytes), comma-separated"
            ) from None
    if settings.redis_url:
        try:
            parse_redis_url(settings.redis_url)
        except ValueError as exc:
            raise ConfigurationError(f"invalid setting: KONVERT_REDIS_URL {exc}") from None
    if settings.db_pool_min > settings.db_pool_max:
        raise ConfigurationError("invalid setting: KONVERT_DB_POOL_MIN is larger than KONVERT_DB_POOL_MAX")
    return settings


def secret_keys(settings: Settings) -> list[Fernet]:
    """The keys of KONVERT_SECRET_KEY, the one that encrypts first; ValueError if one is malformed."""
    return [Fernet(key.strip()) for key in settings.secret_key.split(",") if key.strip()]


def _name_the_variable(message: str) -> str:
    # msgspec says "... - at `$.port`"; users know the variable as KONVERT_PORT.
    if " - at `$." in message:
        text, _, path = message.partition(" - at `$.")
        return f"{ENV_PREFIX}{path.rstrip('`').upper()}: {text}"
    return message
