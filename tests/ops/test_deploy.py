"""Deployment artefacts: Dockerfiles lint clean, the health-check command tells up from down, the unit is sane."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from appliance.config import default_config
from appliance.serving.process import RankerProcess

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.jetson"])
def test_dockerfiles_lint_clean(dockerfile):
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    r = subprocess.run([exe, "--config", str(REPO / ".hadolint.yaml"), str(REPO / dockerfile)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfiles_run_as_non_root_with_grpc_healthcheck():
    for name in ("Dockerfile", "Dockerfile.jetson"):
        text = (REPO / name).read_text()
        assert "USER 10001" in text and 'CMD ["appliance", "health"]' in text
        assert "AS build" in text  # multi-stage: build tools stay out of the final image


def test_health_command_exit_codes(run_dir, tmp_path):
    cfg_file = tmp_path / "box.yaml"
    cfg_file.write_text(yaml.safe_dump({"run_dir": str(run_dir), "data_dir": str(tmp_path / "data")}))

    def health() -> int:
        return subprocess.run([sys.executable, "-m", "appliance", "health", "-c", str(cfg_file)],
                              capture_output=True, check=False, timeout=30).returncode

    assert health() == 1  # nothing serving
    proc = RankerProcess(default_config().with_overrides(run_dir=str(run_dir), data_dir=str(tmp_path / "data")))
    try:
        assert health() == 0
    finally:
        proc.stop()
    assert health() == 1


def test_systemd_unit():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(REPO / "appliance/ops/systemd/appliance.service")
    svc = unit["Service"]
    assert svc["User"] == "appliance" and svc["KillSignal"] == "SIGTERM"
    assert svc["ExecStart"].endswith("appliance run")
    assert "config check" in svc["ExecStartPre"]


def test_image_build_script_parses_and_stays_out_of_make_test():
    script = REPO / "appliance/ops/image/build-x86.sh"
    assert script.stat().st_mode & 0o111
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    make = (REPO / "Makefile").read_text()
    test_rule = make.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "image" not in test_rule and "build-x86.sh" in make
