"""Governor: readings from a fake sysfs tree drive real decisions; hot -> degrade, cool -> restore."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import REGISTRY

from appliance.config.schema import GovernorConfig
from appliance.ops.governor import Governor, Readings, SystemReadings


def fake_sysfs(root: Path, temps_c: list[float], gpu_load_permille: int | None = None) -> None:
    for i, t in enumerate(temps_c):
        zone = root / "sys/class/thermal" / f"thermal_zone{i}"
        zone.mkdir(parents=True, exist_ok=True)
        (zone / "temp").write_text(f"{int(t * 1000)}\n")
    if gpu_load_permille is not None:
        gpu = root / "sys/devices/17000000.gpu"
        gpu.mkdir(parents=True, exist_ok=True)
        (gpu / "load").write_text(f"{gpu_load_permille}\n")


def make(cfg: GovernorConfig | None = None) -> Governor:
    return Governor(cfg or GovernorConfig(), base_fps=30.0, base_detect_interval=1, base_precision="fp32")


def test_sysfs_readings(tmp_path):
    fake_sysfs(tmp_path, [45.5, 85.25, 30.0], gpu_load_permille=640)
    (tmp_path / "sys/class/thermal/thermal_zone9").mkdir()
    (tmp_path / "sys/class/thermal/thermal_zone9/temp").write_text("garbage")
    r = SystemReadings(tmp_path).read()
    assert r.temp_c == 85.25 and r.gpu_percent == 64.0
    assert 0 <= r.cpu_percent <= 100 and 0 < r.mem_percent <= 100


def thermal_only(sysfs: SystemReadings) -> Readings:
    """The fake tree's temperature with a quiet CPU: the test machine's own load must not decide."""
    r = sysfs.read()
    return Readings(cpu_percent=10.0, mem_percent=10.0, temp_c=r.temp_c, gpu_percent=r.gpu_percent)


def test_85_degrees_drops_fps_and_precision_within_one_period_and_recovers(tmp_path):
    gov = make()
    sysfs = SystemReadings(tmp_path)
    fake_sysfs(tmp_path, [55.0])
    assert gov.step(thermal_only(sysfs)).level_name == "normal"
    fake_sysfs(tmp_path, [85.0])
    d = gov.step(thermal_only(sysfs))  # the very next control period
    assert d.level_name == "hot"
    assert d.fps == 15.0 and d.detect_interval == 3 and d.precision == "fp16" and d.pause_training
    assert REGISTRY.get_sample_value("appliance_governor_level") == 2
    fake_sysfs(tmp_path, [50.0])
    assert gov.step(thermal_only(sysfs)).level_name == "warm"  # restores one step per period
    d = gov.step(thermal_only(sysfs))
    assert d.level_name == "normal" and d.fps == 30.0 and d.precision == "fp32" and not d.pause_training
    assert gov.changes == 3


def test_hysteresis_keeps_level_inside_the_band():
    gov = make()
    gov.step(Readings(10, 10, temp_c=81.0))
    assert gov.level == 2
    for t in (79.0, 77.0, 75.5):  # within 5 C under the hot threshold: stay hot
        assert gov.step(Readings(10, 10, temp_c=t)).level == 2
    assert gov.step(Readings(10, 10, temp_c=74.0)).level == 1


def test_load_and_missing_sensors():
    gov = make()
    assert gov.step(Readings(cpu_percent=97, mem_percent=20)).level_name == "warm"
    assert gov.step(Readings(cpu_percent=20, mem_percent=20)).level_name == "normal"
    assert gov.step(Readings(cpu_percent=20, mem_percent=20, gpu_percent=99)).level_name == "warm"
    gov2 = make()
    assert gov2.step(Readings(cpu_percent=1, mem_percent=1, temp_c=None)).level == 0


def test_critical_and_callback():
    seen = []
    gov = Governor(GovernorConfig(), 15.0, 2, "fp16", on_change=seen.append)
    d = gov.step(Readings(5, 5, temp_c=95.0))
    assert d.level_name == "critical" and d.fps == 3.75 and d.detect_interval == 8 and d.precision == "int8"
    assert seen == [d]
