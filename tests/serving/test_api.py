"""The appliance.v1 API over the real Unix socket: happy paths, statuses, no state change on bad input."""

from __future__ import annotations

import os
import stat

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from appliance.client import ApplianceClient
from appliance.serving.process import RankerProcess
from appliance.store import Store
from appliance.v1 import common_pb2, consent_pb2, events_pb2, ranker_pb2, sessions_pb2

PLAY, LIKE, SKIP = events_pb2.EVENT_TYPE_PLAY, events_pb2.EVENT_TYPE_LIKE, events_pb2.EVENT_TYPE_SKIP


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kwargs)
    return err.value.code()


def snapshot(ranker: RankerProcess) -> tuple:
    st = ranker.store
    return (st.last_seq(), [(p.profile_id, p.camera_consent) for p in st.profiles()],
            [s.session_id for s in st.open_sessions()])


def test_rank_returns_k_items_each_with_reasons(client):
    sid = client.start_session("alice")
    resp = client.rank(sid, k=10)
    assert len(resp.items) == 10
    assert len({it.item_id for it in resp.items}) == 10
    for it in resp.items:
        assert it.title and it.reasons and all(r.text and r.signal for r in it.reasons)
        assert it.contributions
    assert resp.model_version


def test_consent_is_off_by_default_and_settable(client):
    client.start_session("bob")
    got = client.consent.Get(consent_pb2.GetConsentRequest(profile_id="bob"))
    assert got.camera_affect is False
    assert client.set_consent("bob", True).camera_affect is True
    assert client.consent.Get(consent_pb2.GetConsentRequest(profile_id="bob")).camera_affect is True


def test_ack_means_durable_and_visible(ranker, client):
    sid = client.start_session("carol")
    top = client.rank(sid, k=3).items
    ack = client.send_events(sid, [(PLAY, top[0].item_id), (LIKE, top[0].item_id)])
    assert ack.accepted == 2
    other = Store(ranker.store.path)  # a second connection sees the committed rows
    assert [(e.type, e.item_id) for e in other.iter_events("carol")] == [(PLAY, top[0].item_id),
                                                                         (LIKE, top[0].item_id)]
    other.close()
    ack2 = client.stream_events(sid, [(SKIP, top[1].item_id)] * 3)
    assert ack2.accepted == 3 and ack2.durable_seq == ack.durable_seq + 3


def test_bad_input_statuses_and_no_state_change(ranker, client):
    sid = client.start_session("dave")
    before = snapshot(ranker)
    first = client.rank(sid, k=5)
    ctx = common_pb2.Context(device=common_pb2.DEVICE_TYPE_TV)
    R = client.ranker.Rank
    cases = {
        "unknown session": (R, ranker_pb2.RankRequest(session_id="0" * 32, k=5), grpc.StatusCode.NOT_FOUND),
        "malformed session": (R, ranker_pb2.RankRequest(session_id="x;drop", k=5),
                              grpc.StatusCode.INVALID_ARGUMENT),
        "empty session": (R, ranker_pb2.RankRequest(k=5), grpc.StatusCode.INVALID_ARGUMENT),
        "k zero": (R, ranker_pb2.RankRequest(session_id=sid, k=0), grpc.StatusCode.INVALID_ARGUMENT),
        "k negative": (R, ranker_pb2.RankRequest(session_id=sid, k=-3), grpc.StatusCode.INVALID_ARGUMENT),
        "k huge": (R, ranker_pb2.RankRequest(session_id=sid, k=10**9), grpc.StatusCode.INVALID_ARGUMENT),
        "unknown ids": (R, ranker_pb2.RankRequest(session_id=sid, k=5, candidate_ids=[1, 987654321]),
                        grpc.StatusCode.NOT_FOUND),
        "negative ids": (R, ranker_pb2.RankRequest(session_id=sid, k=5, candidate_ids=[-1]),
                         grpc.StatusCode.INVALID_ARGUMENT),
        "bad device enum": (R, ranker_pb2.RankRequest(session_id=sid, k=5, context=common_pb2.Context(device=77)),
                            grpc.StatusCode.INVALID_ARGUMENT),
        "bad maturity enum": (R, ranker_pb2.RankRequest(session_id=sid, k=5,
                                                        context=common_pb2.Context(max_maturity=-2)),
                              grpc.StatusCode.INVALID_ARGUMENT),
        "too many candidates": (R, ranker_pb2.RankRequest(session_id=sid, k=5, candidate_ids=list(range(1, 20002))),
                                grpc.StatusCode.INVALID_ARGUMENT),
        "oversize message": (R, ranker_pb2.RankRequest(session_id=sid, k=5, candidate_ids=[2**40] * 1_000_000),  # 8 MB > 4 MB limit
                             grpc.StatusCode.RESOURCE_EXHAUSTED),
        "bad event enum": (client.events.IngestBatch,
                           events_pb2.EventBatch(session_id=sid, types=[42], item_ids=[1], client_time_ms=[1]),
                           grpc.StatusCode.INVALID_ARGUMENT),
        "ragged batch": (client.events.IngestBatch,
                         events_pb2.EventBatch(session_id=sid, types=[1, 1], item_ids=[1], client_time_ms=[1, 1]),
                         grpc.StatusCode.INVALID_ARGUMENT),
        "empty batch": (client.events.IngestBatch, events_pb2.EventBatch(session_id=sid),
                        grpc.StatusCode.INVALID_ARGUMENT),
        "unknown item event": (client.events.IngestBatch,
                               events_pb2.EventBatch(session_id=sid, types=[1, 1], item_ids=[1, 987654321],
                                                     client_time_ms=[1, 1]), grpc.StatusCode.NOT_FOUND),
        "negative time": (client.events.IngestBatch,
                          events_pb2.EventBatch(session_id=sid, types=[1], item_ids=[1], client_time_ms=[-5]),
                          grpc.StatusCode.INVALID_ARGUMENT),
        "nan value": (client.events.IngestBatch,
                      events_pb2.EventBatch(session_id=sid, types=[8], item_ids=[1], client_time_ms=[1],
                                            values=[float("nan")]), grpc.StatusCode.INVALID_ARGUMENT),
        "bad profile id": (client.sessions.Start, sessions_pb2.StartSessionRequest(profile_id="a b/../c", context=ctx),
                           grpc.StatusCode.INVALID_ARGUMENT),
        "huge profile id": (client.sessions.Start, sessions_pb2.StartSessionRequest(profile_id="p" * 10_000),
                            grpc.StatusCode.INVALID_ARGUMENT),
        "consent unknown profile": (client.consent.Get, consent_pb2.GetConsentRequest(profile_id="nobody"),
                                    grpc.StatusCode.NOT_FOUND),
        "end unknown session": (client.sessions.End, sessions_pb2.EndSessionRequest(session_id="f" * 32),
                                grpc.StatusCode.NOT_FOUND),
    }
    for name, (call, req, want) in cases.items():
        assert code_of(call, req, timeout=5) == want, name
    # A stream with one bad event writes nothing at all.
    good = events_pb2.Event(session_id=sid, type=PLAY, item_id=1, client_time_ms=1)
    bad = events_pb2.Event(session_id=sid, type=99, item_id=1, client_time_ms=1)
    assert code_of(client.events.Ingest, iter([good, good, bad]), timeout=5) == grpc.StatusCode.INVALID_ARGUMENT
    assert snapshot(ranker) == before
    again = client.rank(sid, k=5)
    assert [i.item_id for i in again.items] == [i.item_id for i in first.items]


def test_tcp_needs_the_token(cfg, monkeypatch):
    token = "t0k3n-for-tests-0123456789"
    monkeypatch.setenv("APPLIANCE_TOKEN", token)
    proc = RankerProcess(cfg.with_overrides(serving={"tcp_port": 0 or _free_port()}))
    try:
        port = proc.servers.tcp_port
        anon = ApplianceClient(f"127.0.0.1:{port}")
        assert code_of(anon.start_session, "erin") == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(anon.stream_events, "0" * 32, [(PLAY, 1)]) == grpc.StatusCode.UNAUTHENTICATED
        wrong = ApplianceClient(f"127.0.0.1:{port}", token="not-the-token-at-all")
        assert code_of(wrong.start_session, "erin") == grpc.StatusCode.UNAUTHENTICATED
        good = ApplianceClient(f"127.0.0.1:{port}", token=token)
        sid = good.start_session("erin")
        assert len(good.rank(sid, k=3).items) == 3
        assert proc.store.get_profile("erin") is not None
        for c in (anon, wrong, good):
            c.close()
    finally:
        proc.stop()


def test_tcp_without_token_configured_refuses_to_start(cfg, monkeypatch):
    from appliance.errors import ConfigError

    monkeypatch.delenv("APPLIANCE_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="APPLIANCE_TOKEN"):
        RankerProcess(cfg.with_overrides(serving={"tcp_port": _free_port()}))


def test_unix_socket_is_0660(ranker):
    mode = stat.S_IMODE(os.stat(ranker.servers.unix_socket).st_mode)
    assert mode == 0o660


def test_health_and_reflection(client):
    assert client.health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"appliance.v1.Ranker", "appliance.v1.Events", "appliance.v1.Sessions", "appliance.v1.Consent",
            "appliance.v1.Profile", "grpc.health.v1.Health"} <= names


def test_forget_erases_profile_and_its_sessions(ranker, client):
    sid = client.start_session("frank")
    items = client.rank(sid, k=2).items
    client.send_events(sid, [(PLAY, items[0].item_id)])
    other = client.start_session("gina")
    client.send_events(other, [(PLAY, items[1].item_id)])
    out = client.forget("frank")
    assert out.events_deleted == 1 and out.sessions_deleted == 1
    assert list(ranker.store.iter_events("frank")) == []
    assert code_of(client.rank, sid) == grpc.StatusCode.NOT_FOUND
    assert code_of(client.explain, "frank") == grpc.StatusCode.NOT_FOUND
    assert len(list(ranker.store.iter_events("gina"))) == 1  # the other profile is untouched


def test_explain_says_what_is_stored(client):
    sid = client.start_session("hana")
    items = client.rank(sid, k=2).items
    client.send_events(sid, [(LIKE, items[0].item_id), (PLAY, items[1].item_id)])
    ex = client.explain("hana")
    assert ex.events_stored == 2 and ex.sessions_stored == 1 and not ex.camera_affect
    assert any("never" in s for s in ex.statements)


def test_state_survives_restart(cfg):
    proc = RankerProcess(cfg)
    c = ApplianceClient(f"unix:{proc.servers.unix_socket}")
    c.wait_ready(10)
    sid = c.start_session("ivan")
    items = c.rank(sid, k=3).items
    c.send_events(sid, [(LIKE, items[0].item_id)])
    c.close()
    proc.stop()
    proc2 = RankerProcess(cfg)
    try:
        c2 = ApplianceClient(f"unix:{proc2.servers.unix_socket}")
        c2.wait_ready(10)
        assert len(c2.rank(sid, k=3).items) == 3  # the open session is restored
        assert c2.explain("ivan").events_stored == 1
        c2.close()
    finally:
        proc2.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_list_profiles_and_explain_top_items(client):
    sid = client.start_session("jo")
    client.start_session("kim")
    client.set_consent("kim", True)
    items = client.rank(sid, k=3).items
    client.send_events(sid, [(LIKE, items[0].item_id)])
    from appliance.v1 import profile_pb2

    listed = {p.profile_id: p.camera_affect for p in client.profile.List(profile_pb2.ListProfilesRequest()).profiles}
    assert listed == {"jo": False, "kim": True}
    ex = client.profile.Explain(profile_pb2.ExplainRequest(profile_id="jo", top_k=4))
    assert len(ex.top_items) == 4 and all(it.reasons for it in ex.top_items)
    assert code_of(client.profile.Explain, profile_pb2.ExplainRequest(profile_id="jo", top_k=21)) == \
        grpc.StatusCode.INVALID_ARGUMENT
