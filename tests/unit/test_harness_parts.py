"""Pure parts of the load-test harness (loadtests/harness), which CI otherwise runs only end to end."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtests"))

from harness.load import pgbench_connection_args


def test_pgbench_connects_where_the_url_points_over_tcp() -> None:
    args, env = pgbench_connection_args("postgresql://bench:s%40cret@db.internal:5433/konvert_bench_1")

    assert args == ["-h", "db.internal", "-p", "5433", "-U", "bench", "konvert_bench_1"]
    assert env == {"PGPASSWORD": "s@cret"}


def test_pgbench_uses_the_unix_socket_a_host_query_names() -> None:
    args, env = pgbench_connection_args("postgresql://postgres@/konvert_bench_1?host=/var/run/postgresql")

    assert args == ["-h", "/var/run/postgresql", "-p", "5432", "-U", "postgres", "konvert_bench_1"]
    assert env == {}
