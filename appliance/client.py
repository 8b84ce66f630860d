"""A small typed client of the appliance.v1 API (used by the demo, tests and benchmarks)."""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from appliance.v1 import (
    common_pb2,
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


class ApplianceClient:
    """Stubs over one channel. `target` is `unix:/path` or `host:port`; `token` for TCP."""

    def __init__(self, target: str, token: str | None = None, max_message_bytes: int = 64 * 1024 * 1024,
                 tls: tuple[bytes, bytes, bytes] | None = None) -> None:
        """`tls`: (server CA, client certificate chain, client key) as PEM bytes, for a box that serves TCP
        with mutual TLS."""
        opts = [("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes)]
        if tls is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=tls[0], certificate_chain=tls[1],
                                                 private_key=tls[2])
            self.channel = grpc.secure_channel(target, creds, options=opts)
        else:
            self.channel = grpc.insecure_channel(target, options=opts)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.ranker = ranker_pb2_grpc.RankerStub(self.channel)
        self.events = events_pb2_grpc.EventsStub(self.channel)
        self.sessions = sessions_pb2_grpc.SessionsStub(self.channel)
        self.consent = consent_pb2_grpc.ConsentStub(self.channel)
        self.profile = profile_pb2_grpc.ProfileStub(self.channel)
        self.status = status_pb2_grpc.StatusStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until health says SERVING (raises TimeoutError otherwise)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                r = self.health.Check(health_pb2.HealthCheckRequest(), timeout=1.0, metadata=self.metadata)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"appliance not serving after {timeout_s:.0f} s")

    def start_session(self, profile_id: str, device: int = common_pb2.DEVICE_TYPE_TV) -> str:
        req = sessions_pb2.StartSessionRequest(profile_id=profile_id, context=common_pb2.Context(device=device))
        return self.sessions.Start(req, timeout=5, metadata=self.metadata).session_id

    def end_session(self, session_id: str) -> None:
        self.sessions.End(sessions_pb2.EndSessionRequest(session_id=session_id), timeout=5,
                          metadata=self.metadata)

    def set_consent(self, profile_id: str, camera: bool) -> consent_pb2.ConsentState:
        return self.consent.Set(consent_pb2.SetConsentRequest(profile_id=profile_id, camera_affect=camera),
                                timeout=5, metadata=self.metadata)

    def rank(self, session_id: str, k: int = 10, candidate_ids: list[int] | None = None,
             device: int = common_pb2.DEVICE_TYPE_TV, max_maturity: int = 0,
             timeout: float = 5.0) -> ranker_pb2.RankResponse:
        now_ms = time.time_ns() // 1_000_000
        offset_min = int(-time.timezone / 60)
        ctx = common_pb2.Context(device=device, local_time_unix_ms=now_ms, utc_offset_minutes=offset_min,
                                 max_maturity=max_maturity)
        req = ranker_pb2.RankRequest(session_id=session_id, context=ctx, candidate_ids=candidate_ids or [], k=k)
        return self.ranker.Rank(req, timeout=timeout, metadata=self.metadata)

    def send_events(self, session_id: str, rows: list[tuple[int, int]]) -> events_pb2.IngestAck:
        """(type, item_id) rows as one columnar batch; returns the durable ack."""
        now_ms = time.time_ns() // 1_000_000
        batch = events_pb2.EventBatch(session_id=session_id, types=[t for t, _ in rows],
                                      item_ids=[i for _, i in rows], client_time_ms=[now_ms] * len(rows))
        return self.events.IngestBatch(batch, timeout=5, metadata=self.metadata)

    def stream_events(self, session_id: str, rows: list[tuple[int, int]]) -> events_pb2.IngestAck:
        now_ms = time.time_ns() // 1_000_000
        msgs = (events_pb2.Event(session_id=session_id, type=t, item_id=i, client_time_ms=now_ms) for t, i in rows)
        return self.events.Ingest(msgs, timeout=5, metadata=self.metadata)

    def explain(self, profile_id: str) -> profile_pb2.ExplainResponse:
        return self.profile.Explain(profile_pb2.ExplainRequest(profile_id=profile_id), timeout=5,
                                    metadata=self.metadata)

    def forget(self, profile_id: str) -> profile_pb2.ForgetResponse:
        return self.profile.Forget(profile_pb2.ForgetRequest(profile_id=profile_id), timeout=5,
                                   metadata=self.metadata)

    def ping(self, timeout: float = 5.0) -> None:
        """An empty call: the transport's round trip (raises grpc.RpcError when the box does not answer)."""
        self.status.Ping(status_pb2.PingRequest(), timeout=timeout, metadata=self.metadata)

    def get_status(self) -> status_pb2.ApplianceStatus:
        return self.status.Get(status_pb2.StatusRequest(), timeout=5, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()
