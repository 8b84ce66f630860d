"""Firmware configs validate at start and name the bad field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_every_shipped_config_is_valid():
    files = sorted((REPO / "firmware_configs").glob("*.yaml"))
    assert len(files) >= 6
    for f in files:
        assert load_config(f).device_class == f.stem


def test_wrong_type_names_the_field(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("capture:\n  fps: fast\n")
    with pytest.raises(ConfigError, match=r"capture\.fps"):
        load_config(f)


def test_unknown_key_names_the_field(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("vision:\n  detect_intervall: 3\n")
    with pytest.raises(ConfigError, match=r"vision\.detect_intervall"):
        load_config(f)


def test_cross_field_rule(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("capture:\n  kind: opencv\n")
    with pytest.raises(ConfigError, match="capture.uri is required"):
        load_config(f)


def test_cli_config_check_exit_codes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("serving:\n  tcp_port: -1\n")
    ok = subprocess.run([sys.executable, "-m", "appliance", "config", "check",
                         *map(str, sorted((REPO / "firmware_configs").glob("*.yaml")))],
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    fail = subprocess.run([sys.executable, "-m", "appliance", "config", "check", str(bad)],
                          capture_output=True, text=True, check=False)
    assert fail.returncode == 1 and "serving.tcp_port" in fail.stderr
