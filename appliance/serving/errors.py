"""Map our errors to documented gRPC statuses; nothing a client sends can crash the server."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from appliance.errors import NotFoundError, StoreError, ValidationError

log = logging.getLogger("appliance.serving")

F = TypeVar("F", bound=Callable[..., Any])

STATUS_FOR: list[tuple[type[Exception], grpc.StatusCode]] = [
    (ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (StoreError, grpc.StatusCode.UNAVAILABLE),
]


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
                    context.abort(code, str(exc))
            log.exception("internal error in %s", method.__qualname__)
            context.abort(grpc.StatusCode.INTERNAL, "internal error")

    return wrapper  # type: ignore[return-value]
