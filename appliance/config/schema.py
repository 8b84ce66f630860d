"""Typed firmware config. Unknown keys and wrong types fail at start with the field's name."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from appliance.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CaptureConfig(StrictModel):
    """Where frames come from. The capture device is opened only while a session has consent."""

    kind: Literal["synthetic", "opencv", "gstreamer"] = Field(
        "synthetic", description="synthetic: built-in moving face photo; opencv: device/file/RTSP; "
        "gstreamer: a pipeline from pipelines/ or a full pipeline string")
    uri: str = Field("", description="opencv: device index ('0'), file path or rtsp:// URL")
    pipeline: str = Field("", description="gstreamer: pipeline name in pipelines/ (csi, usb, rtsp, test, file) "
                          "or a full gst-launch description ending before the sink")
    device: str = Field("", description="value substituted for {device} / {uri} in a named pipeline")
    width: int = Field(640, ge=32, le=7680, description="frames are scaled to this width")
    height: int = Field(360, ge=32, le=4320, description="frames are scaled to this height")
    fps: float = Field(15.0, gt=0, le=240, description="frames per second asked of the source")
    loop: bool = Field(True, description="files: start again at the end")
    reconnect_initial_s: float = Field(0.2, gt=0, le=60)
    reconnect_max_s: float = Field(5.0, gt=0, le=600)
    stall_timeout_s: float = Field(2.0, gt=0, le=60, description="no new frame for this long = reconnect")
    decode_threads: int = Field(1, ge=0, le=64, description="opencv files and RTSP streams: software decoder "
                                "(FFmpeg) threads; 1 leaves the other cores to inference (on 2 cores the "
                                "decoder's frame threads slowed detection by a third for no faster decode); "
                                "0 = FFmpeg's default, one per core")

    @model_validator(mode="after")
    def _needs_source(self) -> CaptureConfig:
        if self.kind == "opencv" and not self.uri:
            raise ValueError("capture.uri is required when capture.kind is 'opencv'")
        if self.kind == "gstreamer" and not self.pipeline:
            raise ValueError("capture.pipeline is required when capture.kind is 'gstreamer'")
        return self


class VisionConfig(StrictModel):
    providers: list[Literal["tensorrt", "cuda", "cpu"]] = Field(
        default_factory=lambda: ["cpu"], description="execution providers in order of preference")
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    intra_op_threads: int = Field(1, ge=1, le=64)
    detect_interval: int = Field(1, ge=1, le=60, description="run the detector every N frames, track between")
    min_face_score: float = Field(0.5, gt=0, lt=1)
    max_faces: int = Field(8, ge=1, le=64)
    detector_rows: Literal["fit", "square"] = Field(
        "fit", description="fit: the detector sees the letterboxed picture plus 12 black rows above and "
        "below (96 rows for 16:9 instead of 128; a quarter less work, same faces found on our media, scores "
        "of faces cut by the frame's top or bottom edge up to 0.16 lower); square: MediaPipe's 128x128 input")
    smoothing: float = Field(0.3, gt=0, le=1, description="EMA weight of the newest frame's affect")
    emotion_model: Literal["emotion_cnn48_int8", "emotion_cnn48", "emotion_vgg48_ms", "fer_mini_xception"] = Field(
        "emotion_cnn48_int8", description="manifest entry of the emotion classifier: emotion_cnn48_int8 (ours, "
        "recipe r1, INT8 by appliance/models/quantize.py: 1.6x faster than FP32 on one core, same accuracy on "
        "the FER2013 test sample) on CPU boxes; emotion_cnn48, its FP32 original; emotion_vgg48_ms (ours, r3: "
        "better on validation, 7x the compute, 3 ms a face on one AVX2 core) where a GPU runs it (the Jetson and "
        "CUDA configs); fer_mini_xception, the reference (models/emotion/MODEL_CARD_OWN.md)")
    runtime: Literal["onnxruntime", "tensorrt"] = Field(
        "onnxruntime", description="onnxruntime: ONNX Runtime with `providers` in order; tensorrt: native "
        "TensorRT engines built per device at `precision` (where TensorRT or a GPU is absent, or a build "
        "fails, the model runs on ONNX Runtime with `providers` instead)")
    engine_cache: str = Field("{data_dir}/trt-cache", description="TensorRT engines and calibration caches, "
                              "keyed by GPU, TensorRT version, model sha256, precision and input shapes")
    calibration_dir: str | None = Field(None, description="INT8 calibration sets from `appliance models "
                                        "calibrate` (native TensorRT at precision int8)")

    @model_validator(mode="after")
    def _int8_needs_calibration(self) -> VisionConfig:
        if self.runtime == "tensorrt" and self.precision == "int8" and not self.calibration_dir:
            raise ValueError("vision.calibration_dir is required for runtime tensorrt at precision int8 "
                             "(make the sets with `appliance models calibrate --out DIR ...`)")
        return self


class BusConfig(StrictModel):
    affect_endpoint: str = Field("ipc://{run_dir}/affect.ipc", description="vision -> ranker, latest value")
    control_endpoint: str = Field("ipc://{run_dir}/control.ipc", description="ranker -> vision, consent")
    control_period_s: float = Field(0.1, gt=0, le=5)
    control_timeout_s: float = Field(1.0, gt=0, le=30, description="vision closes the camera after this "
                                     "long without word from the ranker")


class ServingConfig(StrictModel):
    unix_socket: str = Field("{run_dir}/appliance.sock")
    socket_mode: int = Field(0o660, ge=0, le=0o777)
    socket_group: str | None = Field(None, description="group (name or gid) that owns the Unix socket: its "
                                     "members (the player's user) may connect, nobody else (mode 0660)")
    tcp_port: int | None = Field(None, ge=1, le=65535, description="off by default; needs a token, mTLS or both")
    tcp_host: str = "127.0.0.1"
    token_env: str = Field("APPLIANCE_TOKEN", description="environment variable that holds the TCP token")
    tls_cert: str | None = Field(None, description="PEM certificate chain of this box's TCP server (mTLS)")
    tls_key: str | None = Field(None, description="PEM private key of tls_cert")
    tls_client_ca: str | None = Field(None, description="PEM CA bundle: TCP clients must present a certificate "
                                      "it signed (mutual TLS)")
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    max_k: int = Field(100, ge=1, le=1000)
    max_candidates: int = Field(10_000, ge=1, le=100_000)
    max_batch_events: int = Field(10_000, ge=1, le=1_000_000)
    workers: int = Field(8, ge=1, le=64)
    ingest_queue_events: int = Field(1_000_000, ge=1, le=50_000_000, description="events waiting for their "
                                     "group commit; beyond it Events answers RESOURCE_EXHAUSTED + retry-after-ms")
    ingest_group_events: int = Field(200_000, ge=1, le=10_000_000, description="most events in one commit")
    client_events_per_s: float = Field(100_000.0, ge=0, description="events/s one client may send (x-client-id "
                                       "metadata, else its session); 0 = no limit")
    client_burst_events: int = Field(200_000, ge=1, description="events a client may send at once above its rate")
    health_period_s: float = Field(1.0, gt=0, le=60, description="how often gRPC health checks the store")
    rank_cache_entries: int = Field(8, ge=0, le=1024, description="cached Rank answers per session (re-ranking "
                                    "the same row with unchanged state); 0 = off")
    blas_threads: int = Field(1, ge=1, le=64, description="BLAS threads in the ranker process (its matrices "
                              "are tiny: more threads only add latency)")

    @model_validator(mode="after")
    def _tcp_needs_auth(self) -> ServingConfig:
        tls = (self.tls_cert, self.tls_key, self.tls_client_ca)
        if any(tls) and not all(tls):
            raise ValueError("tls_cert, tls_key and tls_client_ca go together (mutual TLS needs all three)")
        return self

    @property
    def mtls(self) -> bool:
        return self.tls_cert is not None


class StoreConfig(StrictModel):
    db_path: str = Field("{data_dir}/appliance.db")
    event_retention_days: int = Field(90, ge=1, le=3650, description="events older than this are deleted (at "
                                      "start and every retention_sweep_s); the profile is rebuilt without them")
    retention_sweep_s: float = Field(3600.0, gt=0, le=86_400, description="how often retention is enforced")
    exposure_flush_s: float = Field(5.0, gt=0, le=3600, description="experiment exposures are buffered in "
                                    "memory and written in one transaction this often (never on the Rank path)")


class RankingConfig(StrictModel):
    bundle_dir: str = Field("{models_dir}/ranker", description="versioned ranking model bundle")
    affect_stale_s: float = Field(1.0, gt=0, le=60, description="affect older than this is ignored")
    affect_weight: float = Field(0.15, ge=0, le=1)
    diversity: float = Field(0.2, ge=0, le=1, description="MMR trade-off: 0 = pure relevance")
    default_max_maturity: Literal["all", "7", "13", "16", "adult"] = "adult"
    sequence_runtime: Literal["numpy", "onnxruntime"] = Field(
        "numpy", description="the sequence encoder's runtime: numpy (the ONNX file's weights in our own pass, "
        "one history's query as one C call where the build compiled _seqcore.c; ~40 MB less ranker memory "
        "than ONNX Runtime) or onnxruntime (the reference)")


class GovernorConfig(StrictModel):
    """Thermal and load limits of this device class; the governor degrades vision before the SoC throttles."""

    enabled: bool = True
    period_s: float = Field(2.0, gt=0, le=60, description="control period")
    temp_warm_c: float = Field(70.0, gt=0, lt=130, description="above: fewer frames, sparser detection")
    temp_hot_c: float = Field(80.0, gt=0, lt=130, description="above: also lower precision, pause training")
    temp_critical_c: float = Field(90.0, gt=0, lt=130, description="above: minimum frame rate")
    hysteresis_c: float = Field(5.0, ge=0, le=30, description="cool this far below a threshold to step back")
    cpu_high_percent: float = Field(90.0, gt=0, le=100)
    mem_high_percent: float = Field(90.0, gt=0, le=100)
    gpu_high_percent: float = Field(95.0, gt=0, le=100)
    sysfs_root: str = Field("/", description="where /sys lives (tests point this at a fake tree)")

    @model_validator(mode="after")
    def _ordered(self) -> GovernorConfig:
        if not self.temp_warm_c < self.temp_hot_c < self.temp_critical_c:
            raise ValueError("governor: temp_warm_c < temp_hot_c < temp_critical_c must hold")
        return self


class MetricsConfig(StrictModel):
    """Prometheus endpoints, one per process, on loopback only."""

    enabled: bool = True
    host: Literal["127.0.0.1", "::1", "localhost"] = "127.0.0.1"
    ranker_port: int = Field(9464, ge=0, le=65535, description="0 = pick a free port")
    vision_port: int = Field(9465, ge=0, le=65535, description="0 = pick a free port")


class PrivacyPageConfig(StrictModel):
    """The household's local privacy page (consent, camera indicator, why this title, delete my data)."""

    enabled: bool = True
    host: str = Field("127.0.0.1", description="loopback by default; a LAN address needs a pairing token")
    port: int = Field(8765, ge=0, le=65535, description="0 = pick a free port")
    pairing_token_env: str = Field("APPLIANCE_PAIRING_TOKEN", description="env var holding the LAN token")


class LoggingConfig(StrictModel):
    """Structured JSON logs (one object a line): stderr for journald / `docker logs`, and one size-rotated
    file per process under `dir` (supervisor.log, ranker.log, vision.log: one writer each, so rotation is
    safe without a lock between processes). Logs carry counts and states, never personal data."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="$APPLIANCE_LOG_LEVEL overrides it")
    dir: str = Field("{data_dir}/log", description="log files go here; empty = stderr only")
    max_bytes: int = Field(5 * 1024 * 1024, ge=4096, le=1 << 30, description="a file is rotated at this size")
    backup_count: int = Field(3, ge=1, le=100, description="rotated files kept per process (.1 newest)")
    stderr: bool = Field(True, description="also write to stderr")


_ARM_NAME = r"^[a-z0-9][a-z0-9_.-]{0,31}$"


class ArmRanking(StrictModel):
    """What an arm changes in Rank (unset = the box's `ranking` value)."""

    affect_weight: float | None = Field(None, ge=0, le=1, description="weight of fresh, consented affect")
    diversity: float | None = Field(None, ge=0, le=1, description="MMR trade-off: 0 = pure relevance")

    def overrides(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class ArmConfig(StrictModel):
    name: str = Field(..., pattern=_ARM_NAME, description="short arm name (it is sent in reports)")
    weight: float = Field(1.0, gt=0, le=1000, description="relative share of the enrolled units")
    ranking: ArmRanking = ArmRanking()


class ExperimentReportConfig(StrictModel):
    """Per-arm metrics leave the box only as noised counts (distributed discrete Laplace, as segments)."""

    epsilon: float = Field(0.5, gt=0, le=10, description="privacy of one daily report of one box (pure DP)")
    epsilon_budget: float = Field(15.0, gt=0, le=1000, description="total over all reports of this experiment; "
                                  "the box refuses a report that would exceed it (basic composition)")
    min_boxes: int = Field(1000, ge=1, le=10_000_000, description="the aggregator sums at least this many "
                           "reports; each box adds its 1/min_boxes share of the noise")
    max_profiles: int = Field(4, ge=1, le=64, description="per arm and report: exposed profiles counted")
    max_ranks: int = Field(50, ge=1, le=100_000, description="per arm and report: rankings counted")
    max_events: int = Field(20, ge=1, le=100_000, description="per arm, outcome and report: events counted")


class ExperimentConfig(StrictModel):
    """An A/B test: units (profiles, or the whole box) are bucketed by a salted hash into weighted arms."""

    name: str = Field(..., pattern=_ARM_NAME)
    salt: str = Field(..., min_length=4, max_length=128, description="change it to reshuffle the buckets")
    unit: Literal["profile", "box"] = Field("profile", description="profile: each profile of the box on its "
                                            "own (hashed with the box id); box: every profile of the box alike")
    traffic: float = Field(1.0, gt=0, le=1, description="share of units enrolled; the rest see the defaults")
    arms: list[ArmConfig] = Field(..., min_length=2, max_length=16)
    report: ExperimentReportConfig = ExperimentReportConfig()

    @model_validator(mode="after")
    def _unique_arms(self) -> ExperimentConfig:
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment {self.name}: arm names must be unique, got {names}")
        return self


class ApplianceConfig(StrictModel):
    """The whole config of one box. Paths may use {run_dir}, {data_dir}, {models_dir}."""

    device_class: str = Field("cpu-only", description="which firmware config this is")
    run_dir: str = Field(default_factory=lambda: os.environ.get("APPLIANCE_RUN_DIR", "/tmp/appliance-{uid}"),
                         description="sockets live here ($APPLIANCE_RUN_DIR)")
    data_dir: str = Field(default_factory=lambda: os.environ.get("APPLIANCE_DATA_DIR", "var/data"),
                          description="SQLite and caches ($APPLIANCE_DATA_DIR)")
    models_dir: str = Field(str(REPO_ROOT / "models"))
    capture: CaptureConfig = CaptureConfig()
    vision: VisionConfig = VisionConfig()
    bus: BusConfig = BusConfig()
    serving: ServingConfig = ServingConfig()
    store: StoreConfig = StoreConfig()
    ranking: RankingConfig = RankingConfig()
    metrics: MetricsConfig = MetricsConfig()
    governor: GovernorConfig = GovernorConfig()
    privacy: PrivacyPageConfig = PrivacyPageConfig()
    logging: LoggingConfig = LoggingConfig()
    experiments: list[ExperimentConfig] = Field(default_factory=list, description="A/B tests (may be empty)")

    @model_validator(mode="after")
    def _experiments_apart(self) -> ApplianceConfig:
        names = [exp.name for exp in self.experiments]
        if len(set(names)) != len(names):
            raise ValueError(f"experiments: names must be unique, got {names}")
        owner: dict[str, str] = {}
        for exp in self.experiments:  # one ranking knob per experiment: arms of two tests must not collide
            for knob in sorted({k for arm in exp.arms for k in arm.ranking.overrides()}):
                if knob in owner:
                    raise ValueError(f"experiments: {exp.name!r} and {owner[knob]!r} both change ranking.{knob}")
                owner[knob] = exp.name
        return self

    def path(self, template: str) -> str:
        """Expand {run_dir}/{data_dir}/{models_dir}/{uid} in a path template."""
        run_dir = self.run_dir.format(uid=os.getuid())
        return template.format(run_dir=run_dir, data_dir=self.data_dir, models_dir=self.models_dir,
                               uid=os.getuid())

    def with_overrides(self, **sections: dict) -> ApplianceConfig:
        """A copy with some fields replaced, validated like a file (used by tests and the demo)."""
        data = self.model_dump()
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return validate_config(data, source="<overrides>")


def _field_path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def validate_config(data: object, source: str) -> ApplianceConfig:
    """Validate a parsed config; errors name the file and each bad field."""
    try:
        return ApplianceConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: invalid config"]
        for err in exc.errors():
            lines.append(f"  {_field_path(err['loc']) or '<root>'}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def load_config(path: str | os.PathLike[str]) -> ApplianceConfig:
    """Read and validate one firmware config file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections")
    return validate_config(data, source=str(p))


def default_config() -> ApplianceConfig:
    """Embedded defaults: CPU only, synthetic camera, Unix socket. What `make demo` runs."""
    return ApplianceConfig()
