from __future__ import annotations

import pytest

from appliance.client import ApplianceClient
from appliance.config import default_config
from appliance.serving.process import RankerProcess


@pytest.fixture
def cfg(run_dir, tmp_path):
    return default_config().with_overrides(run_dir=str(run_dir), data_dir=str(tmp_path / "data"),
                                          metrics={"ranker_port": 0})


@pytest.fixture
def ranker(cfg):
    proc = RankerProcess(cfg)
    yield proc
    proc.stop()


@pytest.fixture
def client(ranker):
    c = ApplianceClient(f"unix:{ranker.servers.unix_socket}")
    c.wait_ready(10)
    yield c
    c.close()
