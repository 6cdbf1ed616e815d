"""Pure parts of the load-test harness (loadtests/harness), which CI otherwise runs only end to end."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import os
import shutil
import subprocess
import sys
from contextlib import redirect_stdout
from datetime import UTC, datetime
from pathlib import Path

import pytest

LOADTESTS = Path(__file__).resolve().parents[2] / "loadtests"
sys.path.insert(0, str(LOADTESTS))

from harness import baseline, checks, cli_args, report, webhooks  # noqa: E402
from harness.jobs import JOBS, parse_counts, per_second  # noqa: E402
from harness.load import pgbench_connection_args  # noqa: E402
from harness.measure import median_run  # noqa: E402
from harness.runner import memory_summary  # noqa: E402
from harness.service import run_cli  # noqa: E402
from harness.side import Install  # noqa: E402
from harness.stats import wal_per_request  # noqa: E402
from konvert.integrations.model import EarnPurchase, Options  # noqa: E402
from konvert.integrations.sources import read_shopify  # noqa: E402


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
    per_request = wal_per_request((10, 1, 1_000, 7), (110, 6, 51_000, 17), 50)

    assert per_request == {"records": 2.0, "full_page_images": 0.1, "bytes": 1000, "transactions": 0.2}
    assert wal_per_request(None, (110, 6, 51_000), 50) is None  # no pg_stat_wal (PostgreSQL < 14)
    assert wal_per_request((10, 1, 1_000), (110, 6, 51_000), 0) is None


def test_a_seeded_history_must_fit_in_the_members_life_and_the_program_s_expiry() -> None:
    from dataclasses import replace

    from harness.seed import ProgramFacts, history_problem

    facts = ProgramFacts(
        partner="webshop",
        return_window_days=14,
        expire_after_days=730,
        tier_window_days=365,
        tier_names=[],
        tier_thresholds=[],
    )

    assert history_problem(facts, 3, 30) is None  # the default: 60 and 90 days old (+ up to 19)
    assert history_problem(facts, 100, 3) is None  # frequent shoppers: up to 328 days old
    assert "older than the members" in history_problem(facts, 20, 30)
    assert "past the program's expiry" in history_problem(replace(facts, expire_after_days=200), 100, 3)


# --- options ---------------------------------------------------------------------------------------


def test_the_no_op_is_the_one_baseline_endpoint_and_the_routed_one_is_gone() -> None:
    assert cli_args.expand_scenarios("baselines,purchases") == ["noop", "pgbench", "pgbench_own_sql", "purchases"]
    assert cli_args.HTTP_SCRIPTS["noop"] == "noop"
    with pytest.raises(ValueError, match="unknown scenario 'noop_routed'"):
        cli_args.expand_scenarios("noop_routed")
    assert not (LOADTESTS / "wrk" / "noop_routed.lua").exists()


def test_a_baseline_ref_is_an_option_and_none_by_default() -> None:
    plain = cli_args.parse_args(["--quick", "--scenarios", "purchases,noop"])
    compared = cli_args.parse_args(["--quick", "--baseline-ref", "89afc5e", "--baseline-cache", "/tmp/b"])

    assert plain.baseline_ref is None and plain.current_python is None
    assert plain.scenario_names == ["noop", "purchases"]  # canonical order
    assert plain.baseline_cache == cli_args.DEFAULT_BASELINE_CACHE
    assert compared.baseline_ref == "89afc5e" and compared.baseline_cache == Path("/tmp/b")
    assert "git" in cli_args.missing_tools_hint(["git"]) and "wrk" not in cli_args.missing_tools_hint(["git"])


# --- the konvert under test ------------------------------------------------------------------------


def test_every_cli_call_goes_through_the_install_s_own_command() -> None:
    # The command prefix is what runs: here a Python that prints the arguments it was given.
    echo = (sys.executable, "-c", "import sys; print(' '.join(sys.argv[1:]))")

    done = run_cli(echo, {}, "jobs", "run")

    assert done.returncode == 0 and done.stdout.strip() == "jobs run"
    assert Install("baseline", "/b/.venv/bin/python", "abc").konvert == ("/b/.venv/bin/python", "-m", "konvert")


# --- the jobs through the CLI ----------------------------------------------------------------------


def test_the_jobs_counts_are_read_from_the_cli_s_output() -> None:
    output = "vested_lots: 12\nreleased_holds: 0\nexpired_lots: 3\ntiers_reevaluated: 7\nwarning: slow: yes\n"

    assert parse_counts(output) == {"vested_lots": 12, "released_holds": 0, "expired_lots": 3, "tiers_reevaluated": 7}
    assert {job.output_key for job in JOBS} == {"vested_lots", "expired_lots", "tiers_reevaluated"}
    assert [job.name for job in JOBS][-1] == "expiry"  # it expires every lot: the others come first
    assert per_second(300, 1.5) == 200.0 and per_second(5, 0.0) == 0.0


# --- ratios, targets, the table --------------------------------------------------------------------


def _scenario(rps: float, p99: float = 5.0) -> dict:
    return {"throughput_rps": rps, "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": p99}, "errors": {}, "usage": {}}


def _config(baseline_commit: str | None, purchases: float, baseline_purchases: float = 1000.0) -> dict:
    config = {
        "members": 2000,
        "workers": 2,
        "scenarios": {
            "pgbench": _scenario(4000),
            "noop": _scenario(20000),
            "balance_warm": _scenario(15000),
            "purchases": _scenario(purchases),
        },
        "jobs": {"vesting": {"settled": 100, "seconds": 0.5, "per_second": 200.0, "runs": 1}},
    }
    if baseline_commit is not None:
        config["baseline"] = {
            "commit": baseline_commit,
            "members": 2000,
            "workers": 2,
            "scenarios": {"noop": _scenario(10000), "purchases": _scenario(baseline_purchases)},
            "jobs": {"vesting": {"settled": 100, "seconds": 1.0, "per_second": 100.0}},
        }
    config["ratios"] = report.config_ratios(config)
    return config


def test_the_current_install_is_measured_against_the_baseline_scenario_by_scenario() -> None:
    ratios = _config("89afc5e5bb041d739624f1230d906d718dbbda4d", purchases=950)["ratios"]

    assert ratios["purchases_vs_baseline"] == 0.95
    assert ratios["noop_vs_baseline"] == 2.0
    assert ratios["vesting_vs_baseline"] == 2.0
    # pgbench ran once for both sides, and balance_warm only on the current one: no ratio.
    assert "pgbench_vs_baseline" not in ratios and "balance_warm_vs_baseline" not in ratios
    assert not any("noop_routed" in name for name in ratios)
    assert not any(name.endswith("_vs_baseline") for name in _config(None, purchases=950)["ratios"])


def _acceptance(config: dict) -> tuple[report.Target, report.Target]:
    purchases, warm = (t for t in report.targets([config]) if "baseline" in t.name or "every balance cached" in t.name)
    return purchases, warm


def test_the_redesign_s_acceptance_figures_are_targets() -> None:
    met, warm = _acceptance(_config("89afc5e5bb041d739624f1230d906d718dbbda4d", purchases=950))
    missed, _ = _acceptance(_config("89afc5e5bb041d739624f1230d906d718dbbda4d", purchases=850))
    other, _ = _acceptance(_config("0123456789abcdef", purchases=950))
    absent, _ = _acceptance(_config(None, purchases=950))

    assert (met.value, met.met, met.goal) == (0.95, True, f">= {report.PURCHASES_VS_BASELINE_MIN}x")
    assert (missed.value, missed.met) == (0.85, False)
    assert other.met is True and "not the acceptance figure" in other.note
    assert absent.value is None and absent.met is None and "--baseline-ref 89afc5e" in absent.note
    assert (warm.value, warm.met, warm.goal) == (0.75, True, f">= {report.BALANCE_WARM_VS_NOOP_MIN}x")


def test_the_table_puts_each_baseline_row_before_the_current_one() -> None:
    config = _config("89afc5e5bb041d739624f1230d906d718dbbda4d", purchases=1100)
    config["correctness"] = config["baseline"]["correctness"] = {"nothing_lost": True, "audit_passed": True}
    result = {
        "configs": [config],
        "settings": {"connections": 32, "duration_s": 3.0},
        "nothing_lost": True,
        "audit_passed": True,
        "targets": [t.as_dict() for t in report.targets([config])],
    }

    rows = [name for name, _, _ in report.table_rows(config)]
    printed = io.StringIO()
    with redirect_stdout(printed):
        report.print_report(result)

    assert rows == ["pgbench", "noop (baseline)", "noop", "balance_warm", "purchases (baseline)", "purchases"]
    text = printed.getvalue()
    assert "vs base" in text and "against baseline 89afc5e5bb04" in text
    purchases_row = next(line for line in text.splitlines() if line.split()[:1] == ["purchases"] and "(" not in line)
    assert purchases_row.split()[-2] == "1.10x", purchases_row
    assert "current / baseline: noop 2.00x, purchases 1.10x, vesting 2.00x" in text


def test_memory_and_the_median_run_are_taken_from_the_scenarios() -> None:
    usage = lambda end: {"peak_rss_mib": end + 1, "peak_rss_per_process_mib": 50.0, "rss_end_mib": end}  # noqa: E731
    scenarios = {
        "pgbench": {"usage": {"peak_rss_mib": 0.0}},
        "noop": {"usage": usage(100.0)},
        "purchases": {"usage": usage(110.0)},
    }

    memory = memory_summary(scenarios)
    median = median_run(
        [_scenario(3) | {"usage": {"cpu_percent_by_group": {}}} for _ in range(1)]
        + [_scenario(rps) | {"usage": {"cpu_percent_by_group": {}}} for rps in (1, 2)]
    )

    assert memory["rss_after_first_scenario_mib"] == 100.0 and memory["rss_growth"] == 1.1
    assert memory["peak_rss_mib"] == 111.0
    assert memory_summary({"pgbench": {"usage": {}}}) is None
    assert median["throughput_rps"] == 2 and [r["throughput_rps"] for r in median["repetitions"]] == [3, 1, 2]


# --- the baseline's export and its cache -----------------------------------------------------------


def _git(repository: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repository), *args],
        capture_output=True,
        text=True,
        check=True,
        env={
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@t",
            "PATH": "/usr/bin:/bin",
        },
    ).stdout.strip()


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    if shutil.which("git") is None or shutil.which("tar") is None:
        pytest.skip("needs git and tar")
    repository = tmp_path / "repo"
    repository.mkdir()
    _git(repository, "init", "-q")
    (repository / "pyproject.toml").write_text("[project]\nname = 'old'\n")
    _git(repository, "add", ".")
    _git(repository, "commit", "-q", "-m", "old")
    (repository / "pyproject.toml").write_text("[project]\nname = 'new'\n")  # uncommitted: not exported
    return repository


def test_a_baseline_is_exported_from_its_commit_with_git_archive(repository: Path, tmp_path: Path) -> None:
    commit = baseline.resolve_commit("HEAD", repository)
    target = tmp_path / "export"

    baseline._export(repository, commit, target)

    assert len(commit) == 40 and commit == _git(repository, "rev-parse", "HEAD")
    assert (target / "pyproject.toml").read_text() == "[project]\nname = 'old'\n"
    with pytest.raises(baseline.BaselineError, match="names no commit"):
        baseline.resolve_commit("no-such-ref", repository)


def test_a_finished_baseline_build_is_reused_by_its_commit_id(repository: Path, tmp_path: Path) -> None:
    import platform

    commit = baseline.resolve_commit("HEAD", repository)
    cache = tmp_path / "cache"
    built = cache / commit
    (built / ".venv" / "bin").mkdir(parents=True)
    (built / ".venv" / "bin" / "python").write_text("")
    said: list[str] = []

    assert not baseline.is_ready(built, commit, platform.python_version())  # no marker: an unfinished build
    (built / baseline.READY_FILE).write_text(json.dumps(baseline.ready_marker(commit, platform.python_version())))
    found = baseline.prepare("HEAD", cache, said.append, repository)

    assert found == baseline.Baseline(commit, built.resolve()) and found.python.endswith(f"{commit}/.venv/bin/python")
    assert said == [f"baseline {commit[:12]}: reusing {built.resolve()}"]
    assert not baseline.is_ready(built, commit, "2.7.18")  # another Python: built again


# --- the webhooks scenario ----------------------------------------------------------------------

WRK_DIR = LOADTESTS / "wrk"
SHOPIFY_SECRET = "shpss_harness_test"


def _shopify_delivery(tmp_path: Path, tag: str, thread: int, n: int, member: int) -> tuple[str, dict[str, str], bytes]:
    """One delivery as loadtests/wrk/shopify.lua builds and signs it, in wrk's own LuaJIT."""
    script = tmp_path / "one-delivery.lua"
    script.write_text(
        f"package.path = {json.dumps(str(WRK_DIR) + '/?.lua;')} .. package.path\n"
        'local shopify = require("shopify")\n'
        "shopify.self_test()\n"
        f"local path, headers, body = shopify.delivery({thread}, {n}, {member})\n"
        'local out = assert(io.open(os.getenv("DELIVERY_OUT"), "w"))\n'
        'out:write(path, "\\n", headers["X-Shopify-Hmac-Sha256"], "\\n", headers["X-Shopify-Webhook-Id"], "\\n",'
        ' headers["X-Shopify-Topic"], "\\n", body)\n'
        "out:close()\n"
        "os.exit(0)\n"
    )
    out = tmp_path / "delivery.txt"
    env = os.environ | {
        "DELIVERY_OUT": str(out),
        "KONVERT_BENCH_TAG": tag,
        **webhooks.wrk_env(webhooks.Shop("/v1/integrations/shop/webhooks", SHOPIFY_SECRET), tag, "EUR"),
    }
    done = subprocess.run(
        ["wrk", "-t1", "-c1", "-d1s", "-s", str(script), "http://127.0.0.1:9/"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.exists(), done.stdout + done.stderr
    path, signature, webhook_id, topic, body = out.read_bytes().split(b"\n", 4)
    headers = {
        "x-shopify-hmac-sha256": signature.decode(),
        "x-shopify-webhook-id": webhook_id.decode(),
        "x-shopify-topic": topic.decode(),
    }
    return path.decode(), headers, body


@pytest.mark.skipif(shutil.which("wrk") is None, reason="needs wrk (Debian: apt-get install wrk)")
def test_wrk_signs_each_order_as_shopify_does_with_ids_beyond_2_to_the_53(tmp_path: Path) -> None:
    tag = "t0badcafe"
    path, headers, body = _shopify_delivery(tmp_path, tag, thread=2, n=42, member=7)
    assert path == "/v1/integrations/shop/webhooks"
    expected = base64.b64encode(hmac.new(SHOPIFY_SECRET.encode(), body, hashlib.sha256).digest()).decode()
    assert headers["x-shopify-hmac-sha256"] == expected
    assert headers["x-shopify-webhook-id"] == f"{tag}-002000000042"
    # konvert's own reader takes it as a paid order of the member's linked customer, every id exact.
    delivery = read_shopify(Options(), headers, body, datetime.now(UTC))
    assert isinstance(delivery.action, EarnPurchase), delivery
    order_id = delivery.action.purchase_id
    assert int(order_id) > 2**53 and webhooks.parse_order_id(order_id, webhooks.order_prefix(tag)) == (2, 42)
    assert delivery.external_id == str(webhooks.customer_id(7)) and int(delivery.external_id) > 2**53
    assert [line.line_id for line in delivery.action.lines] == [f"8{order_id[1:]}{k}" for k in (1, 2, 3)]
    assert delivery.action.currency == "EUR" and all(line.unit_price > 0 for line in delivery.action.lines)
    # Shaped like Shopify's sample order: its other fields are there too.
    sample = json.loads(webhooks.SAMPLE_ORDER.read_text())
    assert set(json.loads(body)) == set(sample)


def test_the_webhook_check_tells_this_run_s_orders_from_any_other() -> None:
    prefix = webhooks.order_prefix("t0000002a")
    assert prefix == "900042"
    ids = [f"{prefix}003000000017", f"{prefix}001000000001", "900043003000000017", "t0000002a-3-17", "42"]
    parsed, foreign = checks._parse_ids(ids, prefix, "w")
    assert parsed == {(3, 17), (1, 1)}
    assert foreign == ids[2:]


def test_webhooks_are_measured_against_purchases_in_the_same_run() -> None:
    config = {
        "members": 2000,
        "workers": 2,
        "scenarios": {"purchases": {"throughput_rps": 500.0}, "webhooks": {"throughput_rps": 450.0}},
    }
    config["ratios"] = report.config_ratios(config)
    assert config["ratios"]["webhooks_vs_purchases"] == 0.9
    found = {t.name.split(" (")[0]: t for t in report.targets([config])}
    target = found["signed Shopify deliveries / purchases"]
    assert (target.value, target.goal, target.met) == (0.9, ">= 0.8x", True)
    assert "webhooks" in cli_args.expand_scenarios("all") and "webhooks" in cli_args.WRITE_SCENARIOS
