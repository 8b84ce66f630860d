"""gRPC servicers of appliance.v1: thin adapters from messages to ApplianceCore."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import grpc

from appliance.errors import ValidationError
from appliance.serving import validation as check
from appliance.serving.core import ApplianceCore, rank_context
from appliance.serving.errors import CallEnded, grpc_errors
from appliance.serving.ingest import columns_from_rows, parse_event_batch
from appliance.serving.ingest import validate as validate_columns
from appliance.serving.rankpath import encode_response, parse_rank_request, with_age
from appliance.v1 import (
    consent_pb2,
    consent_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    profile_pb2,
    profile_pb2_grpc,
    ranker_pb2,
    ranker_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
    status_pb2,
    status_pb2_grpc,
)

MAX_EXPLAIN_TOP_K = 20
_PONG = status_pb2.PingResponse()
CLIENT_ID_KEY = "x-client-id"
STREAM_END_GRACE_S = 0.003
PRIVACY_STATEMENTS = (
    "Camera affect is off unless this profile turns it on; when off, the camera is not opened.",
    "Frames are analysed in memory on this box and never stored or sent anywhere.",
    "Viewing events are kept on this box for {days} days to personalise recommendations, then deleted.",
    "If this box runs an A/B test, which variant a profile saw is kept here as long as its events; it leaves "
    "the box only inside noised per-variant counts.",
    "Only clipped, noised, aggregated model updates ever leave the box; never titles, ids or events.",
    "Profile.Forget erases this profile's events, sessions and live state at once.",
)


def add_ranked_items(field, items) -> None:  # noqa: ANN001 - a repeated RankedItem field, RankedItems
    """Fill a repeated appliance.v1.RankedItem field from the ranker's items."""
    for item in items:
        out = field.add(item_id=item.item_id, title=item.title, score=item.score)
        for r in item.reasons:
            out.reasons.add(text=r.text, signal=r.signal, weight=r.weight, because_item_id=r.because_item_id or 0)
        for name, value in item.contributions.items():
            out.contributions.add(signal=name, value=value)


class RankerService(ranker_pb2_grpc.RankerServicer):
    def __init__(self, core: ApplianceCore) -> None:
        self.core = core
        self.cfg = core.cfg.serving

    @grpc_errors
    def Rank(self, request: bytes | ranker_pb2.RankRequest, context: grpc.ServicerContext) -> bytes:
        """Serialized RankRequest in, serialized RankResponse out (see rankpath: wire view and cache)."""
        call = parse_rank_request(request if isinstance(request, bytes) else request.SerializeToString())
        sid = check.session_id(call.session_id)
        check.context(call.context)
        k = check.k(call.k, self.cfg.max_k)
        c = call.context
        ctx = rank_context(c.device, c.local_time_unix_ms, c.utc_offset_minutes, c.max_maturity,
                           self.core.cfg.ranking.default_max_maturity)
        key = (k, ctx, call.ids_key)
        cache = self.core.rank_cache
        entry = cache.peek(sid, key)
        cands = None
        if entry is None:  # not seen before: validate the ids (a stored entry's ids were validated)
            cands = check.candidate_array(call.ids(self.cfg.max_candidates), self.cfg.max_candidates)
        versions, age = self.core.rank_versions(sid)
        if entry is not None and versions is not None and (entry[0], entry[1]) == versions:
            cache.hits += 1
            self.core.note_cached_rank(sid)  # experiments: an exposure (no-op without experiments)
            return with_age(entry[2], age)
        if entry is not None:
            cands = check.candidate_array(call.ids(self.cfg.max_candidates), self.cfg.max_candidates)
        cache.misses += 1
        left = context.time_remaining() if context is not None else None
        if left is not None and left <= 0:  # the caller has given up: do not rank for nobody
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before ranking")
        result = self.core.rank(sid, ctx, cands, k)
        payload = encode_response(result)
        if versions is not None and not result.affect_used:
            self.core.rank_cache_put(sid, key, versions, payload)
        return with_age(payload, result.affect_age_s)


class EventsService(events_pb2_grpc.EventsServicer):
    def __init__(self, core: ApplianceCore) -> None:
        self.core = core
        self.max_events = core.cfg.serving.max_batch_events

    def _client_key(self, context: grpc.ServicerContext, session_id: str) -> str:
        for key, value in context.invocation_metadata() or ():
            if key == CLIENT_ID_KEY:
                return f"c:{value[:64]}"
        return f"s:{session_id}"

    def _timeout(self, context: grpc.ServicerContext) -> float:
        left = context.time_remaining()
        return 30.0 if left is None else max(0.0, min(float(left), 30.0))

    @grpc_errors
    def IngestBatch(self, request: bytes | events_pb2.EventBatch, context: grpc.ServicerContext) -> bytes:
        """Serialized EventBatch in (decoded column-wise, see ingest), serialized IngestAck out."""
        data = request if isinstance(request, bytes) else request.SerializeToString()
        cols = parse_event_batch(data, self.max_events)
        check.session_id(cols.session_id)
        cols = validate_columns(cols, self.max_events)
        self.core.limiter.take(self._client_key(context, cols.session_id), len(cols))
        seq = self.core.ingest_columns([cols], self._timeout(context), context.is_active)[0]
        return events_pb2.IngestAck(accepted=len(cols), durable_seq=seq).SerializeToString()

    @grpc_errors
    def Ingest(self, request_iterator: Iterator[events_pb2.Event],
               context: grpc.ServicerContext) -> events_pb2.IngestAck:
        # Validate the whole stream first: a bad event rejects the call and nothing is written.
        ended = threading.Event()
        context.add_callback(ended.set)  # fires when the call terminates (a cut stream: at once)
        by_session: dict[str, list[tuple[int, int, int, float]]] = defaultdict(list)
        n = 0
        for ev in request_iterator:
            n += 1
            if n > self.max_events:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"at most {self.max_events} events per stream; send another call")
            sid = check.session_id(ev.session_id)
            by_session[sid].append(check.event_row(ev.type, ev.item_id, ev.client_time_ms, ev.value,
                                                   where=f"event {n - 1}"))
        if n == 0:
            raise ValidationError("stream carried no events")
        batches = [validate_columns(columns_from_rows(sid, rows), self.max_events) for sid, rows in by_session.items()]
        for cols in batches:
            self.core.limiter.take(self._client_key(context, cols.session_id), len(cols))
        # A stream cut by the transport (an oversize message, a reset) can look like a clean end for a moment:
        # grpcio reports the missing message before the cancellation. Give the cancellation that moment.
        if ended.wait(STREAM_END_GRACE_S) or not context.is_active():
            raise CallEnded("the stream ended with an error; nothing was written")
        seqs = self.core.ingest_columns(batches, self._timeout(context), context.is_active)  # one group commit
        return events_pb2.IngestAck(accepted=n, durable_seq=max(seqs))


class SessionsService(sessions_pb2_grpc.SessionsServicer):
    def __init__(self, core: ApplianceCore) -> None:
        self.core = core

    @grpc_errors
    def Start(self, request: sessions_pb2.StartSessionRequest,
              context: grpc.ServicerContext) -> sessions_pb2.StartSessionResponse:
        pid = check.profile_id(request.profile_id)
        check.context(request.context)
        return sessions_pb2.StartSessionResponse(session_id=self.core.start_session(pid, request.context.device))

    @grpc_errors
    def End(self, request: sessions_pb2.EndSessionRequest,
            context: grpc.ServicerContext) -> sessions_pb2.EndSessionResponse:
        self.core.end_session(check.session_id(request.session_id))
        return sessions_pb2.EndSessionResponse()


class ConsentService(consent_pb2_grpc.ConsentServicer):
    def __init__(self, core: ApplianceCore, on_change: Callable[[], None] | None = None) -> None:
        self.core = core
        self.on_change = on_change

    @grpc_errors
    def Get(self, request: consent_pb2.GetConsentRequest, context: grpc.ServicerContext) -> consent_pb2.ConsentState:
        pid = check.profile_id(request.profile_id)
        camera, updated = self.core.get_consent(pid)
        return consent_pb2.ConsentState(profile_id=pid, camera_affect=camera, updated_unix_ms=updated)

    @grpc_errors
    def Set(self, request: consent_pb2.SetConsentRequest, context: grpc.ServicerContext) -> consent_pb2.ConsentState:
        pid = check.profile_id(request.profile_id)
        camera, updated = self.core.set_consent(pid, request.camera_affect)
        if self.on_change is not None:
            self.on_change()  # tell the vision process now, not at the next heartbeat
        return consent_pb2.ConsentState(profile_id=pid, camera_affect=camera, updated_unix_ms=updated)


class ProfileService(profile_pb2_grpc.ProfileServicer):
    def __init__(self, core: ApplianceCore, on_change: Callable[[], None] | None = None) -> None:
        self.core = core
        self.on_change = on_change

    @grpc_errors
    def Explain(self, request: profile_pb2.ExplainRequest,
                context: grpc.ServicerContext) -> profile_pb2.ExplainResponse:
        pid = check.profile_id(request.profile_id)
        if request.top_k > MAX_EXPLAIN_TOP_K:
            raise ValidationError(f"top_k must be at most {MAX_EXPLAIN_TOP_K}")
        info = self.core.explain(pid, request.top_k)
        days = self.core.cfg.store.event_retention_days
        resp = profile_pb2.ExplainResponse(
            profile_id=pid, camera_affect=info["camera_affect"], events_stored=info["events"],
            sessions_stored=info["sessions"], oldest_event_unix_ms=info["oldest_ms"],
            statements=[s.format(days=days) for s in PRIVACY_STATEMENTS])
        for genre, affinity in info["top_genres"]:
            resp.top_genres.add(genre=genre, affinity=affinity)
        add_ranked_items(resp.top_items, info["top_items"])
        return resp

    @grpc_errors
    def List(self, request: profile_pb2.ListProfilesRequest,
             context: grpc.ServicerContext) -> profile_pb2.ListProfilesResponse:
        resp = profile_pb2.ListProfilesResponse()
        for pid, camera in self.core.list_profiles():
            resp.profiles.add(profile_id=pid, camera_affect=camera)
        return resp

    @grpc_errors
    def Forget(self, request: profile_pb2.ForgetRequest, context: grpc.ServicerContext) -> profile_pb2.ForgetResponse:
        pid = check.profile_id(request.profile_id)
        events, sessions = self.core.forget(pid)
        if self.on_change is not None:
            self.on_change()
        return profile_pb2.ForgetResponse(events_deleted=events, sessions_deleted=sessions)


class StatusService(status_pb2_grpc.StatusServicer):
    def __init__(self, core: ApplianceCore, vision_timeout_s: float = 1.5) -> None:
        self.core = core
        self.vision_timeout_ns = int(vision_timeout_s * 1e9)

    def Ping(self, request: status_pb2.PingRequest, context: grpc.ServicerContext) -> status_pb2.PingResponse:
        return _PONG

    @grpc_errors
    def Get(self, request: status_pb2.StatusRequest, context: grpc.ServicerContext) -> status_pb2.ApplianceStatus:
        v = self.core.vision
        now = time.monotonic_ns()
        alive = v.heard_ns > 0 and now - v.heard_ns < self.vision_timeout_ns
        affect = self.core.latest_affect()
        from appliance.ranking import mood_word

        return status_pb2.ApplianceStatus(
            version=self.core.versions()["appliance"], camera_open=alive and v.camera_open, vision_alive=alive,
            camera_fps=v.camera_fps, process_fps=v.process_fps, frames=v.frames,
            frames_with_face=v.frames_with_face, faces=v.faces,
            affect_age_s=(affect.age_s(now) if affect is not None else -1.0),
            affect_samples_received=v.affect_samples_received,
            mood=(mood_word(affect.valence, affect.arousal) if affect is not None else ""),
            versions=self.core.versions(), detector_ms=v.detector_ms)
