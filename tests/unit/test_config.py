"""Typed configuration: defaults, validation messages that name dotted keys, loading."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from theychat.daemons.config import Config, from_mapping, load
from theychat.daemons.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def config_error(data: Any) -> str:
    """The message of the ConfigError that `data` raises; it must be one line."""
    with pytest.raises(ConfigError) as exc:
        from_mapping(data)
    message = str(exc.value)
    assert "\n" not in message and message.strip() == message, repr(message)
    return message


# --------------------------------------------------------------------------------------
# Defaults


def test_defaults() -> None:
    cfg = Config()
    assert cfg.state_dir is None
    assert cfg.listen.host == "127.0.0.1"
    assert cfg.listen.port == 7000
    assert cfg.topics.names == ["general", "random"]
    assert cfg.heartbeat.interval_ms == 100
    assert cfg.heartbeat.timeout_ms == 500
    assert cfg.log.level == "info"
    assert cfg.history.size == 1000
    assert cfg.clients.rate_per_second == 20.0
    assert cfg.clients.rate_burst == 50


@pytest.mark.parametrize("data", [None, {}])
def test_empty_mapping_is_defaults(data: Any) -> None:
    assert from_mapping(data) == Config()


def test_load_none_is_defaults() -> None:
    assert load(None) == Config()


def test_default_topics_are_not_shared() -> None:
    a, b = Config(), Config()
    a.topics.names.append("x")
    assert b.topics.names == ["general", "random"]


# --------------------------------------------------------------------------------------
# from_mapping


def test_nested_partial_mapping_keeps_other_defaults() -> None:
    cfg = from_mapping({"listen": {"port": 7100}, "heartbeat": {"timeout_ms": 900},
                        "topics": ["rust", "python"], "log": {"level": "debug"}})
    assert cfg.listen.port == 7100
    assert cfg.listen.host == "127.0.0.1"
    assert cfg.heartbeat.timeout_ms == 900
    assert cfg.heartbeat.interval_ms == 100
    assert cfg.topics.names == ["rust", "python"]
    assert cfg.log.level == "debug"
    assert cfg.clients == Config().clients


def test_section_null_means_defaults() -> None:
    assert from_mapping({"listen": None, "clients": None}) == Config()


def test_int_accepted_for_float() -> None:
    cfg = from_mapping({"clients": {"rate_per_second": 3}})
    assert cfg.clients.rate_per_second == 3.0
    assert isinstance(cfg.clients.rate_per_second, float)


def test_state_dir_string() -> None:
    assert from_mapping({"state_dir": "/srv/chat"}).state_dir == "/srv/chat"
    assert from_mapping({"state_dir": None}).state_dir is None


def test_range_edges_accepted() -> None:
    cfg = from_mapping({"listen": {"port": 1}, "history": {"size": 0}})
    assert cfg.listen.port == 1 and cfg.history.size == 0
    assert config_error({"listen": {"port": 0}}) == "listen.port: must be at least 1, got 0"
    assert from_mapping({"listen": {"port": 65535}}).listen.port == 65535


# --------------------------------------------------------------------------------------
# Errors name the dotted key


def test_exact_message_for_wrong_type() -> None:
    assert (
        config_error({"heartbeat": {"interval_ms": "fast"}})
        == "heartbeat.interval_ms: expected an integer, got 'fast'"
    )


def test_unknown_nested_key_named() -> None:
    message = config_error({"listen": {"hots": "0.0.0.0"}})
    assert message.startswith("listen.hots: unknown key")
    assert "host" in message and "port" in message  # it lists the known keys


def test_unknown_top_level_key_named() -> None:
    assert config_error({"topic": ["a"]}).startswith("topic: unknown key")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"listen": {"port": True}}, "listen.port: expected an integer, got True"),
        ({"history": {"size": False}}, "history.size: expected an integer, got False"),
        ({"clients": {"rate_per_second": True}},
         "clients.rate_per_second: expected a number, got True"),
        ({"listen": {"port": 7000.0}}, "listen.port: expected an integer, got 7000.0"),
        ({"listen": {"host": 5}}, "listen.host: expected a string, got 5"),
        ({"state_dir": ["a"]}, "state_dir: expected a string, got list"),
        ({"listen": "0.0.0.0:7000"}, "listen: expected a mapping, got '0.0.0.0:7000'"),
        ({"topics": "general"}, "topics: expected a mapping, got 'general'"),
        ({"topics": {"a": 1}}, "topics.a: unknown key (known keys here: allow_create, max, names)"),
        ({"topics": {"names": ["ok", "b d"]}},
         "topics.names[1]: 'b d' is not 1-32 of A-Z a-z 0-9 _ -"),
        ({"topics": {"allow_create": "yes"}},
         "topics.allow_create: expected true or false, got 'yes'"),
        ({"operators": [{"name": "root", "password_hash": "hunter2"}]},
         "operators[0].password_hash: expected a hash made by `theychat hash-password` "
         "(never the password itself)"),
        ({"topics": ["ok", 5]}, "topics[1]: expected a string, got 5"),
    ],
)
def test_type_errors(data: Any, expected: str) -> None:
    assert config_error(data) == expected


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"listen": {"port": 65536}}, "listen.port"),
        ({"listen": {"port": -1}}, "listen.port"),
        ({"heartbeat": {"interval_ms": 5}}, "heartbeat.interval_ms"),
        ({"clients": {"rate_per_second": 0.01}}, "clients.rate_per_second"),
        ({"clients": {"max_connections": 0}}, "clients.max_connections"),
        ({"supervision": {"max_restarts": 0}}, "supervision.max_restarts"),
    ],
)
def test_out_of_range_names_key(data: Any, key: str) -> None:
    message = config_error(data)
    assert message.startswith(f"{key}: must be at ")


def test_out_of_range_message() -> None:
    assert config_error({"listen": {"port": 70000}}) == (
        "listen.port: must be at most 65535, got 70000"
    )


def test_log_level_choices() -> None:
    assert config_error({"log": {"level": "loud"}}) == (
        "log.level: expected one of debug, info, warning, error, got 'loud'"
    )


@pytest.mark.parametrize("bad", ["has space", "c++", "", "x" * 33, "é"])
def test_bad_topic_name_names_index(bad: str) -> None:
    message = config_error({"topics": ["general", bad]})
    assert message.startswith("topics[1]: ")
    assert repr(bad) in message


def test_duplicate_topics_case_insensitive() -> None:
    assert config_error({"topics": ["general", "random", "General"]}) == (
        "topics[2]: 'General' is listed twice"
    )


def test_no_topics() -> None:
    assert config_error({"topics": []}) == "topics: expected at least one topic"


@pytest.mark.parametrize(("interval", "timeout"), [(100, 100), (500, 200)])
def test_timeout_must_exceed_interval(interval: int, timeout: int) -> None:
    message = config_error({"heartbeat": {"interval_ms": interval, "timeout_ms": timeout}})
    assert message == (
        "heartbeat.timeout_ms: must be greater than heartbeat.interval_ms "
        f"({timeout} <= {interval})"
    )


def test_timeout_just_above_interval_is_fine() -> None:
    cfg = from_mapping({"heartbeat": {"interval_ms": 100, "timeout_ms": 101}})
    assert cfg.heartbeat.timeout_ms == 101


def test_empty_host() -> None:
    assert config_error({"listen": {"host": ""}}) == "listen.host: must not be empty"


@pytest.mark.parametrize("data", [["a"], "text", 5])
def test_non_mapping_top_level(data: Any) -> None:
    assert config_error(data).startswith("top level: expected a mapping")


def test_error_message_with_newline_in_value_is_one_line() -> None:
    assert config_error({"log": {"level": "info\nx"}}).endswith("got 'info\\nx'")
    assert config_error({"topics": ["a\nb"]}).startswith("topics[0]: 'a\\nb'")


def test_unknown_key_with_newline_is_one_line() -> None:
    config_error({"listen": {"bad\nkey": 1}})


def test_nan_rate_rejected() -> None:
    config_error({"clients": {"rate_per_second": float("nan")}})


def test_topic_with_trailing_newline_rejected() -> None:
    assert config_error({"topics": ["general\n"]}).startswith("topics[0]: ")


def test_config_is_frozen() -> None:
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.listen.port = 1  # type: ignore[misc]


# --------------------------------------------------------------------------------------
# load()


def one_line_error(path: Path) -> str:
    with pytest.raises(ConfigError) as exc:
        load(path)
    message = str(exc.value)
    assert "\n" not in message, repr(message)
    return message


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    message = one_line_error(path)
    assert message.startswith(f"{path}: cannot read config")
    assert "No such file" in message


def test_load_invalid_yaml_has_line_number(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("listen:\n  port: 7000\ntopics: [general, random\nlog: {}\n")
    message = one_line_error(path)
    assert message.startswith(f"{path}: line ")
    assert "invalid YAML" in message
    line = int(message.split(" line ")[1].split()[0])
    assert 3 <= line <= 5


def test_load_yaml_tab_indent_error(tmp_path: Path) -> None:
    path = tmp_path / "tab.yaml"
    path.write_text("listen:\n\tport: 7000\n")
    assert " line 2 column 1: invalid YAML" in one_line_error(path)


def test_load_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"topics: [caf\xe9]\n")
    assert one_line_error(path) == f"{path}: config is not valid UTF-8"


def test_load_empty_file_is_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load(path) == Config()
    path.write_text("# only a comment\n")
    assert load(path) == Config()


def test_load_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("listen:\n  port: 7001\ntopics: [rust]\nheartbeat:\n  interval_ms: 50\n")
    cfg = load(str(path))
    assert cfg.listen.port == 7001
    assert cfg.topics.names == ["rust"]
    assert cfg.heartbeat.interval_ms == 50


def test_load_validation_error_names_key(tmp_path: Path) -> None:
    path = tmp_path / "v.yaml"
    path.write_text("heartbeat:\n  interval_ms: fast\n")
    assert one_line_error(path) == "heartbeat.interval_ms: expected an integer, got 'fast'"


def test_load_top_level_list(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    assert one_line_error(path) == "top level: expected a mapping of keys, got list"


def test_documented_config_matches_defaults() -> None:
    path = REPO / "config" / "theychat.yaml"
    if not path.exists():
        pytest.skip("config/theychat.yaml not written yet")
    cfg = load(path)
    assert dataclasses.replace(cfg, state_dir=None) == Config()


# --------------------------------------------------------------------------------------
# resolved_state_dir()


def test_state_dir_explicit_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/theychat")
    monkeypatch.setenv("XDG_STATE_HOME", "/xdg")
    cfg = from_mapping({"state_dir": str(tmp_path / "mine")})
    assert cfg.resolved_state_dir() == tmp_path / "mine"


def test_state_dir_explicit_expands_user(monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = from_mapping({"state_dir": "~/chat"})
    assert cfg.resolved_state_dir() == tmp_path / "chat"


def test_state_dir_relative_is_made_absolute(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    resolved = from_mapping({"state_dir": "rel"}).resolved_state_dir()
    assert resolved.is_absolute()
    assert resolved == tmp_path / "rel"


def test_state_dir_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/theychat:/var/lib/other")
    monkeypatch.setenv("XDG_STATE_HOME", "/xdg")
    assert Config().resolved_state_dir() == Path("/var/lib/theychat")


def test_state_dir_xdg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", "/xdg/state")
    assert Config().resolved_state_dir() == Path("/xdg/state/theychat")


def test_state_dir_home_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Config().resolved_state_dir() == tmp_path / ".local" / "state" / "theychat"


def test_state_dir_empty_env_ignored(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "")
    monkeypatch.setenv("XDG_STATE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Config().resolved_state_dir() == tmp_path / ".local" / "state" / "theychat"
