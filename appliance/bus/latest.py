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


def _conflating_socket(kind: int, endpoint: str, bind: bool, context: zmq.Context | None) -> zmq.Socket:
    """A socket of `kind` keeping one message, bound or connected to `endpoint` (stale ipc files removed)."""
    sock = (context or zmq.Context.instance()).socket(kind)
    sock.setsockopt(zmq.CONFLATE, 1)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if bind:
            if endpoint.startswith("ipc://"):
                path = Path(endpoint[len("ipc://"):])
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                if path.exists():  # left behind by a killed process
                    os.unlink(path)
            sock.bind(endpoint)
        else:
            sock.connect(endpoint)
    except zmq.ZMQError as exc:
        sock.close(0)
        raise ApplianceError(f"bus: cannot {'bind' if bind else 'connect'} {endpoint}: {exc}") from None
    return sock


class LatestPublisher:
    """Non-blocking publisher; an unread older message is replaced by the newer one."""

    def __init__(self, endpoint: str, *, bind: bool = True, context: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self.sent = 0
        self._sock = _conflating_socket(zmq.PUB, endpoint, bind, context)

    def publish(self, payload: bytes) -> None:
        self._sock.send(payload, zmq.NOBLOCK)  # PUB never blocks: no peer, or a full pipe, drops
        self.sent += 1

    def close(self) -> None:
        self._sock.close(0)


class LatestSubscriber:
    """Subscriber that only ever holds the newest message."""

    def __init__(self, endpoint: str, *, bind: bool = False, context: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self.received = 0
        self._sock = _conflating_socket(zmq.SUB, endpoint, bind, context)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
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
