"""``konvert serve | migrate | keys | integrations | jobs | events | audit | leaderboards | cache | citus-setup``.

Every command builds its settings from ``KONVERT_*`` once. Without KONVERT_DATABASE_URL /
KONVERT_REDIS_URL it starts the embedded PostgreSQL / Redis under the data directory. A bad
setting or program file ends the command with a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import asyncpg
import msgspec
from cryptography.fernet import Fernet

from konvert import __version__, auth
from konvert.db import Connection
from konvert.errors import ConfigurationError, KonvertError
from konvert.program import load_program
from konvert.settings import Settings, load_settings

if TYPE_CHECKING:
    from konvert.services import Services

T = TypeVar("T")

EXIT_CONFIG = 2


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _announce(message: str) -> None:
    """What ``konvert serve`` tells whoever started it: plain lines on a terminal, log lines
    otherwise (one JSON object each with KONVERT_LOG_FORMAT=json)."""
    if sys.stderr.isatty():
        _say(message)
    else:
        logging.getLogger("konvert.serve").info(message)


def with_servers(settings: Settings, announce: bool = False) -> Settings:
    """Fill in the URLs of the embedded servers for whatever is not configured."""
    if not (settings.embedded_database or settings.embedded_redis):
        return settings
    from konvert import embedded

    data_dir = Path(settings.data_dir).expanduser()
    if announce:
        _announce(f"konvert data directory: {data_dir}")
    changes = {}
    if settings.embedded_database:
        changes["database_url"] = embedded.start_postgres(data_dir)
        if announce:
            _announce(f"embedded PostgreSQL: {data_dir / 'postgres'}")
    if settings.embedded_redis:
        changes["redis_url"] = embedded.start_redis(data_dir)
        if announce:
            _announce(f"embedded Redis: {data_dir / 'redis'}")
    return settings.replace(**changes)


async def _connect(settings: Settings) -> Connection:
    return await asyncpg.connect(settings.database_url, timeout=settings.db_connect_timeout_seconds)


async def _first_admin_key(settings: Settings) -> str | None:
    """On an embedded database with no keys at all, create an admin key so a new user can start."""
    conn = await _connect(settings)
    try:
        if await conn.fetchval("select exists (select 1 from api_keys)"):
            return None
        key, _ = await auth.insert_key(conn, "first admin key", [auth.ADMIN_SCOPE])
        return key
    finally:
        await conn.close()


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from konvert import db
    from konvert.observability import configure_logging

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port), ("workers", args.workers)) if v}
    settings = settings.replace(**overrides)
    load_program(settings.program_file)  # refuse to start on a bad program file, before anything runs
    configure_logging(settings)
    embedded_db = settings.embedded_database
    settings = with_servers(settings, announce=True)
    applied = asyncio.run(db.migrate_url(settings.database_url))
    if applied:
        _announce(f"applied {len(applied)} migration(s)")
    if embedded_db and (key := asyncio.run(_first_admin_key(settings))):
        _announce(f"first admin key (shown once, keep it): {key}")
        url = f"http://{settings.host}:{settings.port}/v1/members/alice/balance"
        _announce(f"try: curl -H 'Authorization: Bearer {key}' {url}")
    _announce(f"serving on http://{settings.host}:{settings.port} (API docs at /schema)")
    # Worker processes build their settings from the environment: hand them the resolved URLs.
    os.environ["KONVERT_DATABASE_URL"] = settings.database_url
    os.environ["KONVERT_REDIS_URL"] = settings.redis_url
    if settings.workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        metrics_dir = tempfile.mkdtemp(prefix="konvert-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        atexit.register(shutil.rmtree, metrics_dir, ignore_errors=True)
    from konvert import serving

    serving.serve(settings)
    return 0


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from konvert import db

    settings = with_servers(settings)
    applied = asyncio.run(db.migrate_url(settings.database_url))
    for migration in applied:
        print(f"applied {migration.version:04d}_{migration.name}")
    if not applied:
        print("database is up to date")
    return 0


async def _keys(args: argparse.Namespace, settings: Settings) -> int:
    if getattr(args, "purpose", None):
        allowed = load_program(settings.program_file).preferences.purposes
        unknown = sorted(set(args.purpose) - set(allowed))
        if unknown:
            raise ConfigurationError(f"unknown purpose {', '.join(unknown)}; the program's are {', '.join(allowed)}")
    conn = await _connect(settings)
    try:
        if args.keys_command == "create":
            key, info = await auth.insert_key(conn, args.name, args.scope, args.partner, args.purpose)
            print(key)
            bound = f", for partners {' '.join(info.partners)}" if info.partners else ""
            bound += f", for purposes {' '.join(info.purposes)}" if info.purposes else ""
            _say(f"created key {info.key_id} ({info.name}) with scopes {' '.join(info.scopes)}{bound}; not shown again")
        elif args.keys_command == "list":
            for info in await auth.select_keys(conn):
                state = f"revoked {info.revoked_at:%Y-%m-%d %H:%M}" if info.revoked_at else "active"
                partners = " ".join(info.partners) if info.partners else "any partner"
                purposes = " ".join(info.purposes) if info.purposes else "any purpose"
                columns = (info.key_id, f"{info.prefix}…", info.name, " ".join(info.scopes), partners, purposes, state)
                print("\t".join(map(str, columns)))
        elif args.keys_command == "revoke":
            if not await auth.revoke_key(conn, args.key_id):
                _say(f"no active key {args.key_id}")
                return 1
            print(f"revoked key {args.key_id}")
        return 0
    finally:
        await conn.close()


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_keys(args, with_servers(settings)))


async def _with_services(settings: Settings, work: Callable[[Services], Awaitable[T]]) -> T:
    from konvert import composition

    services = await composition.open_services(settings, load_program(settings.program_file))
    try:
        return await work(services)
    finally:
        await services.close()


def cmd_integrations(args: argparse.Namespace, settings: Settings) -> int:
    from konvert.integrations import admin
    from konvert.integrations.model import IntegrationIn, Options

    if args.integrations_command == "generate-key":
        print(Fernet.generate_key().decode())
        _say("set it as KONVERT_SECRET_KEY (keep it apart from database backups), then: konvert integrations reseal")
        return 0

    async def work(services: Services) -> int:
        command = args.integrations_command
        if command == "add":
            options = Options(earn_on=args.earn_on) if args.earn_on else Options()
            wanted = msgspec.convert(
                {"kind": args.kind, "secrets": args.secret, "partner": args.partner, "options": options}, IntegrationIn
            )
            out, created = await admin.put_integration(services, args.name, wanted)
            _say(
                f"{'connected' if created else 'updated'} {out.name} ({out.kind}); "
                f"webhook URL: <konvert's base URL>{out.webhook_path}"
            )
        elif command == "list":
            for out in await admin.list_integrations(services):
                sealed = "encrypted" if out.secrets_encrypted else "NOT encrypted"
                print(f"{out.name}\t{out.kind}\t{out.partner or '-'}\t{out.secrets_count} secret(s), {sealed}")
        elif command == "delete":
            await admin.delete_integration(services, args.name)
            _say(f"deleted {args.name}")
        elif command == "deliveries":
            page = await admin.deliveries(services, args.name, args.status, None, args.limit)
            for d in page.items:
                what = " ".join(f"{k}={v}" for k, v in d.results.items()) or d.error or ""
                print(f"{d.delivery_id}\t{d.received_at:%Y-%m-%d %H:%M:%S}\t{d.topic}\t{d.status}\t{what}")
        elif command == "retry":
            result = await admin.retry(services, args.name, (args.status,) if args.status else ("failed", "parked"))
            print(msgspec.json.encode(result).decode())
            return 1 if result.still_failed else 0
        elif command == "reseal":
            _say(f"resealed the secrets of {await admin.reseal(services)} integration(s)")
        return 0

    try:
        return asyncio.run(_with_services(with_servers(settings), work))
    except (KonvertError, msgspec.ValidationError) as refused:
        _say(f"refused: {refused}")
        return 2


def cmd_jobs(args: argparse.Namespace, settings: Settings) -> int:
    from konvert import jobs

    counts = asyncio.run(_with_services(with_servers(settings), jobs.run_once))
    for name, count in counts.items():
        print(f"{name}: {count}")
    return 0


def cmd_events(args: argparse.Namespace, settings: Settings) -> int:
    from konvert.events import publisher, service

    if args.events_command == "reseal":
        resealed = asyncio.run(_with_services(with_servers(settings), service.reseal))
        _say(f"resealed the secrets of {resealed} webhook endpoint(s)")
        return 0
    done = asyncio.run(_with_services(with_servers(settings), publisher.publish_all))
    _say(f"events published: {done} (stream entries, webhook messages and attempts)")
    return 0


def cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    from konvert.composition import AUDIT_CHECKS
    from konvert.ledger import audit

    settings = with_servers(settings)

    async def run() -> list[audit.Violation]:
        conn = await _connect(settings)
        try:
            return await audit.run_audit(conn, AUDIT_CHECKS)
        finally:
            await conn.close()

    violations = asyncio.run(run())
    for violation in violations:
        print(f"VIOLATION {violation.invariant}: {violation.detail}")
    if violations:
        print(f"audit failed: {len(violations)} violation(s)")
        return 1
    print("audit passed: every invariant holds")
    return 0


def cmd_leaderboards(args: argparse.Namespace, settings: Settings) -> int:
    from konvert.reputation import leaderboard

    report = asyncio.run(_with_services(with_servers(settings), leaderboard.rebuild))
    assert report is not None  # rebuilt unconditionally
    print(f"leaderboards rebuilt: generation {report.generation}, {report.boards} boards, {report.entries} entries")
    return 0


def cmd_cache(args: argparse.Namespace, settings: Settings) -> int:
    from konvert.ledger.balances import warm_balances

    started = time.monotonic()
    warmed = asyncio.run(_with_services(with_servers(settings), lambda s: warm_balances(s, args.batch_size)))
    print(f"balances cached: {warmed.members} members in {time.monotonic() - started:.1f} s")
    if warmed.stopped_at_memory is not None:
        used, limit = warmed.stopped_at_memory
        print(
            f"stopped early: Redis uses {used / 2**20:,.0f} MiB of its maxmemory {limit / 2**20:,.0f} MiB;"
            " raise maxmemory to cache every balance"
        )
        return 1
    return 0


def cmd_citus_setup(args: argparse.Namespace, settings: Settings) -> int:
    from konvert.distribution import citus_setup_sql

    print(citus_setup_sql(), end="")
    return 0


def _batch_size(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 10_000:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 10000, not {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="konvert", description="konvert loyalty points and reputation engine")
    parser.add_argument("--version", action="version", version=f"konvert {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="migrate, then serve the HTTP API")
    serve.add_argument("--host", help="address to listen on (KONVERT_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (KONVERT_PORT, default 8000)")
    serve.add_argument("--workers", type=int, help="worker processes (KONVERT_WORKERS, default 1)")
    serve.set_defaults(run=cmd_serve)

    commands.add_parser("migrate", help="apply pending database migrations").set_defaults(run=cmd_migrate)

    keys = commands.add_parser("keys", help="create, list and revoke API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="create a key and print it (once)")
    create.add_argument("--name", required=True, help="who or what uses the key")
    create.add_argument(
        "--scope", required=True, nargs="+", action="extend", choices=auth.SCOPES, help="one or more scopes"
    )
    create.add_argument(
        "--partner",
        nargs="+",
        action="extend",
        help="bind the key to these partners: it may post and refund purchases only for them",
    )
    create.add_argument(
        "--purpose",
        nargs="+",
        action="extend",
        help="bind the key to these consent purposes: it reads members' preferences only as far as they may",
    )
    key_commands.add_parser("list", help="list keys (never the keys themselves)")
    revoke = key_commands.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id", type=int)
    keys.set_defaults(run=cmd_keys)

    integrations = commands.add_parser("integrations", help="connect Shopify, Stripe and Discourse webhooks")
    integration_commands = integrations.add_subparsers(dest="integrations_command", required=True)
    add = integration_commands.add_parser("add", help="connect a source, or change its secret and settings")
    add.add_argument("--kind", required=True, choices=("shopify", "stripe", "discourse"))
    add.add_argument("--name", required=True, help="the integration's name, part of its webhook URL")
    add.add_argument("--secret", required=True, action="append", help="the signing secret (twice while rotating)")
    add.add_argument("--partner", help="shops: the partner its purchases are recorded for")
    add.add_argument("--earn-on", choices=("orders/paid", "orders/create"), help="Shopify: the topic that earns")
    integration_commands.add_parser("list", help="list the connected sources (never their secrets)")
    remove = integration_commands.add_parser("delete", help="disconnect a source")
    remove.add_argument("name")
    shown = integration_commands.add_parser("deliveries", help="show a source's latest deliveries")
    shown.add_argument("name")
    shown.add_argument("--status", choices=("applied", "ignored", "parked", "failed"))
    shown.add_argument("--limit", type=int, default=50)
    again = integration_commands.add_parser("retry", help="apply failed and parked deliveries again")
    again.add_argument("name")
    again.add_argument("--status", choices=("failed", "parked"))
    integration_commands.add_parser("generate-key", help="print a new key for KONVERT_SECRET_KEY")
    integration_commands.add_parser("reseal", help="encrypt stored secrets with the first KONVERT_SECRET_KEY")
    integrations.set_defaults(run=cmd_integrations)

    jobs = commands.add_parser("jobs", help="run background jobs")
    jobs.add_subparsers(dest="jobs_command", required=True).add_parser("run", help="run every due job once")
    jobs.set_defaults(run=cmd_jobs)

    events = commands.add_parser(
        "events", help="publish events (for deployments with KONVERT_EVENTS_PUBLISH=false); reseal endpoint secrets"
    )
    event_commands = events.add_subparsers(dest="events_command", required=True)
    event_commands.add_parser("reseal", help="encrypt webhook endpoint secrets with the first KONVERT_SECRET_KEY")
    event_commands.add_parser("publish", help="publish every event and due webhook message, then stop")
    events.set_defaults(run=cmd_events)

    commands.add_parser("audit", help="check the ledger's invariants; exit 1 on any violation").set_defaults(
        run=cmd_audit
    )

    leaderboards = commands.add_parser("leaderboards", help="manage the reputation leaderboards in Redis")
    leaderboards.add_subparsers(dest="leaderboards_command", required=True).add_parser(
        "rebuild", help="recreate every leaderboard exactly from PostgreSQL"
    )
    leaderboards.set_defaults(run=cmd_leaderboards)

    cache = commands.add_parser("cache", help="manage the balance cache in Redis")
    warm = cache.add_subparsers(dest="cache_command", required=True).add_parser(
        "warm", help="cache every member's balance (after Redis lost them: reads then skip PostgreSQL)"
    )
    warm.add_argument(
        "--batch-size",
        type=_batch_size,
        default=1000,
        help="members per query and per round trip to Redis (1-10000, default 1000)",
    )
    cache.set_defaults(run=cmd_cache)

    citus = commands.add_parser(
        "citus-setup", help="the SQL that distributes konvert's tables on Citus (docs/SCALING.md)"
    )
    citus.add_argument("--print", action="store_true", required=True, help="print it (to run with psql)")
    citus.set_defaults(run=cmd_citus_setup)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        status: int = args.run(args, settings)
        return status
    except (ConfigurationError, KonvertError) as exc:
        _say(f"konvert: {exc}")
        return EXIT_CONFIG
    except (OSError, asyncpg.PostgresError) as exc:
        _say(f"konvert: cannot reach a server: {exc}")
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
