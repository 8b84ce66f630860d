"""Firmware configuration: one validated YAML per device class (see firmware_configs/)."""

from appliance.config.schema import ApplianceConfig, CaptureConfig, default_config, load_config

__all__ = ["ApplianceConfig", "CaptureConfig", "default_config", "load_config"]
