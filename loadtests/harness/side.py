"""One konvert install under test and what belongs to it in a run: its database (created,
migrated and seeded by the harness), its admin key, its ``konvert serve``, and every ``konvert``
CLI call the harness makes for it (migrate, keys create, cache warm, jobs run, audit), all through
that install's own interpreter.

A run has one side, the current install; with ``--baseline-ref`` a second, the baseline, and
with ``--redis-cluster`` another, the current install on a Redis Cluster, each with a database
of its own seeded alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from harness import seed, stats, webhooks
from harness.service import (
    CLI_TIMEOUT_SECONDS,
    THIS_KONVERT,
    Server,
    http_json,
    konvert_env,
    portal_cookie,
    run_cli,
)

# Redemption contention: these members get a balance large enough for every redemption of a run.
CONTENTION_BALANCE_POINTS = 10_000_000
# portal_overview: members m1.. get a portal session each, and the load picks among them.
PORTAL_SESSIONS_MAX = 500


class PortalMissing(Exception):
    """The install has no member portal (a baseline from before it)."""


# Run by the install's interpreter: where its konvert lies and its version (konvert/__init__.py only).
# Also the names of its settings, so that the harness sets only those the install knows.
_DESCRIBE = (
    "import json, platform, konvert, konvert.settings as s; print(json.dumps({'file': konvert.__file__, "
    "'version': getattr(konvert, '__version__', None), 'python': platform.python_version(), "
    "'settings': list(getattr(s.Settings, '__struct_fields__', ()))}))"
)


@dataclass(frozen=True)
class Install:
    """A konvert install: ``name`` is "current", "baseline" or "cluster"; ``python`` the
    interpreter whose ``-m konvert`` is run; ``commit`` the git commit a baseline was exported
    from; ``redis_url`` the Redis its service uses when not --redis-url (the cluster's)."""

    name: str
    python: str
    commit: str | None = None
    redis_url: str | None = None

    @property
    def konvert(self) -> tuple[str, ...]:
        return (self.python, "-m", "konvert")

    def source(self) -> dict[str, object]:
        """Which code this install runs: its package, version, interpreter and a source digest."""
        described = subprocess.run(
            [self.python, "-c", _DESCRIBE], capture_output=True, text=True, timeout=60, check=False
        )
        if described.returncode != 0:
            raise RuntimeError(
                f"the {self.name} install ({self.python}) cannot import konvert:\n{described.stderr.strip()[-2000:]}"
            )
        facts = json.loads(described.stdout.strip().splitlines()[-1])
        package = Path(facts["file"]).resolve().parent
        return {
            "install": self.name,
            "commit": self.commit,
            "python": self.python,
            "python_version": facts["python"],
            "konvert_version": facts["version"],
            "package": str(package),
            "settings": facts.get("settings", []),
            **stats.source_digest(package),
        }


def current_install(python: str | None) -> Install:
    return Install("current", python or THIS_KONVERT[0])


class Side:
    """An install's database, server and CLI calls within one run."""

    def __init__(
        self, install: Install, args: argparse.Namespace, artifacts: Path, say: Callable[[str], None], labelled: bool
    ) -> None:
        self.install = install
        self.name = install.name
        self.args = args
        self.artifacts = artifacts
        # In a comparison every message and file names its side; alone, they read as they did.
        self._prefix = f"[{self.name}] " if labelled else ""
        self.file_suffix = f"-{self.name}" if labelled and self.name != "current" else ""
        self._say = say
        self.database_name = f"konvert_bench_{secrets.token_hex(4)}"
        self.database_url = stats.database_url(args.pg_url, self.database_name)
        self.redis_url: str = install.redis_url or args.redis_url
        self.api_key = ""
        self.server: Server | None = None
        # The Shopify integration the webhooks scenario delivers to, once connected.
        self.shop: webhooks.Shop | None = None
        self.seeded_members = 0
        self.seed_seconds: dict[str, float] = {}
        self.audit_output = ""
        self.source = install.source() | {"database": self.database_name}
        self.setting_names = set(self.source.pop("settings"))  # type: ignore[arg-type]

    @property
    def konvert(self) -> tuple[str, ...]:
        return self.install.konvert

    def say(self, message: str) -> None:
        self._say(self._prefix + message)

    def env(self) -> dict[str, str]:
        variables = {
            "KONVERT_DATABASE_URL": self.database_url,
            "KONVERT_REDIS_URL": self.redis_url,
            "KONVERT_LOG_LEVEL": "warning",
            "KONVERT_JOBS_INTERVAL_SECONDS": "0",
        }
        if self.args.db_pool_max:
            variables["KONVERT_DB_POOL_MAX"] = str(self.args.db_pool_max)
        if "webhook_allow_private_addresses" in self.setting_names:
            # The webhook receiver the events scenarios deliver to is on this machine's loopback.
            variables["KONVERT_WEBHOOK_ALLOW_PRIVATE_ADDRESSES"] = "true"
        if self.args.program_file:
            variables["KONVERT_PROGRAM_FILE"] = str(Path(self.args.program_file).resolve())
        for setting in self.args.settings:
            name, _, value = setting.partition("=")
            variables[name] = value
        return konvert_env(**variables)

    def cli(self, *args: str, timeout: float = CLI_TIMEOUT_SECONDS) -> subprocess.CompletedProcess[str]:
        """``konvert <args>`` of this side's install against its database."""
        return run_cli(self.konvert, self.env(), *args, timeout=timeout)

    def cli_ok(self, *args: str) -> str:
        """``konvert <args>``, which must succeed; its standard output."""
        done = self.cli(*args)
        if done.returncode != 0:
            raise RuntimeError(
                f"{self._prefix}konvert {' '.join(args)} failed ({done.returncode}):\n"
                f"{(done.stdout + done.stderr).strip()[-2000:]}"
            )
        return done.stdout

    # -- the database -----------------------------------------------------------------------------

    def create_database(self) -> None:
        asyncio.run(stats.admin(self.args.pg_url, f"create database {self.database_name}"))
        stats.flush_redis(self.redis_url)
        self.cli_ok("migrate")
        self.api_key = self.cli_ok("keys", "create", "--name", "loadtests", "--scope", "admin").strip()
        self.say(f"created database {self.database_name} and an admin key")

    def drop_database(self) -> None:
        asyncio.run(stats.admin(self.args.pg_url, f"drop database if exists {self.database_name} with (force)"))
        # The balances it cached (with balance_warm, every member's: ~0.8 KB each) go with it.
        stats.flush_redis(self.redis_url)

    def seed_to(self, members: int, facts: seed.ProgramFacts, now: datetime) -> None:
        """Seed members up to ``members``, as of ``now`` (the same for every side: seeded alike)."""
        if members <= self.seeded_members:
            return
        self.say(f"seeding members {self.seeded_members + 1:,}..{members:,} ({self.args.history} purchases each)")
        seconds = asyncio.run(
            seed.seed_members(
                self.database_url,
                self.seeded_members + 1,
                members,
                self.args.history,
                facts,
                now,
                self.args.history_every_days,
            )
        )
        self.seed_seconds[str(members)] = round(seconds, 1)
        self.seeded_members = members
        self.say(f"seeded in {seconds:.1f} s")

    # -- the service ------------------------------------------------------------------------------

    def start_server(self, workers: int, label: str, fund_reason: str | None) -> Server:
        self.say(f"starting konvert serve --workers {workers}")
        server = Server(self.konvert, self.env(), workers, self.artifacts / f"server-{label}{self.file_suffix}.log")
        try:
            server.wait_ready()
        except Exception:
            server.stop()
            raise
        self.server = server
        if "redemptions" in self.args.scenario_names:
            self._fund_contention_members(server, fund_reason)
        return server

    def connect_shop(self, partner: str) -> None:
        """Connect the Shopify integration and link a customer to every seeded member."""
        assert self.server is not None
        self.shop = webhooks.connect_shop(self.server.base_url, self.api_key, partner)
        if self.shop is None:
            self.say("this install has no integrations: it runs no webhooks scenario")
            return
        linked = asyncio.run(webhooks.link_customers(self.database_url, self.seeded_members))
        self.say(f"connected a Shopify integration for {partner}; linked {linked:,} more customers")

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def _fund_contention_members(self, server: Server, reason: str | None) -> None:
        """Give the contention members enough points for every redemption (idempotent per member)."""
        if reason is None:
            self.say("warning: the program has no adjustment reason codes; contention members keep their seeded points")
            return
        for member in range(1, self.args.contention_members + 1):
            status, body = http_json(
                "POST",
                f"{server.base_url}/v1/members/m{member}/adjustments",
                self.api_key,
                {
                    "adjustment_id": f"loadtests-contention-m{member}",
                    "points": CONTENTION_BALANCE_POINTS,
                    "reason_code": reason,
                    "note": "load test: balance for redemption contention",
                },
            )
            if status not in (200, 201):
                raise RuntimeError(f"funding contention member m{member} failed: {status} {body}")

    def open_portal_sessions(self, members: int, into: Path) -> Path:
        """Portal sessions for members m1.. (at most PORTAL_SESSIONS_MAX), each opened the way a
        member opens one: a link from the API, then the link. Their cookies go to ``into``, one a
        line, for wrk."""
        assert self.server is not None
        cookies = []
        for member in range(1, min(members, PORTAL_SESSIONS_MAX) + 1):
            url = f"{self.server.base_url}/v1/members/m{member}/portal-sessions"
            status, body = http_json("POST", url, self.api_key, {})
            if status in (404, 405) and member == 1 and (body or {}).get("code") != "member_not_found":
                raise PortalMissing(f"the {self.name} install has no member portal")
            if status != 201 or not isinstance(body, dict):
                raise RuntimeError(f"a portal link for m{member} failed: {status} {body}")
            cookies.append(portal_cookie(body["url"]))
        into.write_text("\n".join(cookies) + "\n")
        return into

    # -- CLI steps --------------------------------------------------------------------------------

    def warm_cache(self) -> dict:
        """``konvert cache warm``: how long it took, and what the cached balances take in Redis."""
        self.say("konvert cache warm")
        keys_before, used_before = stats.redis_memory(self.redis_url)
        started = time.monotonic()
        output = self.cli_ok("cache", "warm").strip()
        seconds = time.monotonic() - started
        keys, used = stats.redis_memory(self.redis_url)
        added, grown = keys - keys_before, used - used_before
        self.say(f"  {output}; Redis grew by {grown / 2**20:,.1f} MiB for {added:,} keys")
        return {
            "seconds": round(seconds, 1),
            "output": output,
            "redis_keys_added": added,
            "redis_memory_added_mib": round(grown / 2**20, 1),
            "bytes_per_key": round(grown / added) if added else None,
        }

    def audit(self) -> bool:
        self.say("konvert audit")
        started = time.monotonic()
        audited = self.cli("audit")
        self.audit_output = (audited.stdout + audited.stderr).strip()
        self.say(
            f"  {self.audit_output.splitlines()[-1] if self.audit_output else audited.returncode} "
            f"({time.monotonic() - started:.1f} s)"
        )
        return audited.returncode == 0
