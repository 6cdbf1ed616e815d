"""``run.py --soak MINUTES``: the checkout day's mixed load for that long against a ``konvert serve``
on a PostgreSQL and a Redis the soak starts for itself (never the machine's shared ones), with a
fault every ``--fault-every`` seconds: Redis frozen, PostgreSQL restarted, a worker killed, Redis
stopped and started empty, PostgreSQL frozen, in turn.

It reports what the harness reports for a write scenario (every accepted write recorded exactly
once: ``lost`` and doubled rows must be 0), the answers by kind and status and the socket errors,
the service's warnings and errors by message, and the service's memory and connections (its
processes' RSS and open descriptors, PostgreSQL backends, Redis clients) at the start and the end.
A write answered 503 may still have committed (PostgreSQL went away after the commit, before its
answer): such writes are counted as ``refused_but_recorded``, apart from lost and doubled ones.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from harness import checks, stats
from harness.service import rss_bytes

ROOT = Path(__file__).resolve().parents[2]
WARMUP_SECONDS = 10
# How long each fault lasts before it is ended.
FAULT_SECONDS = {"redis frozen": 10, "postgres restarted": 5, "a worker killed": 0, "redis stopped": 10}
FAULT_SECONDS["postgres frozen"] = 5


@dataclass
class Fault:
    name: str
    start: Callable[[], None]
    end: Callable[[], None]


class Injector(threading.Thread):
    """A fault every ``every`` seconds (the first after ``every / 6``), in turn, until stopped;
    each ends before the next starts, and the one under way ends when the soak stops."""

    def __init__(self, faults: list[Fault], every: float, say: Callable[[str], None]) -> None:
        super().__init__(name="soak-faults", daemon=True)
        self.faults, self.every, self.say = faults, every, say
        self.stopping = threading.Event()
        self.injected: list[dict[str, object]] = []
        self.started_at = time.monotonic()

    def run(self) -> None:
        delay = self.every / 6
        for n in range(sys.maxsize):
            if self.stopping.wait(delay):
                return
            fault = self.faults[n % len(self.faults)]
            at = time.monotonic() - self.started_at
            self.say(f"fault: {fault.name} at {at:.0f} s")
            fault.start()
            self.stopping.wait(FAULT_SECONDS[fault.name])
            fault.end()
            self.injected.append({"fault": fault.name, "at_s": round(at, 1), "seconds": FAULT_SECONDS[fault.name]})
            delay = max(0.0, self.every - (time.monotonic() - self.started_at - at))


def faults_for(postgres: object, redis_server: object, worker_pids: Callable[[], list[int]]) -> list[Fault]:
    def kill_a_worker() -> None:
        workers = [pid for pid in worker_pids() if stats.is_worker(pid)]  # not multiprocessing's tracker
        if workers:
            os.kill(workers[0], signal.SIGKILL)

    return [
        Fault("redis frozen", redis_server.freeze, redis_server.thaw),  # type: ignore[attr-defined]
        Fault("postgres restarted", postgres.stop, postgres.start),  # type: ignore[attr-defined]
        Fault("a worker killed", kill_a_worker, lambda: None),
        Fault("redis stopped", redis_server.stop, redis_server.start),  # type: ignore[attr-defined]
        Fault("postgres frozen", postgres.freeze, postgres.thaw),  # type: ignore[attr-defined]
    ]


def _open_descriptors(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def snapshot(server: object, database_url: str, redis_url: str, database_name: str) -> dict[str, object]:
    """The service's memory and connections now."""
    pids = server.all_pids()  # type: ignore[attr-defined]
    backends = asyncio.run(
        stats.query(
            database_url,
            "select count(*) from pg_stat_activity where datname = $1 and application_name = 'konvert'",
            database_name,
        )
    )
    return {
        "processes": len(pids),
        "rss_mib": round(sum(rss_bytes(pid) for pid in pids) / 2**20, 1),
        "rss_per_process_mib": [round(rss_bytes(pid) / 2**20, 1) for pid in pids],
        "open_descriptors": sum(_open_descriptors(pid) for pid in pids),
        "postgres_backends": backends[0][0],
        "redis_clients": _redis_clients(redis_url),
    }


def _redis_clients(redis_url: str) -> int:
    with stats.redis_client(redis_url) as client:
        return int(client.info("clients")["connected_clients"])


def server_messages(log_text: str) -> dict[str, int]:
    """The service's warning and error lines by level and message (JSON log lines)."""
    counted: collections.Counter[str] = collections.Counter()
    for line in log_text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") in ("warning", "error", "critical"):
            counted[f"{entry['level']}: {entry.get('msg')}"] += 1
    return dict(counted.most_common())


def main(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT))
    from tests.servers import OwnPostgres, OwnRedis, postgres_bin_dir, redis_binary

    bin_dir, redis_path = postgres_bin_dir(), redis_binary()
    if bin_dir is None or redis_path is None:
        print("loadtests: --soak needs PostgreSQL's pg_ctl and redis-server on this machine", file=sys.stderr)
        return 2
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    args.output = args.output or ROOT / "loadtests" / "results" / f"soak-{stamp}.json"  # and its -artifacts/
    postgres, redis_server = OwnPostgres.create(bin_dir), OwnRedis(redis_path)
    try:
        postgres.init()
        postgres.start()
        redis_server.start()
        args.pg_url, args.redis_url = postgres.url, redis_server.url
        result = _soak(args, postgres, redis_server)
    finally:
        redis_server.stop()
        postgres.remove()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    _print(result)
    print(
        f"\nresults: {args.output}\nartifacts (the server's log): {args.output.with_name(args.output.stem + '-artifacts')}"
    )
    return 0 if result["nothing_lost"] and result["audit_passed"] and not result["answers_5xx_but_503"] else 1


def _soak(args: argparse.Namespace, postgres: object, redis_server: object) -> dict[str, object]:
    from harness.runner import Run
    from harness.side import current_install

    run = Run(args, [current_install(args.current_python)])
    side = run.current
    members, workers = args.members, args.worker_counts[0]
    side.create_database()
    side.seed_to(members, run.facts, datetime.now(UTC))
    server = side.start_server(workers, "soak", run._adjustment_reason())
    try:
        side._fund_contention_members(server, run._adjustment_reason())
        # Unmeasured load first, so that the start's pools and caches are as busy as the end's.
        run.measurer.wrk(side, "mixed", members, WARMUP_SECONDS, f"w{secrets.token_hex(3)}")
        marks = asyncio.run(checks.marks_at(side.database_url))
        start = snapshot(server, args.pg_url, args.redis_url, side.database_name)
        injector = Injector(faults_for(postgres, redis_server, server.worker_pids), args.fault_every, run.say)
        tag = f"s{secrets.token_hex(4)}"
        run.say(f"soak: mixed load, {args.connections} connections, {args.soak:g} minutes")
        injector.start()
        try:
            wrk = run.measurer.wrk(side, "mixed", members, args.soak * 60, tag)
        finally:
            injector.stopping.set()
            injector.join()
        writes = asyncio.run(_check(side.database_url, wrk, tag, run.facts.partner, marks))
        end = snapshot(server, args.pg_url, args.redis_url, side.database_name)
    finally:
        side.stop_server()
    audit_passed = side.audit()
    return {
        "harness": "konvert loadtests/run.py --soak",
        "started_at": run.started_at.isoformat(timespec="seconds"),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": stats.machine_info(args.pg_url, side.source.get("konvert_version")),
        "source": side.source,
        "settings": {"minutes": args.soak, "fault_every_s": args.fault_every, "members": members, "workers": workers},
        "faults": injector.injected,
        "load": wrk.as_dict(),
        "writes": writes,
        "server_messages": server_messages(server.log_text()),
        "start": start,
        "end": end,
        "nothing_lost": nothing_lost_or_doubled(writes),
        "answers_5xx_but_503": sum(
            count
            for entry in wrk.statuses.values()
            for status, count in entry.items()
            if status >= 500 and status != 503
        ),
        "audit_passed": audit_passed,
    }


def nothing_lost_or_doubled(writes: dict) -> bool:
    """Every accepted write recorded, none twice, nothing unexpected, one transfer per row; writes
    answered 503 that committed all the same (``refused_but_recorded``) are reported apart."""
    return all(
        entry["lost"] == 0
        and entry["duplicate_rows"] == 0
        and entry["unexpected_rows"] == 0
        and entry.get("transfers_match_rows", True)
        for name, entry in writes.items()
        if name != "ok"
    )


async def _check(url: str, wrk: object, tag: str, partner: str, marks: checks.Marks) -> dict:
    conn = await asyncpg.connect(url)
    try:
        return await checks.check_writes(conn, wrk, tag, partner, marks)  # type: ignore[arg-type]
    finally:
        await conn.close()


def _print(result: dict) -> None:
    load = result["load"]
    print(f"\nsoak: {result['settings']['minutes']:g} minutes, faults: {[f['fault'] for f in result['faults']]}")
    print(
        f"requests {load['requests']:,}, {load['throughput_rps']:,.0f} req/s, socket errors {load['errors']['socket']}"
    )
    for kind, entry in load["by_kind"].items():
        print(f"  {kind}: {entry['by_status']}")
    for kind, entry in result["writes"].items():
        if kind != "ok":
            fields = ("accepted", "lost", "duplicate_rows", "refused_but_recorded", "unanswered_in_flight")
            print(f"  {kind} writes: " + ", ".join(f"{f} {entry[f]}" for f in fields))
    print(f"server messages: {result['server_messages']}")
    print(f"start: {result['start']}\nend:   {result['end']}")
    print(
        f"nothing lost: {result['nothing_lost']}, audit passed: {result['audit_passed']}, "
        f"5xx but 503: {result['answers_5xx_but_503']}"
    )
