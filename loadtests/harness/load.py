"""Load generators: ``wrk`` with the Lua scripts in loadtests/wrk/, and ``pgbench`` for the raw baseline.

Both are C programs with their own event loops, so on a 2-core machine they take a small share
of the CPU (run.py reports how much), and both stop by themselves after ``-d`` / ``-T`` seconds;
the subprocess timeout is a second bound.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
WRK_DIR = HERE / "wrk"
PGBENCH_SCRIPT = HERE / "pgbench" / "ledger.sql"
# konvert's own statements for one purchase, one transaction per purchase (pgbench_own_sql).
PGBENCH_PURCHASE_SCRIPT = HERE / "pgbench" / "purchase.sql"

# Generous so that a slow response is measured as slow instead of being dropped as a timeout.
WRK_TIMEOUT = "30s"
# wrk and pgbench stop by themselves; this is the bound on top of their own duration.
OVERRUN_SECONDS = 60
RESULT_MARKER = "KONVERT_BENCH_RESULT "

KIND_NAMES = {
    "n": "noop",
    "b": "balance",
    "p": "purchase",
    "r": "redemption",
    "k": "kudos",
    "w": "webhook",
    "o": "portal",
}
WRITE_KINDS = ("p", "r", "k", "w")


def tool_path(name: str) -> str | None:
    return shutil.which(name)


def tool_version(name: str) -> str:
    try:
        out = subprocess.run([name, "--version"], capture_output=True, text=True, timeout=10, check=False)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Latency:
    """Milliseconds."""

    p50: float
    p90: float
    p95: float
    p99: float
    p999: float
    mean: float
    max: float

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.__dict__.items()}


@dataclass
class WrkRun:
    """One wrk run: its summary, and what its response log says per kind of request."""

    duration_s: float
    requests: int
    latency: Latency
    socket_errors: dict[str, int]
    # wrk's own count of responses with status > 399.
    status_errors: int
    # kind -> status -> count, from the response log
    statuses: dict[str, dict[int, int]]
    # kind -> thread -> number of requests sent
    sent: dict[str, dict[int, int]]
    # kind -> set of (thread, n) answered with 2xx / with anything else (write kinds only)
    accepted: dict[str, set[tuple[int, int]]] = field(default_factory=dict)
    refused: dict[str, set[tuple[int, int]]] = field(default_factory=dict)
    logged_responses: int = 0
    loadgen_cpu_percent: float = 0.0

    @property
    def throughput(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    def unanswered(self, kind: str) -> set[tuple[int, int]]:
        """Requests wrk sent but stopped before their response came (at the end of the run)."""
        answered = self.accepted.get(kind, set()) | self.refused.get(kind, set())
        sent = {(thread, n) for thread, count in self.sent.get(kind, {}).items() for n in range(1, count + 1)}
        return sent - answered

    def as_dict(self) -> dict[str, object]:
        by_kind = {}
        for kind, statuses in sorted(self.statuses.items()):
            ok = sum(c for s, c in statuses.items() if 200 <= s < 300)
            by_kind[KIND_NAMES.get(kind, kind)] = {
                "responses": sum(statuses.values()),
                "ok_2xx": ok,
                "by_status": {str(s): c for s, c in sorted(statuses.items())},
                "throughput_rps": round(sum(statuses.values()) / self.duration_s, 1) if self.duration_s else 0,
            }
        return {
            "throughput_rps": round(self.throughput, 1),
            "requests": self.requests,
            "duration_s": round(self.duration_s, 3),
            "latency_ms": self.latency.as_dict(),
            "errors": {
                "socket": self.socket_errors,
                "status_4xx_5xx": self.status_errors,
                "non_2xx": sum(
                    c for statuses in self.statuses.values() for s, c in statuses.items() if not 200 <= s < 300
                ),
                "5xx": sum(c for statuses in self.statuses.values() for s, c in statuses.items() if s >= 500),
            },
            "by_kind": by_kind,
            "loadgen_cpu_percent": round(self.loadgen_cpu_percent, 1),
        }


def run_wrk(
    script: str,
    url: str,
    *,
    duration_s: float,
    connections: int,
    threads: int,
    env: dict[str, str],
    keep_log_dir: Path | None = None,
) -> WrkRun:
    """Run ``wrk`` with loadtests/wrk/<script>.lua and parse its JSON summary and response logs."""
    threads = max(1, min(threads, connections))
    log_dir = Path(tempfile.mkdtemp(prefix="konvert-wrk-"))
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, math.ceil(duration_s))}s",
        f"--timeout={WRK_TIMEOUT}",
        "--latency",
        "-s",
        str(WRK_DIR / f"{script}.lua"),
        url,
    ]
    cpu_before = _children_cpu_seconds()
    started = time.monotonic()
    try:
        out = subprocess.run(
            command,
            env=os.environ | env | {"KONVERT_BENCH_LOG_DIR": str(log_dir)},
            capture_output=True,
            text=True,
            timeout=duration_s + OVERRUN_SECONDS,
            check=False,
        )
        elapsed = time.monotonic() - started
        if out.returncode != 0:
            raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr}\n{out.stdout}")
        summary = _parse_summary(out.stdout)
        run = _read_logs(log_dir, summary)
        run.loadgen_cpu_percent = 100 * (_children_cpu_seconds() - cpu_before) / elapsed if elapsed else 0.0
        return run
    finally:
        if keep_log_dir is not None:
            shutil.copytree(log_dir, keep_log_dir, dirs_exist_ok=True)
        shutil.rmtree(log_dir, ignore_errors=True)


def _parse_summary(stdout: str) -> dict:
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    raise RuntimeError(f"wrk printed no {RESULT_MARKER.strip()} line:\n{stdout}")


def _read_logs(log_dir: Path, summary: dict) -> WrkRun:
    statuses: dict[str, Counter[int]] = defaultdict(Counter)
    accepted: dict[str, set[tuple[int, int]]] = defaultdict(set)
    refused: dict[str, set[tuple[int, int]]] = defaultdict(set)
    logged = 0
    for path in sorted(log_dir.glob("thread-*.log")):
        with path.open() as lines:
            for line in lines:
                request_id, _, status_text = line.rstrip("\n").partition(" ")
                status = int(status_text)
                logged += 1
                kind = request_id[:1]
                statuses[kind][status] += 1
                if kind in WRITE_KINDS:
                    # p003-000000042: thread 3, request 42 of its kind
                    key = (int(request_id[1:4]), int(request_id[5:]))
                    (accepted if 200 <= status < 300 else refused)[kind].add(key)
    percentiles = summary["latency_us"]["percentiles"]
    lat = summary["latency_us"]
    sent: dict[str, dict[int, int]] = defaultdict(dict)
    for thread, counts in summary["sent"].items():
        for kind, count in counts.items():
            if count:
                sent[kind][int(thread)] = int(count)
    errors = summary["errors"]
    return WrkRun(
        duration_s=summary["duration_us"] / 1e6,
        requests=int(summary["requests"]),
        latency=Latency(
            p50=percentiles["50"] / 1000,
            p90=percentiles["90"] / 1000,
            p95=percentiles["95"] / 1000,
            p99=percentiles["99"] / 1000,
            p999=percentiles["99.9"] / 1000,
            mean=lat["mean"] / 1000,
            max=lat["max"] / 1000,
        ),
        socket_errors={k: int(errors[k]) for k in ("connect", "read", "write", "timeout")},
        status_errors=int(errors["status"]),
        statuses={kind: dict(counter) for kind, counter in statuses.items()},
        sent=dict(sent),
        accepted=dict(accepted),
        refused=dict(refused),
        logged_responses=logged,
    )


# --- pgbench -----------------------------------------------------------------------------------

PGBENCH_TABLES = """
drop table if exists bench_ledger, bench_balances;
create table bench_balances (
    member  bigint primary key,
    balance bigint not null default 0,
    version bigint not null default 0
);
create table bench_ledger (
    entry_id   bigint generated always as identity primary key,
    member     bigint not null,
    amount     bigint not null,
    created_at timestamptz not null default now()
);
"""


@dataclass
class PgbenchRun:
    duration_s: float
    transactions: int
    failed: int
    latency: Latency
    loadgen_cpu_percent: float = 0.0
    # Clients pgbench stopped on an error (its first message): a script that does not fit the schema.
    aborted_clients: int = 0
    abort_sample: str = ""

    @property
    def throughput(self) -> float:
        return self.transactions / self.duration_s if self.duration_s else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "throughput_rps": round(self.throughput, 1),
            "requests": self.transactions,
            "duration_s": round(self.duration_s, 3),
            "latency_ms": self.latency.as_dict(),
            "errors": {"failed_transactions": self.failed, "aborted_clients": self.aborted_clients}
            | ({"abort_sample": self.abort_sample} if self.abort_sample else {}),
            "loadgen_cpu_percent": round(self.loadgen_cpu_percent, 1),
        }


def pgbench_connection_args(database_url: str) -> tuple[list[str], dict[str, str]]:
    """pgbench's -h/-p/-U/dbname (and PGPASSWORD) from a postgresql:// URL, read as asyncpg (so
    konvert) reads it: ``?host=`` (a Unix socket's directory, say) and ``?port=`` count only
    where the URL itself names no host or port."""
    from urllib.parse import parse_qs, unquote, urlsplit

    parts = urlsplit(database_url)
    query = parse_qs(parts.query)
    host = parts.hostname or query.get("host", ["127.0.0.1"])[0]
    port = parts.port or query.get("port", ["5432"])[0]
    args = ["-h", host, "-p", str(port)]
    if parts.username:
        args += ["-U", unquote(parts.username)]
    env = {"PGPASSWORD": unquote(parts.password)} if parts.password else {}
    return [*args, parts.path.lstrip("/")], env


def run_pgbench(
    database_url: str,
    *,
    variables: dict[str, str],
    duration_s: float,
    clients: int,
    threads: int,
    script: Path = PGBENCH_SCRIPT,
) -> PgbenchRun:
    """A pgbench script (by default the raw two-statement transaction of loadtests/pgbench/ledger.sql),
    prepared, durable commits; ``variables`` are its -D variables."""
    connection, env = pgbench_connection_args(database_url)
    log_dir = Path(tempfile.mkdtemp(prefix="konvert-pgbench-"))
    seconds = max(1, math.ceil(duration_s))
    command = [
        "pgbench",
        "-n",  # no vacuum of pgbench's own tables: there are none
        "-M",
        "prepared",
        "-c",
        str(clients),
        "-j",
        str(max(1, min(threads, clients))),
        "-T",
        str(seconds),
        *(arg for name, value in variables.items() for arg in ("-D", f"{name}={value}")),
        "-f",
        str(script),
        "-l",
        f"--log-prefix={log_dir}/tx",
        *connection,
    ]
    cpu_before = _children_cpu_seconds()
    started = time.monotonic()
    try:
        out = subprocess.run(
            command,
            env=os.environ | env,
            capture_output=True,
            text=True,
            timeout=seconds + OVERRUN_SECONDS,
            check=False,
        )
        elapsed = time.monotonic() - started
        if out.returncode not in (0, 2):  # 2: some transactions failed; counted below
            raise RuntimeError(f"pgbench failed ({out.returncode}): {out.stderr}\n{out.stdout}")
        latencies_us = []
        failed = 0
        for path in log_dir.glob("tx*"):
            for line in path.read_text().splitlines():
                # client_id transaction_no time script_no time_epoch time_us [schedule_lag]
                fields = line.split()
                if fields[2] == "failed":
                    failed += 1
                elif fields[2] != "skipped":
                    latencies_us.append(int(fields[2]))
        measured = _pgbench_duration(out.stdout) or float(seconds)
        aborted = [line for line in out.stderr.splitlines() if " aborted in command " in line]
        return PgbenchRun(
            duration_s=measured,
            transactions=len(latencies_us),
            failed=failed,
            latency=_latency_from_samples(latencies_us),
            loadgen_cpu_percent=100 * (_children_cpu_seconds() - cpu_before) / elapsed if elapsed else 0.0,
            aborted_clients=len(aborted),
            abort_sample=aborted[0][:500] if aborted else "",
        )
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)


def _pgbench_duration(stdout: str) -> float | None:
    # "duration: 20 s" is the configured one; the tps line divides by the measured time, so
    # recover that time from "number of transactions actually processed" / tps.
    processed = tps = None
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("number of transactions actually processed:"):
            processed = int(line.split(":")[1].split("/")[0].strip())
        elif line.startswith("tps ="):
            tps = float(line.split("=")[1].split()[0])
    if processed and tps:
        return processed / tps
    return None


def _latency_from_samples(samples_us: list[int]) -> Latency:
    if not samples_us:
        return Latency(0, 0, 0, 0, 0, 0, 0)
    ordered = sorted(samples_us)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))] / 1000

    return Latency(
        p50=pct(50),
        p90=pct(90),
        p95=pct(95),
        p99=pct(99),
        p999=pct(99.9),
        mean=sum(ordered) / len(ordered) / 1000,
        max=ordered[-1] / 1000,
    )
