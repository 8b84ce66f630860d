"""gRPC servicers of appliance.v1: thin adapters from messages to ApplianceCore."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import grpc

from appliance.errors import ValidationError
from appliance.serving import validation as check
from appliance.serving.core import ApplianceCore, rank_context
from appliance.serving.errors import grpc_errors
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
PRIVACY_STATEMENTS = (
    "Camera affect is off unless this profile turns it on; when off, the camera is not opened.",
    "Frames are analysed in memory on this box and never stored or sent anywhere.",
    "Viewing events are kept on this box for {days} days to personalise recommendations.",
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
    def Rank(self, request: ranker_pb2.RankRequest, context: grpc.ServicerContext) -> ranker_pb2.RankResponse:
        sid = check.session_id(request.session_id)
        check.context(request.context)
        k = check.k(request.k, self.cfg.max_k)
        cands = check.candidate_ids(request.candidate_ids, self.cfg.max_candidates)
        ctx = rank_context(request.context.device, request.context.local_time_unix_ms,
                           request.context.utc_offset_minutes, request.context.max_maturity,
                           self.core.cfg.ranking.default_max_maturity)
        result = self.core.rank(sid, ctx, list(cands) if cands else None, k)
        resp = ranker_pb2.RankResponse(model_version=result.model_version, affect_used=result.affect_used,
                                       affect_age_s=result.affect_age_s, mood=result.mood)
        add_ranked_items(resp.items, result.items)
        return resp


class EventsService(events_pb2_grpc.EventsServicer):
    def __init__(self, core: ApplianceCore) -> None:
        self.core = core
        self.max_events = core.cfg.serving.max_batch_events

    @grpc_errors
    def IngestBatch(self, request: events_pb2.EventBatch, context: grpc.ServicerContext) -> events_pb2.IngestAck:
        sid = check.session_id(request.session_id)
        rows = check.event_columns(request.types, request.item_ids, request.client_time_ms, request.values,
                                   self.max_events)
        seq = self.core.ingest(sid, rows)
        return events_pb2.IngestAck(accepted=len(rows), durable_seq=seq)

    @grpc_errors
    def Ingest(self, request_iterator: Iterator[events_pb2.Event],
               context: grpc.ServicerContext) -> events_pb2.IngestAck:
        # Validate the whole stream first: a bad event rejects the call and nothing is written.
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
        for sid in by_session:
            self.core._live(sid)  # unknown session -> NOT_FOUND before anything is written
        seq = 0
        for sid, rows in by_session.items():
            seq = self.core.ingest(sid, rows)
        return events_pb2.IngestAck(accepted=n, durable_seq=seq)


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
