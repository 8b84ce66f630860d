"""Map our errors to documented gRPC statuses; nothing a client sends can crash the server."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from appliance.errors import ApplianceError, NotFoundError, StoreError, ValidationError

log = logging.getLogger("appliance.serving")

F = TypeVar("F", bound=Callable[..., Any])

RETRY_AFTER_KEY = "retry-after-ms"


class Overloaded(ApplianceError):
    """The box cannot take this now (queue full, client over its rate): RESOURCE_EXHAUSTED, with trailing
    metadata `retry-after-ms` saying when to try again."""

    def __init__(self, message: str, retry_after_ms: float) -> None:
        super().__init__(message)
        self.retry_after_ms = max(1, int(round(retry_after_ms)))


class CallEnded(ApplianceError):
    """The gRPC call ended (cancelled, cut by an oversize message, deadline) before its events were
    committed: nothing is written for it."""


STATUS_FOR: list[tuple[type[Exception], grpc.StatusCode]] = [
    (ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (StoreError, grpc.StatusCode.UNAVAILABLE),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (CallEnded, grpc.StatusCode.CANCELLED),  # moot: the call has already ended with its own status
]


def log_bug(logger: logging.Logger, what: str, exc: BaseException) -> None:
    """Log an unexpected exception by type and place only. Its message or a traceback's text may hold ids
    or titles, and logs carry no personal data; the type and the frames are enough to find the bug."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(f"{tb.tb_frame.f_code.co_filename.rsplit('/', 2)[-1]}:{tb.tb_lineno}")
        tb = tb.tb_next
    logger.error("%s: %s at %s", what, type(exc).__name__, " < ".join(reversed(frames[-6:])) or "?")


def grpc_errors(method: F) -> F:
    """Run a servicer method; turn our errors into statuses, anything else into INTERNAL (logged)."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except grpc.RpcError:
            raise
        except Exception as exc:
            for kind, code in STATUS_FOR:
                if isinstance(exc, kind):
                    if isinstance(exc, Overloaded):
                        context.set_trailing_metadata(((RETRY_AFTER_KEY, str(exc.retry_after_ms)),))
                    context.abort(code, str(exc))
            log_bug(log, f"internal error in {method.__qualname__}", exc)
            context.abort(grpc.StatusCode.INTERNAL, "internal error")

    return wrapper  # type: ignore[return-value]
