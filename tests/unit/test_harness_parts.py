"""Pure parts of the load-test harness (loadtests/harness), which CI otherwise runs only end to end."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

LOADTESTS = Path(__file__).resolve().parents[2] / "loadtests"
sys.path.insert(0, str(LOADTESTS))

from harness.load import pgbench_connection_args


def test_pgbench_connects_where_the_url_points_over_tcp() -> None:
    args, env = pgbench_connection_args("postgresql://bench:s%40cret@db.internal:5433/konvert_bench_1")

    assert args == ["-h", "db.internal", "-p", "5433", "-U", "bench", "konvert_bench_1"]
    assert env == {"PGPASSWORD": "s@cret"}


def test_pgbench_uses_the_unix_socket_a_host_query_names() -> None:
    args, env = pgbench_connection_args("postgresql://postgres@/konvert_bench_1?host=/var/run/postgresql")

    assert args == ["-h", "/var/run/postgresql", "-p", "5432", "-U", "postgres", "konvert_bench_1"]
    assert env == {}


def test_pgbench_reads_host_and_port_queries_as_asyncpg_does() -> None:
    # The query counts only where the URL names no host or port itself, as asyncpg reads it.
    tcp, _ = pgbench_connection_args("postgresql://u@127.0.0.1/db?host=/run/postgresql")
    socket_port, _ = pgbench_connection_args("postgresql://u@/db?host=/tmp&port=5433")

    assert tcp[:4] == ["-h", "127.0.0.1", "-p", "5432"]
    assert socket_port[:4] == ["-h", "/tmp", "-p", "5433"]


def test_wal_per_request_divides_the_server_s_counters_by_the_requests() -> None:
    run = _load_run_py()

    per_request = run._wal_per_request((10, 1, 1_000, 7), (110, 6, 51_000, 17), 50)

    assert per_request == {"records": 2.0, "full_page_images": 0.1, "bytes": 1000, "transactions": 0.2}
    assert run._wal_per_request(None, (110, 6, 51_000), 50) is None  # no pg_stat_wal (PostgreSQL < 14)
    assert run._wal_per_request((10, 1, 1_000), (110, 6, 51_000), 0) is None


def _load_run_py():
    """loadtests/run.py as a module (it is a script, not a package member)."""
    spec = importlib.util.spec_from_file_location("konvert_loadtests_run", LOADTESTS / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_seeded_history_must_fit_in_the_members_life_and_the_program_s_expiry() -> None:
    from dataclasses import replace

    from harness.seed import ProgramFacts, history_problem

    facts = ProgramFacts(
        partner="webshop", return_window_days=14, expire_after_days=730, tier_window_days=365,
        tier_names=[], tier_thresholds=[],
    )  # fmt: skip

    assert history_problem(facts, 3, 30) is None  # the default: 60 and 90 days old (+ up to 19)
    assert history_problem(facts, 100, 3) is None  # frequent shoppers: up to 328 days old
    assert "older than the members" in history_problem(facts, 20, 30)
    assert "past the program's expiry" in history_problem(replace(facts, expire_after_days=200), 100, 3)
