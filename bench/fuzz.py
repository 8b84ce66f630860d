"""`python -m bench fuzz --n 100000 --json OUT`: hostile input against every method of the local API.

Each case is one call on the real Unix socket of an in-process ranker (so its state can be compared
before and after every call), to a method drawn at random (every appliance.v1 method, health Check), with
a payload drawn from:

- random-but-valid protobufs of the method's request type, built from its descriptor: huge strings,
  huge repeated fields, unknown enum values, unicode, NaN/inf, negative and extreme integers, negative
  times, unknown ids, and real ids of this run's sessions, profiles and titles (so calls get past
  validation and reach the state);
- valid serializations mutated (bytes flipped, cut, inserted, repeated);
- raw random bytes;
- oversize messages (over `serving.max_message_bytes`).

and, apart from the calls, raw connections that send random bytes or an HTTP/2 preface followed by
random frames at the socket (`--frames`).

Pass criteria: every call ends with a documented status (OK, INVALID_ARGUMENT, NOT_FOUND,
RESOURCE_EXHAUSTED), within its deadline; a call that is not OK changes nothing (store write counter,
sequence numbers, profiles, sessions, consent, the state versions of the profiles and sessions); the
server still answers afterwards and logged no internal error.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import socket
import struct
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor as FD

DOCUMENTED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"}
SNAPSHOT_FIELDS = ("store_writes", "last_seq", "sessions", "profiles", "consent", "consent_epoch", "known_profiles",
                   "known_sessions", "events_ingested")
INT_RANGES = {FD.TYPE_INT32: (-(2**31), 2**31 - 1), FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
              FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1), FD.TYPE_UINT32: (0, 2**32 - 1),
              FD.TYPE_FIXED32: (0, 2**32 - 1), FD.TYPE_INT64: (-(2**63), 2**63 - 1),
              FD.TYPE_SINT64: (-(2**63), 2**63 - 1), FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
              FD.TYPE_UINT64: (0, 2**64 - 1), FD.TYPE_FIXED64: (0, 2**64 - 1)}
WEIRD_STRINGS = ["", " ", "\x00", "a" * 65, "../../etc/passwd", "'; DROP TABLE events; --", "ñandú-🙂-\u202e-דוד",
                 "\ufeff", "%s%n%x", "\\", "0" * 32, "f" * 31, "F" * 32, "g" * 32, "null", "None", "\n\r\t"]


class _Internal(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


class Fuzzer:
    """Hostile calls against one in-process RankerProcess (see the module doc)."""

    def __init__(self, proc: Any, seed: int = 0) -> None:
        from appliance.v1 import consent_pb2, events_pb2, profile_pb2, ranker_pb2, sessions_pb2, status_pb2

        self.proc, self.core = proc, proc.core
        self.rng = random.Random(seed)
        self.max_bytes = proc.cfg.serving.max_message_bytes
        self.channel = grpc.insecure_channel(f"unix:{proc.servers.unix_socket}",
                                             options=[("grpc.max_send_message_length", 64 << 20),
                                                      ("grpc.max_receive_message_length", 64 << 20)])
        self.methods: list[tuple[str, Any, bool]] = []
        for pb2 in (ranker_pb2, events_pb2, sessions_pb2, consent_pb2, profile_pb2, status_pb2):
            for svc in pb2.DESCRIPTOR.services_by_name.values():
                for m in svc.methods:
                    self.methods.append((f"/{svc.full_name}/{m.name}", message_factory.GetMessageClass(m.input_type),
                                         m.client_streaming))
        from grpc_health.v1 import health_pb2

        self.methods.append(("/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest, False))
        self.unary = {name: self.channel.unary_unary(name, request_serializer=None, response_deserializer=None)
                      for name, _, streaming in self.methods if not streaming}
        self.stream = {name: self.channel.stream_unary(name, request_serializer=None, response_deserializer=None)
                       for name, _, streaming in self.methods if streaming}
        self.items = [int(i) for i in self.core.catalog.ids[:: max(1, len(self.core.catalog.ids) // 200)]]
        self.profiles = ["fz-alice", "fz-bob"]
        self.sessions: list[str] = []
        self._seed_state()
        self.stats: Counter[str] = Counter()
        self.by_method: dict[str, Counter[str]] = {}
        self.failures: list[dict[str, Any]] = []
        self.errors = _Internal()
        logging.getLogger("appliance").addHandler(self.errors)

    def close(self) -> None:
        logging.getLogger("appliance").removeHandler(self.errors)
        self.channel.close()

    # -- known state --------------------------------------------------------------------------------
    def _seed_state(self) -> None:
        core = self.core
        live = {s for s in self.sessions if s in core._sessions}
        for pid in self.profiles:
            if not any(core._sessions[s].profile_id == pid for s in live):
                sid = core.start_session(pid, 1)
                core.ingest(sid, [(1 + k % 9, self.items[k % len(self.items)], 1_700_000_000_000 + k, float(k))
                                  for k in range(20)])
                live.add(sid)
        self.sessions = sorted(live)

    def snapshot(self) -> tuple:
        core, store = self.core, self.core.store
        known = tuple((p, core._profiles[p].version if p in core._profiles else -1) for p in self.profiles)
        sess = tuple((s, core._sessions[s].state.version if s in core._sessions else -1) for s in self.sessions)
        return (store._db.total_changes, store.last_seq(), len(core._sessions), len(core._profiles),
                len(core._consent), core._consent_epoch, known, sess, core.counters.events_ingested)

    # -- payloads -----------------------------------------------------------------------------------
    def _string(self) -> str:
        r = self.rng.random()
        if r < 0.3 and self.sessions:
            return self.rng.choice(self.sessions)
        if r < 0.5:
            return self.rng.choice(self.profiles + ["fz-" + str(self.rng.randrange(10**6))])
        if r < 0.6:
            return f"{self.rng.getrandbits(128):032x}"
        if r < 0.85:
            return self.rng.choice(WEIRD_STRINGS)
        if r < 0.95:
            return "".join(chr(self.rng.choice([self.rng.randrange(32, 127), self.rng.randrange(0x80, 0xD7FF),
                                                 self.rng.randrange(0xE000, 0x10FFFF)]))
                           for _ in range(self.rng.randrange(1, 200)))
        return "x" * self.rng.choice([10_000, 1_000_000, self.max_bytes + 10])

    def _int(self, ftype: int) -> int:
        lo, hi = INT_RANGES[ftype]
        r = self.rng.random()
        if r < 0.3:
            v = self.rng.choice(self.items)
        elif r < 0.45:
            v = self.rng.choice([0, 1, -1, 2, 5, 9, 10, 20, 100, 101, 1000, 10_001, lo, hi, hi - 1, lo + 1])
        elif r < 0.6:
            v = self.rng.choice([time.time_ns() // 1_000_000, -time.time_ns() // 1_000_000, 2**62, 10**15])
        else:
            v = self.rng.randint(lo, hi) if self.rng.random() < 0.5 else self.rng.randint(-1000, 10**6)
        return min(max(v, lo), hi)

    def _float(self) -> float:
        return self.rng.choice([math.nan, math.inf, -math.inf, -0.0, 0.0, 1e38, -1e38, 3.4e38, 1e-45, 0.5, 59.9,
                                self.rng.uniform(-1e6, 1e6)])

    def _scalar(self, f: Any) -> Any:
        t = f.type
        if t == FD.TYPE_STRING:
            return self._string()
        if t == FD.TYPE_BYTES:
            return self.rng.randbytes(self.rng.randrange(0, 64))
        if t == FD.TYPE_BOOL:
            return self.rng.random() < 0.5
        if t in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
            return self._float()
        if t == FD.TYPE_ENUM:
            values = [v.number for v in f.enum_type.values]
            return self.rng.choice(values + [-1, 77, 2**31 - 1, -(2**31), max(values) + 1])
        return self._int(t)

    def message(self, cls: Any, depth: int = 0) -> Any:
        msg = cls()
        for f in cls.DESCRIPTOR.fields:
            if self.rng.random() < 0.25:
                continue
            try:
                if f.is_repeated if hasattr(f, "is_repeated") else f.label == FD.LABEL_REPEATED:
                    n = self.rng.choice([0, 1, 2, 3, 10, 100, 1000, 10_000, 10_001, 50_000] +
                                        ([600_000] if self.rng.random() < 0.05 else []))
                    field = getattr(msg, f.name)
                    if f.type == FD.TYPE_MESSAGE:
                        for _ in range(min(n, 50)):
                            field.add().CopyFrom(self.message(f.message_type._concrete_class, depth + 1))
                    elif n > 100:
                        one = self._scalar(f)
                        field.extend([one] * n if self.rng.random() < 0.5 else
                                     [self._scalar(f) for _ in range(100)] * (n // 100))
                    else:
                        field.extend([self._scalar(f) for _ in range(n)])
                elif f.type == FD.TYPE_MESSAGE:
                    if depth < 3:
                        getattr(msg, f.name).CopyFrom(self.message(f.message_type._concrete_class, depth + 1))
                else:
                    setattr(msg, f.name, self._scalar(f))
            except (ValueError, TypeError):
                pass  # a value this field cannot hold (e.g. a non-UTF-8 string): leave it unset
        return msg

    def template(self, cls: Any) -> Any:
        """A request that passes validation (known session, titles, sane k), for the deeper code paths."""
        from appliance.v1 import common_pb2

        name = cls.DESCRIPTOR.full_name
        rng, items = self.rng, self.items
        sid = rng.choice(self.sessions) if self.sessions else ""
        now = time.time_ns() // 1_000_000
        ctx = common_pb2.Context(device=rng.randint(0, 4), local_time_unix_ms=rng.choice([0, now]),
                                 utc_offset_minutes=rng.choice([0, 60, -300]), max_maturity=rng.randint(0, 5))
        if name == "appliance.v1.RankRequest":
            return cls(session_id=sid, context=ctx, k=rng.choice([1, 10, 100]),
                       candidate_ids=rng.sample(items, rng.choice([0, 1, 50, len(items)])))
        if name == "appliance.v1.EventBatch":
            n = rng.choice([1, 5, 100, 2000])
            return cls(session_id=sid, types=[rng.randint(1, 9) for _ in range(n)],
                       item_ids=[rng.choice(items) for _ in range(n)], client_time_ms=[now] * n,
                       values=[rng.uniform(0, 100) for _ in range(n)] if rng.random() < 0.5 else [])
        if name == "appliance.v1.Event":
            return cls(session_id=sid, type=rng.randint(1, 9), item_id=rng.choice(items), client_time_ms=now,
                       value=rng.uniform(0, 100))
        if name == "appliance.v1.StartSessionRequest":
            return cls(profile_id=rng.choice(self.profiles), context=ctx)
        if name == "appliance.v1.ExplainRequest":
            return cls(profile_id=rng.choice(self.profiles), top_k=rng.randint(0, 20))
        fields = cls.DESCRIPTOR.fields_by_name
        msg = cls()
        if "session_id" in fields:
            msg.session_id = sid
        if "profile_id" in fields:
            msg.profile_id = rng.choice(self.profiles)
        return msg

    def near_valid(self, cls: Any) -> Any:
        """A template with 0-2 fields replaced by hostile values."""
        msg = self.template(cls)
        hostile = self.message(cls)
        fields = [f for f in cls.DESCRIPTOR.fields]
        for f in self.rng.sample(fields, min(len(fields), self.rng.choice([0, 1, 1, 2]))):
            if f.is_repeated if hasattr(f, "is_repeated") else f.label == FD.LABEL_REPEATED:
                getattr(msg, f.name)[:] = []
                getattr(msg, f.name).extend(getattr(hostile, f.name)) if f.type != FD.TYPE_MESSAGE else None
            elif f.type == FD.TYPE_MESSAGE:
                getattr(msg, f.name).CopyFrom(getattr(hostile, f.name))
            else:
                setattr(msg, f.name, getattr(hostile, f.name))
        return msg

    def payload(self, cls: Any) -> tuple[str, bytes]:
        r = self.rng.random()
        if r < 0.35:
            return "near-valid", self.near_valid(cls).SerializeToString()
        if r < 0.6:
            return "valid", self.message(cls).SerializeToString()
        if r < 0.8:
            data = bytearray(self.message(cls).SerializeToString() or b"\x08\x01")
            for _ in range(self.rng.randrange(1, 8)):
                op = self.rng.randrange(4)
                if op == 0 and data:
                    data[self.rng.randrange(len(data))] = self.rng.randrange(256)
                elif op == 1 and data:
                    del data[self.rng.randrange(len(data)):]
                elif op == 2:
                    i = self.rng.randrange(len(data) + 1)
                    data[i:i] = self.rng.randbytes(self.rng.randrange(1, 16))
                else:
                    data += data[: self.rng.randrange(len(data) + 1)]
            return "mutated", bytes(data)
        if r < 0.97:
            return "random", self.rng.randbytes(self.rng.choice([0, 1, 2, 5, 16, 100, 1000, 5000]))
        from appliance.serving.rankpath import encode_varint

        return "oversize", b"\x0a" + encode_varint(self.max_bytes + 100) + b"a" * (self.max_bytes + 100)

    # -- one case -----------------------------------------------------------------------------------
    def case(self) -> None:
        name, cls, streaming = self.rng.choice(self.methods)
        before = self.snapshot()
        if streaming:
            parts = [self.payload(cls) for _ in range(self.rng.choice([0, 1, 2, 5, 20]))]
            kind = ",".join(sorted({k for k, _ in parts})) or "empty-stream"
            call = lambda: self.stream[name](iter([p for _, p in parts]), timeout=20)  # noqa: E731
            sample = parts[0][1][:64] if parts else b""
        else:
            kind, data = self.payload(cls)
            call = lambda: self.unary[name](data, timeout=20)  # noqa: E731
            sample = data[:64]
        try:
            call()
            code, details = "OK", ""
        except grpc.RpcError as exc:
            code, details = exc.code().name, (exc.details() or "")[:200]
        self.stats[code] += 1
        self.by_method.setdefault(name, Counter())[code] += 1
        problem, changed = None, []
        if code not in DOCUMENTED:
            problem = "undocumented status"
        elif code != "OK":
            after = self.snapshot()
            if after != before:
                problem = "state changed by a rejected call"
                changed = [SNAPSHOT_FIELDS[i] for i, (a, b) in enumerate(zip(before, after)) if a != b]
        if problem:
            self.failures.append({"problem": problem, "method": name, "code": code, "details": details, "kind": kind,
                                  "changed": changed, "payload_head": sample.hex()})
        if self.rng.random() < 0.02:
            self._seed_state()  # Forget and End are fair game: bring the known profiles back now and then

    def run(self, n: int, progress: bool = False) -> dict[str, Any]:
        t0 = time.perf_counter()
        for i in range(n):
            self.case()
            if progress and (i + 1) % 10_000 == 0:
                print(f"  {i + 1} cases, {len(self.failures)} failures, {time.perf_counter() - t0:.0f} s", flush=True)
        return {"cases": n, "seconds": round(time.perf_counter() - t0, 1), "statuses": dict(self.stats),
                "by_method": {k: dict(v) for k, v in sorted(self.by_method.items())}}

    def frames(self, n: int) -> dict[str, Any]:
        """Raw connections with random bytes, or an HTTP/2 preface and random frames."""
        sent = 0
        for _ in range(n):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(0.5)
            try:
                s.connect(self.proc.servers.unix_socket)
                if self.rng.random() < 0.5:
                    s.sendall(self.rng.randbytes(self.rng.randrange(1, 4096)))
                else:
                    data = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                    for _ in range(self.rng.randrange(1, 12)):
                        body = self.rng.randbytes(self.rng.randrange(0, 300))
                        ftype = self.rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 255])
                        data += struct.pack(">I", len(body))[1:] + bytes([ftype, self.rng.randrange(256)]) + \
                            struct.pack(">I", self.rng.getrandbits(32)) + body
                    s.sendall(data)
                sent += 1
                try:
                    s.recv(4096)
                except (TimeoutError, OSError):
                    pass
            except OSError:
                pass
            finally:
                s.close()
        return {"connections": n, "sent": sent}

    def alive(self) -> bool:
        from appliance.v1 import status_pb2

        try:
            self.channel.unary_unary("/appliance.v1.Status/Ping", request_serializer=None,
                                     response_deserializer=None)(status_pb2.PingRequest().SerializeToString(), timeout=10)
            return True
        except grpc.RpcError:
            return False


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench fuzz", description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="calls")
    ap.add_argument("--frames", type=int, default=2_000, help="raw connections with garbage bytes/frames")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="output JSON (default bench/results/fuzz-cpu.json)")
    args = ap.parse_args(argv)

    from appliance.config import default_config
    from appliance.serving.process import RankerProcess
    from bench.common import machine, peak_rss_mb, write_results

    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="bench-fuzz-", dir="/tmp"))
    cfg = default_config().with_overrides(run_dir=str(tmp / "run"), data_dir=str(tmp / "data"),
                                          metrics={"enabled": False}, serving={"client_events_per_s": 0})
    proc = RankerProcess(cfg)
    try:
        fz = Fuzzer(proc, args.seed)
        rss0 = peak_rss_mb()
        print(f"fuzz: {args.n} calls, {args.frames} raw connections ...", flush=True)
        calls = fz.run(args.n, progress=True)
        frames = fz.frames(args.frames)
        alive = fz.alive()
        internal = list(fz.errors.records)
        fz.close()
    finally:
        proc.stop()
    ok = not fz.failures and alive and not internal
    result = {"benchmark": "fuzz", "machine": machine(), "seed": args.seed, "calls": calls, "raw_connections": frames,
              "failures": len(fz.failures), "failure_samples": fz.failures[:20], "server_alive_after": alive,
              "internal_errors_logged": len(internal), "documented_statuses": sorted(DOCUMENTED),
              "rss_mb": {"start": rss0, "end": peak_rss_mb()}, "passed": ok}
    md = "\n".join([f"# Fuzz: {args.n:,} hostile calls + {args.frames:,} raw connections", "",
                    f"Passed: **{ok}**. Failures: {len(fz.failures)}; server alive after: {alive}; internal errors "
                    f"logged: {len(internal)}; {calls['seconds']} s.", "", "| status | calls |", "| --- | --- |"] +
                   [f"| {k} | {v:,} |" for k, v in sorted(calls["statuses"].items())] + [""])
    out = write_results("fuzz-cpu", result, md, args.json)
    print(md)
    print(f"wrote {out}")
    print(json.dumps({"passed": ok, "failures": len(fz.failures)}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
