"""The Rank hot path: request decoding without per-id Python objects, and a response cache.

**Wire view of RankRequest.** The server decodes `appliance.v1.RankRequest` through a private message
with the same field numbers in which the packed `candidate_ids` and the `context` are kept as bytes
(protobuf's length-delimited wire type is the same for both). Parsing it costs ~0.5 us instead of ~7 us,
the packed ids (sfixed64: eight little-endian bytes each) ARE an int64 array (`np.frombuffer`, no copy),
and the raw id bytes serve as the cache key. Anything the wire view cannot see exactly (ids sent unpacked,
which a parser must also accept) shows up as unknown fields, and then the request is decoded by the public
message instead; ids sent as varints (the field's former int64 type) are refused, never misread.

**Response cache.** A TV grid re-ranks the same row on every focus change. A Rank's answer depends on
the session's and the profile's state (their `version` counters bump on every event), the context the
ranker sees (device, local hour, weekday, maturity ceiling), the candidate ids and k, and on affect only
while fresh, consented affect is in use. So an answer computed without affect is kept per session with
the two versions it was computed from, and given again while both are unchanged: an event applied to
either state changes its version and the next Rank computes afresh (an event is visible to the next Rank
at once). Rankings that used affect are never cached. `affect_age_s` (field 4) is not cached: it is
appended to the cached bytes at answer time (for a scalar field the last value on the wire wins, and
fields may come in any order). `Profile.Forget` and `Sessions.End` drop the entries of their sessions.
"""

from __future__ import annotations

import struct
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.unknown_fields import UnknownFieldSet

from appliance.errors import ValidationError
from appliance.ranking.native import load as load_native
from appliance.ranking.reasons import SIGNALS
from appliance.v1 import common_pb2, ranker_pb2

_F = descriptor_pb2.FieldDescriptorProto
_file = descriptor_pb2.FileDescriptorProto(name="appliance/internal/rank_wire.proto", package="appliance.internal",
                                           syntax="proto3")
_msg = _file.message_type.add(name="RankRequestWire")
_msg.field.add(name="session_id", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
_msg.field.add(name="context", number=2, type=_F.TYPE_BYTES, label=_F.LABEL_REPEATED)  # merged like a message
_msg.field.add(name="candidate_ids", number=3, type=_F.TYPE_BYTES, label=_F.LABEL_REPEATED)  # packed chunks
_msg.field.add(name="k", number=4, type=_F.TYPE_INT32, label=_F.LABEL_OPTIONAL)
_pool = descriptor_pool.DescriptorPool()
_pool.Add(_file)
RankRequestWire = message_factory.GetMessageClass(_pool.FindMessageTypeByName("appliance.internal.RankRequestWire"))

_SHIFTS = (7 * np.arange(10, dtype=np.uint64)).astype(np.uint64)
_IDS = np.dtype("<i8")  # sfixed64 on the wire
_IDS_FIELD = ranker_pb2.RankRequest.DESCRIPTOR.fields_by_name["candidate_ids"].number
_AGE = struct.Struct("<Bf")
_AGE_TAG = (ranker_pb2.RankResponse.DESCRIPTOR.fields_by_name["affect_age_s"].number << 3) | 5  # fixed32


def decode_packed_int64(buf: bytes) -> np.ndarray:
    """Packed varints (protobuf int64) -> int64 array; ValueError on a truncated or overlong varint.

    Column-wise, with few numpy calls (EventBatch columns: a call costs about a microsecond, whatever its
    size): one pass finds where each varint ends, then byte j of every varint is or-ed in, masked off where
    a varint is shorter (one pass per byte of the longest varint: 3 for ids below 2 million). Varints of
    one length (times in ms, small enums) take a 2-D view instead."""
    b = np.frombuffer(buf, dtype=np.uint8)
    if b.size == 0:
        return np.zeros(0, dtype=np.int64)
    ends = (b < 0x80).nonzero()[0]
    if ends.size == 0 or ends[-1] != b.size - 1:
        raise ValueError("truncated varint")
    n = ends.size
    if n == b.size:  # every varint is one byte
        return b.astype(np.int64)
    starts = np.empty_like(ends)
    starts[0] = 0
    np.add(ends[:-1], 1, out=starts[1:])
    extra = ends - starts  # bytes after the first
    longest = int(extra.max()) + 1
    if longest > 10:
        raise ValueError("varint longer than 10 bytes")
    if n * longest == b.size:  # all the same length
        m = b.reshape(n, longest)
        out = (m[:, 0] & 0x7F).astype(np.uint64)
        for j in range(1, longest):
            out |= (m[:, j] & 0x7F).astype(np.uint64) << _SHIFTS[j]
        return out.view(np.int64)
    low = (b & 0x7F).astype(np.uint64)
    out = low[starts]
    for j in range(1, longest):
        t = low.take(starts + j, mode="clip")  # byte j, or a byte of the next varint (masked off next)
        t *= extra >= j
        t <<= _SHIFTS[j]
        out |= t
    return out.view(np.int64)


@dataclass
class RankCall:
    """A decoded, not yet validated RankRequest. The candidate ids are decoded on demand (`ids`): a
    cached answer needs only their bytes."""

    session_id: str
    context: common_pb2.Context
    k: int
    ids_key: bytes                # the candidate ids as packed sfixed64: the cache key
    _ids: np.ndarray | None = None

    def ids(self, max_count: int) -> np.ndarray | None:
        """The candidate ids (None when none were sent: the whole catalog); at most `max_count`, counted
        before anything is decoded (a 4 MB message must not become 100 MB of temporaries)."""
        if self._ids is None and self.ids_key:
            n, rest = divmod(len(self.ids_key), 8)
            if rest:
                raise ValidationError("candidate_ids: packed sfixed64 expected (8 bytes per id)")
            if n > max_count:
                raise ValidationError(f"candidate_ids: at most {max_count} per call, got {n}")
            self._ids = np.frombuffer(self.ids_key, dtype=_IDS)
        return self._ids


def parse_rank_request(data: bytes) -> RankCall:
    """Decode a serialized appliance.v1.RankRequest; ValidationError when it is not one."""
    try:
        wire = RankRequestWire.FromString(data)
        slow = len(UnknownFieldSet(wire)) > 0  # ids sent unpacked, or a field of an unexpected wire type
        if not slow:
            ctx = common_pb2.Context.FromString(b"".join(wire.context)) if wire.context else common_pb2.Context()
            chunks = wire.candidate_ids
            ids_key = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    except Exception:  # noqa: BLE001 - any decoding failure is the client's malformed message
        raise ValidationError("request is not a valid appliance.v1.RankRequest") from None
    return _parse_slow(data) if slow else RankCall(wire.session_id, ctx, wire.k, ids_key)


def _parse_slow(data: bytes) -> RankCall:
    try:
        req = ranker_pb2.RankRequest.FromString(data)
        varints = any(f.field_number == _IDS_FIELD for f in UnknownFieldSet(req))
    except Exception:  # noqa: BLE001 - the client's malformed message
        raise ValidationError("request is not a valid appliance.v1.RankRequest") from None
    if varints:  # a client built for the field's former int64 type
        raise ValidationError("candidate_ids: sfixed64 expected, got varints (regenerate the client from "
                              "appliance/v1/ranker.proto)")
    if not req.candidate_ids:
        return RankCall(req.session_id, req.context, req.k, b"")
    ids = np.fromiter(req.candidate_ids, dtype=_IDS, count=len(req.candidate_ids))
    # The key is the canonical packed form, exactly what a packed request with these ids carries.
    return RankCall(req.session_id, req.context, req.k, ids.tobytes(), ids)


def with_age(payload: bytes, affect_age_s: float) -> bytes:
    """A serialized RankResponse without affect_age_s, plus that field (last value on the wire wins)."""
    return payload + _AGE.pack(_AGE_TAG, affect_age_s)


def encode_varint(n: int) -> bytes:
    """Protobuf varint of an int64 (negative numbers as their two's complement: 10 bytes)."""
    if 0 <= n < 0x80:
        return _BYTE[n]
    n &= 0xFFFF_FFFF_FFFF_FFFF
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(tag: int, payload: bytes) -> bytes:
    """A length-delimited field: tag byte, length, payload."""
    n = len(payload)
    if n < 0x80:
        return bytes((tag, n)) + payload
    if n < 0x4000:  # an item of the answer: a two-byte length
        return bytes((tag, (n & 0x7F) | 0x80, n >> 7)) + payload
    return bytes((tag,)) + encode_varint(n) + payload


_BYTE = tuple(bytes((i,)) for i in range(0x80))


_F32 = struct.Struct("<f")
_ZERO32 = bytes(4)
_RankedItem, _Reason, _Contribution = ranker_pb2.RankedItem, ranker_pb2.Reason, ranker_pb2.SignalContribution


class ResponseEncoder:
    """Serializes a RankResponse by hand: ~10x fewer calls than filling the message (one `add` per reason
    and per contribution), which matters when it is a quarter of the server's time per Rank.

    What never changes is encoded once: each title's item_id + title fields (on first use; bounded by the
    catalog), each signal's contribution prefix, each reason text prefix. Field numbers and wire types are
    read from the generated descriptors at start, and the output must parse to exactly the message that
    `add_ranked_items` builds (a test checks it on real rankings). Proto3 rules are kept: zero scalars and
    empty strings are left out (a float whose 32 bits are 0), except that every signal contribution's value is
    written, zero or not (a parser reads an explicit 0 as the same message; this way the eight contributions
    of an item are one struct.pack). The caches are filled under a lock or by idempotent dict stores (two
    threads storing the same bytes is harmless)."""

    def __init__(self) -> None:
        def num(msg, name: str) -> int:  # noqa: ANN001 - a generated message class
            return msg.DESCRIPTOR.fields_by_name[name].number

        self._t_item = (num(ranker_pb2.RankResponse, "items") << 3) | 2
        self._t_version = (num(ranker_pb2.RankResponse, "model_version") << 3) | 2
        self._t_affect = bytes(((num(ranker_pb2.RankResponse, "affect_used") << 3) | 0, 1))
        self._t_mood = (num(ranker_pb2.RankResponse, "mood") << 3) | 2
        self._t_id = (num(_RankedItem, "item_id") << 3) | 0
        self._t_title = (num(_RankedItem, "title") << 3) | 2
        self._t_score = bytes(((num(_RankedItem, "score") << 3) | 5,))
        self._t_reason = (num(_RankedItem, "reasons") << 3) | 2
        self._t_contrib = (num(_RankedItem, "contributions") << 3) | 2
        self._t_r_text = (num(_Reason, "text") << 3) | 2
        self._t_r_signal = (num(_Reason, "signal") << 3) | 2
        self._t_r_weight = bytes(((num(_Reason, "weight") << 3) | 5,))
        self._t_r_because = bytes(((num(_Reason, "because_item_id") << 3) | 0,))
        self._t_c_signal = (num(_Contribution, "signal") << 3) | 2
        self._t_c_value = bytes(((num(_Contribution, "value") << 3) | 5,))
        self._heads: dict[tuple[int, str], bytes] = {}
        self._reason_heads: dict[tuple[str, str], bytes] = {}  # (text, signal) -> those two fields
        self._because: dict[int, bytes] = {}                    # item id -> because_item_id field
        self._contrib: dict[str, bytes] = {}
        self._signal_field: dict[str, bytes] = {}
        self._contrib_struct: dict[tuple[str, ...], Callable[[list[float]], bytes]] = {}
        self._signals_packer: Callable[[list[float]], bytes] | None = None
        self._lock = threading.Lock()
        self._native = load_native()  # the items of an `Explained` in one C call (the same bytes)
        if self._native is not None:
            self._native.configure_wire(self._t_item, self._t_id, self._t_title, self._t_score[0], self._t_reason,
                                        self._t_r_text, self._t_r_signal, self._t_r_weight[0],
                                        self._t_r_because[0])
            self._prefixes = tuple(self._contribution_prefix(n) for n in SIGNALS)

    def _head(self, item_id: int, title: str) -> bytes:
        key = (item_id, title)
        h = self._heads.get(key)
        if h is None:
            h = (bytes((self._t_id,)) + encode_varint(item_id) if item_id else b"") + \
                (_ld(self._t_title, title.encode()) if title else b"")
            with self._lock:
                if len(self._heads) > 100_000:  # bounded: a catalog swap cannot grow it forever
                    self._heads.clear()
                self._heads[key] = h
        return h

    def _reason_head(self, text: str, signal: str) -> bytes:
        """A reason's text and signal fields (the texts name titles: bounded by catalog x signals)."""
        h = (_ld(self._t_r_text, text.encode()) if text else b"") + self._signal(signal)
        with self._lock:
            if len(self._reason_heads) > 100_000:
                self._reason_heads.clear()
            self._reason_heads[(text, signal)] = h
        return h

    def _because_field(self, item_id: int) -> bytes:
        f = self._t_r_because + encode_varint(item_id)
        with self._lock:
            if len(self._because) > 100_000:
                self._because.clear()
            self._because[item_id] = f
        return f

    def _signal(self, signal: str) -> bytes:
        f = self._signal_field.get(signal)
        if f is None:
            f = self._signal_field[signal] = _ld(self._t_r_signal, signal.encode()) if signal else b""
        return f

    def _contribution_prefix(self, signal: str) -> bytes:
        """Everything of a contribution but its value's 4 bytes (which always follow)."""
        p = self._contrib.get(signal)
        if p is None:
            body = _ld(self._t_c_signal, signal.encode()) if signal else b""
            p = self._contrib[signal] = (bytes((self._t_contrib,)) + encode_varint(len(body) + 5) + body
                                         + self._t_c_value)
        return p

    def item(self, it) -> bytes:  # noqa: ANN001 - appliance.ranking.RankedItem
        contrib = it.contributions
        packer = self._contrib_struct.get(tuple(contrib)) or self._contrib_packer(tuple(contrib))
        return self._item(it.item_id, it.title, it.score, list(contrib.values()),
                          [(r.text, r.signal, r.weight, r.because_item_id) for r in it.reasons], packer)

    def _item(self, item_id: int, title: str, score: float, values: list[float], reasons: list[tuple],
              packer: Callable[[list[float]], bytes]) -> bytes:
        """One RankedItem: reasons as (text, signal, weight, because_item_id) tuples, the contribution values
        in the order `packer` was made for."""
        pack = _F32.pack
        parts = [self._heads.get((item_id, title)) or self._head(item_id, title)]
        f = pack(score)
        if f != _ZERO32:  # protobuf leaves out a float whose bits are 0 (-0.0 is kept)
            parts += (self._t_score, f)
        heads, because, t_reason = self._reason_heads, self._because, self._t_reason
        for text, signal, weight, b in reasons:
            body = heads.get((text, signal)) or self._reason_head(text, signal)
            f = pack(weight)
            if f != _ZERO32:
                body += self._t_r_weight + f
            if b:
                body += because.get(b) or self._because_field(b)
            n = len(body)
            parts.append(bytes((t_reason, n)) + body if n < 0x80 else _ld(t_reason, body))  # _ld, inlined
        parts.append(packer(values))  # every contribution in one call, zeros written out too
        return _ld(self._t_item, b"".join(parts))

    def _contrib_packer(self, names: tuple[str, ...]) -> Callable[[list[float]], bytes]:
        """values -> every contribution of an item with these signal names, in this order: one Struct whose
        format interleaves each contribution's constant bytes with its float, called by a function made for
        this many names (`pack(P0, v[0], P1, v[1], ...)`: a third of the cost of building the interleaved
        argument list per item). Only the name count goes into its source; the bytes are bound as values."""
        prefixes = [self._contribution_prefix(n) for n in names]
        pack = struct.Struct("<" + "".join(f"{len(p)}sf" for p in prefixes)).pack
        args = ", ".join(f"P{i}, v[{i}]" for i in range(len(names)))
        env = {"pack": pack, **{f"P{i}": p for i, p in enumerate(prefixes)}}
        packer = eval(f"lambda v: pack({args})", env)  # noqa: S307 - source built from integers only
        self._contrib_struct[names] = packer
        return packer

    def response(self, result) -> bytes:  # noqa: ANN001 - appliance.ranking.RankResult
        """The RankResponse of a ranking, without affect_age_s (see `with_age`). A ranking that carries its
        items as columns (`result.explained`) is encoded from them, without making the item objects."""
        ex = getattr(result, "explained", None)
        if ex is not None and self._native is not None:
            parts = [self._native.encode_items(ex.ids, ex.titles, ex.score32, ex.T, ex.reasons, self._prefixes)]
        elif ex is not None:
            packer = self._signals_packer or self._make_signals_packer()
            item = self._item
            parts = [item(i, t, s, v, rs, packer)
                     for i, t, s, v, rs in zip(ex.ids, ex.titles, ex.scores, ex.values, ex.reasons)]
        else:
            parts = [self.item(it) for it in result.items]
        if result.model_version:
            parts.append(_ld(self._t_version, result.model_version.encode()))
        if result.affect_used:
            parts.append(self._t_affect)
        if result.mood:
            parts.append(_ld(self._t_mood, result.mood.encode()))
        return b"".join(parts)

    def _make_signals_packer(self) -> Callable[[list[float]], bytes]:
        """The packer of the ranker's contributions (every signal, in SIGNALS order)."""
        self._signals_packer = self._contrib_struct.get(SIGNALS) or self._contrib_packer(SIGNALS)
        return self._signals_packer


_ENCODER = ResponseEncoder()


def encode_response(result) -> bytes:  # noqa: ANN001 - appliance.ranking.RankResult
    """The serialized RankResponse of a ranking, without affect_age_s (see `with_age`)."""
    return _ENCODER.response(result)


class RankCache:
    """Per-session LRU of serialized answers, each valid for one (profile version, session version).

    A session's entries are a short list scanned with `==` (most recent last), not a dict: a key holds the
    request's 8 KB of candidate ids, and hashing them costs ~5 us per Rank where comparing them with the few
    stored keys stops at the first differing byte."""

    def __init__(self, per_session: int = 8, max_sessions: int = 256) -> None:
        self.per_session, self.max_sessions = per_session, max_sessions
        self._by_session: OrderedDict[str, list[tuple[tuple, int, int, bytes]]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _find(entries: list, key: tuple) -> int:
        for i in range(len(entries) - 1, -1, -1):
            if entries[i][0] == key:
                return i
        return -1

    def get(self, session_id: str, key: tuple, versions: tuple[int, int]) -> bytes | None:
        if self.per_session <= 0:
            return None
        with self._lock:
            entries = self._by_session.get(session_id)
            i = self._find(entries, key) if entries is not None else -1
            if i < 0 or (entries[i][1], entries[i][2]) != versions:
                self.misses += 1
                return None
            entry = entries.pop(i)
            entries.append(entry)
            self._by_session.move_to_end(session_id)
            self.hits += 1
            return entry[3]

    def peek(self, session_id: str, key: tuple) -> tuple[int, int, bytes] | None:
        """The entry for this request whatever its versions (it was validated when it was stored)."""
        if self.per_session <= 0:
            return None
        with self._lock:
            entries = self._by_session.get(session_id)
            i = self._find(entries, key) if entries is not None else -1
            return entries[i][1:] if i >= 0 else None

    def put(self, session_id: str, key: tuple, versions: tuple[int, int], payload: bytes) -> None:
        if self.per_session <= 0:
            return
        with self._lock:
            entries = self._by_session.get(session_id)
            if entries is None:
                entries = self._by_session[session_id] = []
                while len(self._by_session) > self.max_sessions:
                    self._by_session.popitem(last=False)
            else:
                self._by_session.move_to_end(session_id)
                i = self._find(entries, key)
                if i >= 0:
                    del entries[i]
            entries.append((key, versions[0], versions[1], payload))
            if len(entries) > self.per_session:
                del entries[: len(entries) - self.per_session]

    def drop(self, session_ids) -> None:  # noqa: ANN001 - an iterable of session ids
        with self._lock:
            for sid in session_ids:
                self._by_session.pop(sid, None)

    def __len__(self) -> int:
        with self._lock:
            return sum(len(e) for e in self._by_session.values())
