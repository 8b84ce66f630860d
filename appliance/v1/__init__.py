"""Generated gRPC/protobuf stubs of the appliance.v1 API (built by `make`, from proto/appliance/v1)."""

try:  # fail with a clear message instead of an ImportError deep in a stack
    from appliance.v1 import common_pb2 as _common_pb2  # noqa: F401
except ImportError as exc:  # pragma: no cover - only on a checkout that skipped the build
    raise ImportError(
        "appliance.v1 stubs are missing: run `make setup` (it generates them from proto/appliance/v1)"
    ) from exc
