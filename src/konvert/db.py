"""PostgreSQL: the connection pool and the forward-only migrations in ``sql/``."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from konvert.errors import ConfigurationError
from konvert.settings import Settings

log = logging.getLogger("konvert.db")

# A connection, on its own or checked out of the pool; anything statements run on (a pool too).
Connection = asyncpg.Connection | PoolConnectionProxy
Queryable = Connection | asyncpg.Pool
# A row as read: an asyncpg Record, or anything with the same keys.
Row = asyncpg.Record | Mapping[str, Any]


def one(row: asyncpg.Record | None) -> asyncpg.Record:
    """The row of a statement that always returns one (an update of a row it holds locked, say)."""
    assert row is not None, "the statement returned no row"
    return row


# pg_advisory_lock key: any constant unique to konvert. Two processes starting at once both ask
# for it; the second waits, then finds every migration applied.
MIGRATION_LOCK_KEY = 0x6B6F6E76_65727401
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def _migrations_dir() -> Path:
    # Installed: konvert/sql inside the wheel. Source checkout: the top-level sql/ folder.
    packaged = Path(str(resources.files("konvert"))) / "sql"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "sql"


def load_migrations(directory: Path | None = None) -> list[Migration]:
    directory = directory or _migrations_dir()
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if not match:
            raise ConfigurationError(f"migration {path.name}: name must look like 0001_description.sql")
        migrations.append(Migration(int(match[1]), match[2], path.read_text("utf-8")))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise ConfigurationError("migrations: two files share a version number")
    return migrations


async def migrate(conn: asyncpg.Connection, migrations: list[Migration] | None = None) -> list[Migration]:
    """Apply every migration not yet applied, each in its own transaction; return those applied.

    Refuses to run if an applied migration's file has changed since (checksum mismatch):
    migrations are forward-only, a change needs a new file.
    """
    migrations = load_migrations() if migrations is None else migrations
    await conn.execute("select pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            """
            create table if not exists schema_migrations (
                version    integer primary key,
                name       text not null,
                checksum   text not null,
                applied_at timestamptz not null default now()
            )
            """
        )
        applied = {r["version"]: r for r in await conn.fetch("select version, name, checksum from schema_migrations")}
        done = []
        for migration in migrations:
            row = applied.get(migration.version)
            if row is not None:
                if row["name"] != migration.name:
                    raise ConfigurationError(
                        f"this database has migration {migration.version:04d}_{row['name']} applied, which konvert "
                        f"no longer has ({migration.version:04d}_{migration.name} in its place): it was made by an "
                        "earlier release; migrate it with that release, or start from an empty database"
                    )
                if row["checksum"] != migration.checksum:
                    raise ConfigurationError(
                        f"migration {migration.version:04d}_{migration.name} was changed after it was applied; "
                        "add a new migration instead"
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "insert into schema_migrations (version, name, checksum) values ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            log.info("applied migration", extra={"migration": f"{migration.version:04d}_{migration.name}"})
            done.append(migration)
        return done
    finally:
        await conn.execute("select pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


async def migrate_url(database_url: str) -> list[Migration]:
    conn = await asyncpg.connect(database_url)
    try:
        return await migrate(conn)
    finally:
        await conn.close()


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Replaces asyncpg's reset query (a round trip on every release of a connection).

    konvert keeps no session state on pooled connections: every SET is LOCAL to its transaction,
    session advisory locks are released explicitly (and a connection that fails to release one
    is terminated), nothing LISTENs. asyncpg itself still rolls back an open transaction.
    """


async def create_pool(settings: Settings) -> asyncpg.Pool:
    statement_timeout_ms = str(int(settings.db_statement_timeout_seconds * 1000))
    return await asyncpg.create_pool(
        settings.database_url,
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        timeout=settings.db_connect_timeout_seconds,
        command_timeout=settings.db_statement_timeout_seconds + 1,
        server_settings={
            "statement_timeout": statement_timeout_ms,
            "application_name": "konvert",
            # Every statement is prepared once per connection. PostgreSQL's default ("auto") keeps
            # re-planning a statement whose generic plan it estimates dearer than a custom one,
            # which it does for every statement over arrays (unnest): planning the purchase batch
            # took longer than running it. konvert's statements are index lookups whose best plan
            # does not depend on the values, so they are planned once.
            "plan_cache_mode": "force_generic_plan",
        },
        reset=_keep_session,
    )
