"""What a box puts on the wire to the aggregator: a recording TCP relay and readers of what it recorded.

`TcpTap` listens on a loopback port, relays every connection to the real SuperLink and keeps every
byte in both directions. Flower 1.41's Fleet API is protobuf over plain HTTP/1.1 (httpx on the
SuperNode, uvicorn on the SuperLink; with `--insecure` nothing is encrypted and nothing is
compressed), so the recording is exactly what an eavesdropper, or the aggregator itself, receives.

Readers, so a test can say what is NOT in there without trusting Flower's own decoding:
- `http_requests` cuts the upstream bytes into HTTP requests (path, body);
- `varints` walks a body as protobuf wire format, schema-less, descending into every length-delimited
  field that itself parses completely (and into the body of every Flower "inflatable" object: an ASCII
  head, a NUL, a protobuf body), and yields every integer field value, zigzag-decoded too (how an
  int64 item id or timestamp would travel in a proto field);
- `npy_arrays` finds every numpy array (`np.save` bytes, how Flower serialises arrays) anywhere in it.
"""

from __future__ import annotations

import io
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

NPY_MAGIC = b"\x93NUMPY"
INFLATABLE_HEAD = re.compile(rb"[A-Za-z][A-Za-z0-9_]* [ -~]*\x00")  # "<Type> <children> <body length>\0"


@dataclass
class TcpTap:
    """Loopback relay `127.0.0.1:port -> upstream`; `sent` holds what clients sent, `received` the replies."""

    upstream: tuple[str, int]
    port: int = 0
    sent: bytearray = field(default_factory=bytearray)
    received: bytearray = field(default_factory=bytearray)
    connections: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", self.port))
        self._server.listen(16)
        self.port = self._server.getsockname()[1]
        self._streams: list[bytearray] = []   # client->server bytes per connection (requests are cut per stream)
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.upstream, timeout=10)
                up.settimeout(None)
            except OSError:
                client.close()
                continue
            stream = bytearray()
            with self._lock:
                self.connections += 1
                self._streams.append(stream)
            threading.Thread(target=self._pump, args=(client, up, stream, self.sent), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, client, None, self.received), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, stream: bytearray | None, total: bytearray) -> None:
        try:
            while chunk := src.recv(65536):
                with self._lock:
                    total += chunk
                    if stream is not None:
                        stream += chunk
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def streams(self) -> list[bytes]:
        with self._lock:
            return [bytes(s) for s in self._streams]

    def close(self) -> None:
        self._closed = True
        self._server.close()


def http_requests(stream: bytes) -> list[tuple[str, bytes]]:
    """(request line, body) of each HTTP/1.1 request in one connection's client->server bytes."""
    out, pos = [], 0
    while pos < len(stream):
        end = stream.find(b"\r\n\r\n", pos)
        if end < 0:
            raise ValueError(f"truncated HTTP headers at byte {pos}")
        head = stream[pos:end].decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
        pos = end + 4
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = bytearray()
            while True:
                eol = stream.index(b"\r\n", pos)
                n = int(stream[pos:eol].split(b";")[0], 16)
                body += stream[eol + 2:eol + 2 + n]
                pos = eol + 2 + n + 2
                if n == 0:
                    break
            out.append((head[0], bytes(body)))
        else:
            n = int(headers.get("content-length", "0"))
            out.append((head[0], stream[pos:pos + n]))
            pos += n
    return out


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("bad varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def _fields(buf: bytes) -> list[tuple[int, object]]:
    """(wire type, value) of every top-level field; ValueError unless `buf` is well-formed protobuf."""
    out, pos = [], 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        wire, number = key & 7, key >> 3
        if number == 0:
            raise ValueError("field number 0")
        if wire == 0:
            v, pos = _read_varint(buf, pos)
            out.append((0, v))
        elif wire == 1:
            if pos + 8 > len(buf):
                raise ValueError("truncated fixed64")
            out.append((1, int.from_bytes(buf[pos:pos + 8], "little")))
            pos += 8
        elif wire == 5:
            if pos + 4 > len(buf):
                raise ValueError("truncated fixed32")
            out.append((5, int.from_bytes(buf[pos:pos + 4], "little")))
            pos += 4
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError("truncated length-delimited field")
            out.append((2, buf[pos:pos + n]))
            pos += n
        else:
            raise ValueError(f"wire type {wire}")
    return out


def varints(buf: bytes, depth: int = 12) -> Iterator[int]:
    """Every integer (varint, fixed32, fixed64) field value in `buf` and in every nested message; a
    varint also as its zigzag decoding (sint64)."""
    try:
        fields = _fields(buf)
    except ValueError:
        head = INFLATABLE_HEAD.match(buf)
        if head is not None and depth > 0:
            yield from varints(buf[head.end():], depth - 1)
        return
    for wire, v in fields:
        if wire == 2:
            if depth > 0 and not bytes(v).startswith(NPY_MAGIC):
                yield from varints(bytes(v), depth - 1)
        else:
            yield int(v)
            if wire == 0:
                yield (int(v) >> 1) ^ -(int(v) & 1)


def npy_arrays(buf: bytes) -> list[np.ndarray]:
    """Every `np.save`d array (version 1-3 headers) found anywhere in `buf`."""
    out, pos = [], 0
    while (pos := buf.find(NPY_MAGIC, pos)) >= 0:
        try:
            out.append(np.load(io.BytesIO(buf[pos:]), allow_pickle=False))
        except (ValueError, EOFError, OSError):
            pass
        pos += len(NPY_MAGIC)
    return out
