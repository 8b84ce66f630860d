"""Latest-value pub/sub over ZeroMQ.

The camera must never queue behind a slow consumer: both ends conflate (ZMQ_CONFLATE), so the
publisher's outgoing pipe and the subscriber's incoming pipe each hold only the newest message, and a
publish never blocks. Single-frame messages only: CONFLATE does not support multipart.
"""

from __future__ import annotations

import os
from pathlib import Path

import zmq

from appliance.errors import ApplianceError


def _prepare_ipc(endpoint: str) -> None:
    if endpoint.startswith("ipc://"):
        Path(endpoint[len("ipc://"):]).parent.mkdir(parents=True, exist_ok=True, mode=0o700)


class LatestPublisher:
    """Non-blocking publisher; an unread older message is replaced by the newer one."""

    def __init__(self, endpoint: str, *, bind: bool = True, context: zmq.Context | None = None) -> None:
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.CONFLATE, 1)
        self._sock.setsockopt(zmq.LINGER, 0)
        self.endpoint = endpoint
        self.sent = 0
        self.dropped = 0
        try:
            if bind:
                _prepare_ipc(endpoint)
                if endpoint.startswith("ipc://"):
                    # A stale socket file from a killed process would make bind fail on some systems.
                    path = endpoint[len("ipc://"):]
                    if os.path.exists(path):
                        os.unlink(path)
                self._sock.bind(endpoint)
            else:
                self._sock.connect(endpoint)
        except zmq.ZMQError as exc:
            self._sock.close(0)
            raise ApplianceError(f"bus: cannot {'bind' if bind else 'connect'} {endpoint}: {exc}") from None

    def publish(self, payload: bytes) -> bool:
        try:
            self._sock.send(payload, zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        self._sock.close(0)


class LatestSubscriber:
    """Subscriber that only ever holds the newest message."""

    def __init__(self, endpoint: str, *, bind: bool = False, context: zmq.Context | None = None) -> None:
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.CONFLATE, 1)
        self._sock.setsockopt(zmq.RCVHWM, 1)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.endpoint = endpoint
        self.received = 0
        try:
            if bind:
                _prepare_ipc(endpoint)
                self._sock.bind(endpoint)
            else:
                self._sock.connect(endpoint)
        except zmq.ZMQError as exc:
            self._sock.close(0)
            raise ApplianceError(f"bus: cannot {'bind' if bind else 'connect'} {endpoint}: {exc}") from None
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)

    def recv(self, timeout_ms: int = 0) -> bytes | None:
        """The newest message, or None if nothing arrived within timeout_ms."""
        if not self._poller.poll(timeout_ms):
            return None
        try:
            payload = self._sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            return None
        self.received += 1
        return payload

    def close(self) -> None:
        self._sock.close(0)
