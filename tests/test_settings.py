"""The settings table: one list of rows gives the Settings fields, the twistd options, the specs,
RELOADABLE and SECRET_SETTINGS."""
import typing
from dataclasses import fields

import pytest

from sentinel_proxy.config import (RELOADABLE, SECRET_SETTINGS, SPECS, SPECS_BY_FIELD, ConfigError, Settings,
                                   load_settings)
from sentinel_proxy.ops.admin import masked
from sentinel_proxy.tap import Options


def test_fields_options_and_specs_are_one_list():
    names = [spec.field for spec in SPECS]
    assert [f.name for f in fields(Settings)] == names + ["demo"], "demo is a flag, not a setting"
    assert [parameter[0] for parameter in Options.optParameters] == [spec.option for spec in SPECS
                                                                     if spec.field != "listen"]
    assert "listen" in Options().synonyms, "--listen is a method of its own: it may be given several times"
    assert [flag[0] for flag in Options.optFlags] == ["demo"]
    assert list(Options().cli_values()) == names
    assert list(SPECS_BY_FIELD) == names
    assert len({spec.env for spec in SPECS}) == len({spec.option for spec in SPECS}) == len(SPECS)


def test_each_field_holds_what_its_parser_returns():
    declared = typing.get_type_hints(Settings)
    for spec in SPECS:
        assert typing.get_type_hints(spec.parse)["return"] == declared[spec.field], spec.field


def test_options_keep_their_text_for_load_settings(tmp_path, monkeypatch):
    for name, _, default, _ in Options.optParameters:
        assert default is None, "an option given is an option that wins: no default here"
    monkeypatch.chdir(tmp_path)
    for spec in SPECS:
        monkeypatch.delenv(spec.env, raising=False)
    options = Options()
    options.parseOptions(["--backends", "http://a:1", "--port", "0900", "--listen", "tcp:0", "--listen", "unix:s"])
    assert (options.cli_values()["port"], options.cli_values()["listen"]) == ("0900", "tcp:0 unix:s")


def test_reloadable_and_secret_settings_come_from_the_table():
    assert RELOADABLE == {spec.field for spec in SPECS if spec.reload}
    assert SECRET_SETTINGS == {spec.field for spec in SPECS if spec.secret} == {"admin_token", "api_keys", "metrics_token"}
    # What the runbook promises operators (docs/runbook.md, section 3), and what cannot change live.
    assert {"backends", "admin_token", "api_keys", "log_level", "max_in_flight"} <= RELOADABLE
    assert not {"port", "listen", "workers", "log_format", "cache", "rate_limit"} & RELOADABLE


def test_every_secret_is_masked():
    settings = load_settings(cli={"backends": "http://a:1", "admin_token": "t" * 20, "api_keys": "k" * 20,
                                  "metrics_token": "m" * 20},
                             environ={}, dotenv_path=None)
    for name in SECRET_SETTINGS:
        assert masked(name, getattr(settings, name)) == "***", name


def settings_with(**cli: str):
    return load_settings(cli={"backends": "http://a:1", **cli}, environ={}, dotenv_path=None)


def test_workers_auto_is_one_per_core(monkeypatch):
    import os

    from sentinel_proxy.settings import core_count

    assert settings_with(workers="auto").workers == settings_with(workers=" AUTO ").workers == core_count()
    assert core_count() == len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(3)))
    assert settings_with(workers="auto").workers == 3, "the cores this process may run on (its affinity)"
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(200)))
    assert settings_with(workers="auto").workers == 64, "at most 64"
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 5)
    assert settings_with(workers="auto").workers == 5, "no affinity (not Linux): every core"
    assert settings_with(workers="7").workers == 7


@pytest.mark.parametrize("value", ["0", "65", "two", "auto2", ""])
def test_workers_refuses_anything_but_auto_or_1_to_64(value):
    with pytest.raises(ConfigError, match="WORKERS|workers"):
        settings_with(workers=value)


def test_the_upstream_client_and_the_answer_memory_cap():
    defaults = settings_with()
    assert (defaults.upstream_client, defaults.max_buffered_answers_mb) == ("fast", 64)
    assert settings_with(upstream_client="Treq", max_buffered_answers_mb="8").upstream_client == "treq"
    for field, value in (("upstream_client", "agent"), ("max_buffered_answers_mb", "0")):
        with pytest.raises(ConfigError):
            settings_with(**{field: value})
    assert not {"upstream_client", "max_buffered_answers_mb", "workers"} & RELOADABLE, "they take a restart"
