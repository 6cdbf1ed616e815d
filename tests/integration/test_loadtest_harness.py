"""The load-test harness's correctness path, at a tiny size: nothing lost, nothing doubled, audit passes.

Runs ``loadtests/run.py`` as a subprocess against the local PostgreSQL and Redis (its own
database, Redis db 14), with the write scenarios for two seconds each. No timing is asserted:
the harness's figures are only meaningful when it is run on purpose, on a quiet machine.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN_PY = ROOT / "loadtests" / "run.py"
HARNESS_TIMEOUT_SECONDS = 300
LOCAL_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
HARNESS_REDIS_DB = 14


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _servers() -> tuple[str, str]:
    """The PostgreSQL server and Redis database the harness may use, or skip."""
    database_url = os.environ.get("KONVERT_TEST_DATABASE_URL", LOCAL_DATABASE_URL)
    parts = urlsplit(database_url)
    if not _port_open(parts.hostname or "127.0.0.1", parts.port or 5432):
        pytest.skip(f"the load-test harness needs a PostgreSQL server over TCP ({parts.hostname}:{parts.port or 5432})")
    redis_url = os.environ.get("KONVERT_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
    redis_parts = urlsplit(redis_url)
    if not _port_open(redis_parts.hostname or "127.0.0.1", redis_parts.port or 6379):
        pytest.skip("the load-test harness needs a Redis server over TCP")
    # The harness flushes its Redis database: never the one the test suite uses.
    return database_url, urlunsplit(redis_parts._replace(path=f"/{HARNESS_REDIS_DB}"))


def test_harness_loses_nothing_and_the_audit_passes(tmp_path: Path) -> None:
    missing = [tool for tool in ("wrk", "pgbench") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the load-test harness needs {' and '.join(missing)} (Debian: apt-get install wrk postgresql-contrib)")
    database_url, redis_url = _servers()
    output = tmp_path / "result.json"
    completed = subprocess.run(
        [
            sys.executable, str(RUN_PY), "--quick", "--members", "200", "--history", "8", "--history-every-days", "3",
            "--duration", "2", "--warmup", "0.5",
            "--connections", "8", "--scenarios", "balance_warm,purchases,redemptions,mixed,purchases_jobs,jobs",
            "--pg-url", database_url, "--redis-url", redis_url, "--output", str(output),
        ],  # fmt: skip
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HARNESS_TIMEOUT_SECONDS,
        check=False,
    )
    assert output.exists(), f"no result written (exit {completed.returncode}):\n{completed.stdout}\n{completed.stderr}"
    result = json.loads(output.read_text())
    config = result["configs"][0]
    writes = {name: scenario["writes"] for name, scenario in config["scenarios"].items() if name != "balance_warm"}
    assert result["nothing_lost"] is True, json.dumps(writes, indent=2)
    assert result["audit_passed"] is True, completed.stdout
    assert completed.returncode == 0, completed.stdout + completed.stderr
    # The checks compared real traffic: every write scenario got answers and recorded rows.
    for name in ("purchases", "redemptions", "purchases_jobs"):
        kind = writes[name]["redemption" if name == "redemptions" else "purchase"]
        assert kind["accepted"] > 0 and kind["recorded_rows"] >= kind["accepted"], (name, kind)
        # What each write cost the WAL, read from the server's counters around the measurement.
        wal = config["scenarios"][name]["wal_per_request"]
        assert wal["records"] >= 1 and wal["bytes"] > 0, (name, wal)
    assert result["machine"]["postgres_settings"]["max_wal_size"], result["machine"]
    # konvert's own view of the same requests: every one wrk counted was timed by the server,
    # and the mixed day's balance reads are split by where they were served from.
    for name, scenario in config["scenarios"].items():
        assert scenario["server_latency"]["requests"] >= scenario["requests"], (name, scenario["server_latency"])
    # balance_warm read every balance from Redis after `konvert cache warm` put them all there
    # (it runs first: no write has invalidated one yet).
    warm = config["scenarios"]["balance_warm"]
    assert warm["cache_warm"]["output"].startswith("balances cached: 200 members"), warm["cache_warm"]
    assert warm["balance_read_sources"].get("database", 0.0) == 0.0, warm["balance_read_sources"]
    assert warm["balance_read_sources"]["redis"] == 1.0, warm["balance_read_sources"]
    # The jobs ran until nothing was due, after the writes and before the audit that passed:
    # every lot the seed and the purchases made was vested (the pending ones) and expired.
    # purchases_jobs: `konvert jobs run` beside the load vested every lot made due before it
    # (the seed's and the earlier scenarios' pending lots), and no other.
    beside = config["scenarios"]["purchases_jobs"]["jobs_beside"]
    pending_before = writes["purchases"]["purchase"]["accepted"] + writes["mixed"]["purchase"]["accepted"]
    assert beside["exit_code"] == 0 and beside["backlog_lots"] >= pending_before, beside
    # A lot whose member a purchase held at that moment is passed over and left to the next run.
    assert 0.9 * beside["backlog_lots"] <= beside["vested_lots"] <= beside["backlog_lots"], beside
    assert beside["vested_lots"] == beside["counts"]["vested_lots"], beside
    assert config["ratios"]["purchases_jobs_vs_purchases"] > 0, config["ratios"]
    jobs = config["jobs"]
    assert jobs["vesting"]["settled"] >= writes["purchases_jobs"]["purchase"]["accepted"], (jobs, beside)
    assert jobs["expiry"]["settled"] > jobs["vesting"]["settled"] + beside["vested_lots"], jobs
    assert jobs["tiers"]["settled"] >= 200, jobs
    assert config["ratios"]["vesting_vs_purchases"] > 0, config["ratios"]
    sources = config["scenarios"]["mixed"]["balance_read_sources"]
    assert set(sources) <= {"redis", "database"} and abs(sum(sources.values()) - 1) < 0.01, sources


def test_the_harness_sees_a_checkpoint_start(database_url: str) -> None:
    # The harness notes a checkpoint during a scenario from PostgreSQL's own counters, which
    # moved to another view in PostgreSQL 17: the query must read them on this server.
    import asyncio

    import asyncpg

    from tests.unit.test_harness_parts import _load_run_py

    run = _load_run_py()
    checkpoint_note = run.report.checkpoint_note
    before = run._checkpoints(database_url)
    assert before is not None

    async def checkpoint() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute("checkpoint")
        finally:
            await conn.close()

    asyncio.run(checkpoint())
    during = run._checkpoints_during(before, run._checkpoints(database_url))
    assert during["started"] >= 1, during
    purchases = {"checkpoints": during, "wal_per_request": {"full_page_images": 0.15}}
    assert checkpoint_note(purchases).endswith("started during it (0.15 full-page images per request)")
    quiet = {"checkpoints": {"started": 0, "running_at_start": False, "running_at_end": False}}
    assert checkpoint_note(quiet | {"wal_per_request": {}}) == ""

