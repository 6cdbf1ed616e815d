"""Settings from KONVERT_* variables and the program file: what loads, and what is refused and why."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from konvert.errors import ConfigurationError
from konvert.program import Program, example_program_text, load_program, parse_program
from konvert.redis_client import RedisTarget, parse_redis_url
from konvert.settings import Settings, load_settings

# Settings: every test passes its own environ, so the real environment never leaks in.


def test_defaults_without_any_variable() -> None:
    settings = load_settings({})

    assert settings.database_url == ""
    assert settings.redis_url == ""
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.workers == 1
    assert settings.request_max_body_bytes == 256 * 1024
    assert settings.auth_cache_seconds == 5.0
    assert settings.log_member_ids is False
    assert settings.embedded_database and settings.embedded_redis


def test_variables_are_converted_to_their_types() -> None:
    settings = load_settings(
        {
            "KONVERT_PORT": "8080",
            "KONVERT_AUTH_CACHE_SECONDS": "0.5",
            "KONVERT_LOG_MEMBER_IDS": "true",
            "KONVERT_DATABASE_URL": "postgresql://db/konvert",
            "KONVERT_DATA_DIR": "/srv/konvert",
        }
    )

    assert settings.port == 8080
    assert settings.auth_cache_seconds == 0.5
    assert settings.log_member_ids is True
    assert settings.database_url == "postgresql://db/konvert"
    assert settings.data_dir == "/srv/konvert"
    assert not settings.embedded_database


@pytest.mark.parametrize("value", ["abc", "", "70000", "0", "-1"])
def test_a_bad_port_is_refused_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigurationError, match="KONVERT_PORT"):
        load_settings({"KONVERT_PORT": value})


def test_a_value_outside_a_choice_is_refused_naming_the_variable() -> None:
    with pytest.raises(ConfigurationError, match="KONVERT_LOG_LEVEL"):
        load_settings({"KONVERT_LOG_LEVEL": "loud"})


def test_members_are_locked_together_unless_one_by_one_is_chosen() -> None:
    assert load_settings({}).lock_one_by_one is False
    assert load_settings({"KONVERT_LOCK_MEMBERS": "one_by_one"}).lock_one_by_one is True
    with pytest.raises(ConfigurationError, match="KONVERT_LOCK_MEMBERS"):
        load_settings({"KONVERT_LOCK_MEMBERS": "per_shard"})


def test_an_unknown_variable_is_refused_naming_it() -> None:
    with pytest.raises(ConfigurationError, match="KONVERT_FOO"):
        load_settings({"KONVERT_FOO": "1"})


def test_pool_minimum_above_maximum_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="KONVERT_DB_POOL_MIN"):
        load_settings({"KONVERT_DB_POOL_MIN": "50", "KONVERT_DB_POOL_MAX": "10"})


def test_redis_urls_name_a_server_a_cluster_or_a_sentinel() -> None:
    assert parse_redis_url("unix:///run/redis.sock?db=2") == RedisTarget("server")
    assert parse_redis_url("redis+cluster://a:7000,[::1]:7001,b") == RedisTarget(
        "cluster", (("a", 7000), ("::1", 7001), ("b", 6379))
    )
    assert parse_redis_url("rediss+sentinel://u:p%40ss@s1:26380,s2/mymaster/3") == RedisTarget(
        "sentinel", (("s1", 26380), ("s2", 26379)), "u", "p@ss", True, "mymaster", 3
    )
    assert load_settings({"KONVERT_REDIS_URL": "redis+cluster://a:7000,b:7000"}).redis_url.startswith("redis+")


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://cache:6379", "must start with redis://"),
        ("redis+cluster://a:7000/3", "database 0 only"),
        ("redis+cluster://a:99999", "not host:port"),
        ("redis+sentinel://s1:26379", "names the service"),
    ],
)
def test_a_redis_url_konvert_cannot_read_stops_start_up_naming_it(url: str, why: str) -> None:
    with pytest.raises(ConfigurationError, match=f"KONVERT_REDIS_URL .*{why}"):
        load_settings({"KONVERT_REDIS_URL": url})


def test_test_and_bench_variables_are_ignored() -> None:
    settings = load_settings({"KONVERT_TEST_DATABASE_URL": "postgresql://elsewhere", "KONVERT_BENCH_RATE": "x"})

    assert settings == load_settings({})


def test_other_variables_are_ignored() -> None:
    assert load_settings({"PATH": "/bin", "konvert_port": "1", "PORT": "1"}).port == 8000


def test_overrides_win_over_variables() -> None:
    assert load_settings({"KONVERT_PORT": "8080"}, port=9090).port == 9090


def test_settings_are_frozen() -> None:
    settings = load_settings({})

    with pytest.raises(AttributeError):
        settings.port = 9000  # type: ignore[misc]
    assert settings.replace(port=9000).port == 9000
    assert settings.port == 8000


def test_every_setting_has_a_default() -> None:
    # A setting without a default would make the service refuse to start on an empty environment.
    assert all(
        field.default is not msgspec.NODEFAULT or field.default_factory is not msgspec.NODEFAULT
        for field in msgspec.structs.fields(Settings)
    )


# The program file.

PROGRAM_HEAD = """
name = "Test program"

[[partners]]
id = "shop"
"""


def program_with(extra: str) -> str:
    return PROGRAM_HEAD + extra


def test_the_shipped_example_program_loads() -> None:
    program = parse_program(example_program_text())

    assert isinstance(program, Program)
    assert program.name
    assert program.has_partner("webshop")
    assert program.earning.rates


def test_a_minimal_program_loads() -> None:
    program = parse_program(PROGRAM_HEAD)

    assert [p.id for p in program.partners] == ["shop"]


def test_a_program_is_frozen() -> None:
    program = parse_program(PROGRAM_HEAD)

    with pytest.raises(AttributeError):
        program.name = "other"  # type: ignore[misc]


def test_decimals_stay_exact() -> None:
    program = parse_program(program_with('[[earning.rates]]\ncurrency = "EUR"\npoints_per_unit = 1.1\n'))

    assert str(program.earning.rates[0].points_per_unit) == "1.1"


def test_a_wrong_type_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigurationError, match=r"points\.return_window_days"):
        parse_program(program_with('[points]\nreturn_window_days = "ten"\n'))


def test_an_unknown_key_is_refused_naming_it() -> None:
    with pytest.raises(ConfigurationError, match=r"points.*return_window_dayz"):
        parse_program(program_with("[points]\nreturn_window_dayz = 3\n"))


def test_an_unknown_top_level_key_is_refused_naming_it() -> None:
    with pytest.raises(ConfigurationError, match="colour"):
        parse_program('name = "Test program"\ncolour = "blue"\n[[partners]]\nid = "shop"\n')


@pytest.mark.parametrize("multiplier", ["-1", "-0.5"])
def test_a_negative_multiplier_is_refused_naming_the_key(multiplier: str) -> None:
    text = program_with(f'[[earning.categories]]\ncategory = "books"\nmultiplier = {multiplier}\n')

    with pytest.raises(ConfigurationError, match=r"earning\.categories\[0\].*multiplier"):
        parse_program(text)


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_a_rate_that_is_not_a_non_negative_number_is_refused(value: str) -> None:
    text = program_with(f'[[earning.rates]]\ncurrency = "EUR"\npoints_per_unit = {value}\n')

    with pytest.raises(ConfigurationError, match=r"earning\.rates\[0\].*points_per_unit"):
        parse_program(text)


def test_a_campaign_ending_before_it_starts_is_refused_naming_it() -> None:
    text = program_with(
        '[[earning.campaigns]]\nid = "spring"\nstarts_at = 2026-03-01T00:00:00Z\nends_at = 2026-02-01T00:00:00Z\n'
    )

    with pytest.raises(ConfigurationError, match=r"earning\.campaigns\[0\].*spring.*ends_at"):
        parse_program(text)


def test_a_campaign_without_a_utc_offset_is_refused() -> None:
    text = program_with(
        '[[earning.campaigns]]\nid = "spring"\nstarts_at = 2026-03-01T00:00:00\nends_at = 2026-04-01T00:00:00\n'
    )

    with pytest.raises(ConfigurationError, match=r"earning\.campaigns\[0\].*UTC offset"):
        parse_program(text)


def test_a_program_without_partners_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="partners"):
        parse_program('name = "Test program"\n')


def test_duplicate_partners_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="partners"):
        parse_program(PROGRAM_HEAD + '\n[[partners]]\nid = "shop"\n')


def test_a_rate_naming_an_unknown_partner_is_refused_naming_it() -> None:
    text = program_with('[[earning.rates]]\ncurrency = "EUR"\npartner = "nowhere"\npoints_per_unit = 1\n')

    with pytest.raises(ConfigurationError, match=r"earning\.rates.*nowhere"):
        parse_program(text)


def test_a_campaign_naming_an_unknown_partner_is_refused_naming_it() -> None:
    text = program_with(
        '[[earning.campaigns]]\nid = "spring"\npartners = ["nowhere"]\n'
        "starts_at = 2026-03-01T00:00:00Z\nends_at = 2026-04-01T00:00:00Z\n"
    )

    with pytest.raises(ConfigurationError, match=r"earning\.campaigns.*nowhere"):
        parse_program(text)


def test_two_rates_for_the_same_currency_and_partner_are_refused() -> None:
    rate = '[[earning.rates]]\ncurrency = "EUR"\npoints_per_unit = 1\n'

    with pytest.raises(ConfigurationError, match=r"earning\.rates"):
        parse_program(program_with(rate + rate))


def test_invalid_toml_is_refused_with_the_source_name() -> None:
    with pytest.raises(ConfigurationError, match=r"my\.toml: not valid TOML"):
        parse_program("name = ", source="my.toml")


def test_an_unreadable_program_file_is_refused_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"

    with pytest.raises(ConfigurationError, match=r"missing\.toml"):
        load_program(str(missing))


def test_load_program_reads_the_file_and_names_it_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "program.toml"
    path.write_text(program_with("[points]\nreturn_window_dayz = 3\n"), "utf-8")

    with pytest.raises(ConfigurationError, match=re.escape(f"program file {path}: ") + ".*return_window_dayz"):
        load_program(str(path))
