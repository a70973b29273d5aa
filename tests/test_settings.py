"""The settings table: one list of rows gives the Settings fields, the twistd options, the specs,
RELOADABLE and SECRET_SETTINGS."""
import typing
from dataclasses import fields

from sentinel_proxy.config import RELOADABLE, SECRET_SETTINGS, SPECS, SPECS_BY_FIELD, Settings, load_settings
from sentinel_proxy.ops.admin import masked
from sentinel_proxy.tap import Options


def test_fields_options_and_specs_are_one_list():
    names = [spec.field for spec in SPECS]
    assert [f.name for f in fields(Settings)] == names + ["demo"], "demo is a flag, not a setting"
    assert [parameter[0] for parameter in Options.optParameters] == [spec.option for spec in SPECS]
    assert [flag[0] for flag in Options.optFlags] == ["demo"]
    assert list(Options().cli_values()) == names
    assert list(SPECS_BY_FIELD) == names
    assert len({spec.env for spec in SPECS}) == len({spec.option for spec in SPECS}) == len(SPECS)


def test_each_field_holds_what_its_parser_returns():
    declared = typing.get_type_hints(Settings)
    for spec in SPECS:
        assert typing.get_type_hints(spec.parse)["return"] == declared[spec.field], spec.field


def test_every_option_checks_with_its_settings_parser():
    for name, _, default, _, coerce in Options.optParameters:
        spec = next(s for s in SPECS if s.option == name)
        assert default is None, "an option given is an option that wins: no default here"
        if spec.default is not None:
            assert coerce(spec.default) == spec.default, "the option keeps its text for load_settings"


def test_reloadable_and_secret_settings_come_from_the_table():
    assert RELOADABLE == {spec.field for spec in SPECS if spec.reload}
    assert SECRET_SETTINGS == {spec.field for spec in SPECS if spec.secret} == {"admin_token", "api_keys"}
    # What the runbook promises operators (docs/runbook.md, section 3), and what cannot change live.
    assert {"backends", "admin_token", "api_keys", "log_level", "max_in_flight"} <= RELOADABLE
    assert not {"port", "listen", "workers", "log_format", "cache", "rate_limit"} & RELOADABLE


def test_every_secret_is_masked():
    settings = load_settings(cli={"backends": "http://a:1", "admin_token": "t" * 20, "api_keys": "k" * 20},
                             environ={}, dotenv_path=None)
    for name in SECRET_SETTINGS:
        assert masked(name, getattr(settings, name)) == "***", name
