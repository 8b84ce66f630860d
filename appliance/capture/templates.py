"""GStreamer pipeline templates from pipelines/*.gst, filled from the capture config.

A template is the source part of a gst-launch description (it ends before the conversion to BGR and
the sink, which the source adds). Lines starting with '#' are comments; a comment line
`# default: device=/dev/video0` gives a placeholder's value when the config leaves it empty.
Placeholders: {device} {uri} {width} {height} {fps} (a GStreamer fraction, e.g. 15/1) {fps_int}.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from appliance.capture.gstreamer_source import gst_fraction
from appliance.errors import CaptureError

REPO_ROOT = Path(__file__).resolve().parents[2]
PIPELINES_DIR = REPO_ROOT / "pipelines"
SUFFIX = ".gst"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_DEFAULT = re.compile(r"^#\s*default:\s*(\w+)\s*=\s*(.*?)\s*$")
_FIELD = re.compile(r"\{(\w+)\}")
PLACEHOLDERS = {"device", "uri", "width", "height", "fps", "fps_int"}


def is_pipeline_name(value: str) -> bool:
    """A bare name (usb, csi, ...) rather than a full description (which has '!' or spaces)."""
    return bool(_NAME.match(value.strip()))


def available(pipelines_dir: Path | None = None) -> list[str]:
    """Names of the templates on disk."""
    d = pipelines_dir or PIPELINES_DIR
    return sorted(p.stem for p in d.glob(f"*{SUFFIX}")) if d.is_dir() else []


def load_template(name: str, pipelines_dir: Path | None = None) -> tuple[str, dict[str, str]]:
    """(description template, defaults) of one named pipeline; CaptureError lists the known names."""
    d = pipelines_dir or PIPELINES_DIR
    path = d / f"{name}{SUFFIX}"
    if not is_pipeline_name(name) or not path.is_file():
        names = ", ".join(available(d)) or "none"
        raise CaptureError(f"unknown capture pipeline '{name}' (in {d}: {names}); "
                           "or give a full gst-launch description")
    defaults: dict[str, str] = {}
    body: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if s.startswith("#"):
            m = _DEFAULT.match(s)
            if m:
                defaults[m.group(1)] = m.group(2)
        elif s:
            body.append(s)
    if not body:
        raise CaptureError(f"capture pipeline template {path} is empty")
    return " ".join(body), defaults


def _quote(value: str) -> str:
    """Quote a substituted value for both shlex and GStreamer's parser when it needs it."""
    if value and re.fullmatch(r"[A-Za-z0-9_./:@%+=,~-]+", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def fill(template: str, defaults: dict[str, str], *, device: str, uri: str, width: int, height: int,
         fps: float, name: str = "<description>", strict: bool = True) -> str:
    """Substitute the placeholders; an empty {device}/{uri} without a default is a clear error."""
    values = {"width": str(width), "height": str(height), "fps": gst_fraction(fps),
              "fps_int": str(max(1, math.ceil(fps))), "device": device or defaults.get("device", ""),
              "uri": uri or defaults.get("uri", "")}
    used = set(_FIELD.findall(template))
    unknown = used - PLACEHOLDERS
    if unknown and strict:
        raise CaptureError(f"capture pipeline '{name}': unknown placeholder(s) {sorted(unknown)}; "
                           f"known: {sorted(PLACEHOLDERS)}")
    for key in ("device", "uri"):
        if key in used and not values[key]:
            raise CaptureError(f"capture pipeline '{name}' needs capture.device (its {{{key}}}), "
                               "e.g. /dev/video0, a sensor id, a file path or an rtsp:// URL")
    values["device"], values["uri"] = _quote(values["device"]), _quote(values["uri"])
    return _FIELD.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def resolve(pipeline: str, *, device: str, uri: str, width: int, height: int, fps: float,
            pipelines_dir: Path | None = None) -> str:
    """A named template filled in, or a full description passed through (placeholders still filled)."""
    text = pipeline.strip()
    if is_pipeline_name(text):
        template, defaults = load_template(text, pipelines_dir)
        return fill(template, defaults, device=device, uri=uri, width=width, height=height, fps=fps,
                    name=text)
    return fill(text, {}, device=device, uri=uri, width=width, height=height, fps=fps, strict=False)
