"""Firmware configuration: one validated YAML per device class (see firmware_configs/)."""

from appliance.config.schema import ApplianceConfig, CaptureConfig, load_config, default_config

__all__ = ["ApplianceConfig", "CaptureConfig", "load_config", "default_config"]
