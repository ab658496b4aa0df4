"""What `theychat soak` takes from the user's config (no tree is started here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from theychat.daemons.soak.run import SoakError, base_config


def test_an_ordinary_config_is_taken_as_it_is(tmp_path: Path) -> None:
    conf = tmp_path / "c.yaml"
    conf.write_text("history:\n  size: 77\n")
    assert base_config(str(conf)) == {"history": {"size": 77}}


def test_a_tls_config_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("")
    conf = tmp_path / "c.yaml"
    conf.write_text(f"listen:\n  tls:\n    cert: {tmp_path}/c.pem\n    key: {tmp_path}/c.pem\n")
    with pytest.raises(SoakError, match=r"listen\.tls: the soak's clients speak plain TCP"):
        base_config(str(conf))


def test_a_bad_config_names_its_key(tmp_path: Path) -> None:
    conf = tmp_path / "c.yaml"
    conf.write_text("history:\n  size: lots\n")
    with pytest.raises(Exception, match=r"history\.size: expected an integer"):
        base_config(str(conf))
