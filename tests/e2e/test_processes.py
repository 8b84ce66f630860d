"""The real processes: supervisor, ranker and vision joined by ZeroMQ, player over gRPC."""

from __future__ import annotations

import os
import signal
import time

from tests.e2e.conftest import gst_children, wait_for

GST_TEST_CAMERA = {"kind": "gstreamer", "pipeline": "test", "width": 320, "height": 240, "fps": 15}


def test_no_consent_means_the_camera_is_never_opened(make_appliance):
    sup, client = make_appliance(capture=GST_TEST_CAMERA)
    client.start_session("kid")  # consent is off by default
    wait_for(lambda: client.get_status().vision_alive, 60)
    t_end = time.monotonic() + 3.0
    while time.monotonic() < t_end:  # watched on the box: no capture child, vision says closed
        assert gst_children(sup.pid("vision")) == []
        st = client.get_status()
        assert not st.camera_open and st.frames == 0
        time.sleep(0.1)

    client.set_consent("kid", True)
    wait_for(lambda: gst_children(sup.pid("vision")), 10)
    wait_for(lambda: client.get_status().camera_open, 10)
    wait_for(lambda: client.get_status().frames > 5, 10)

    t0 = time.monotonic()
    client.set_consent("kid", False)
    wait_for(lambda: not gst_children(sup.pid("vision")), 2, period_s=0.01)
    closed_after = time.monotonic() - t0
    assert closed_after < 1.0, closed_after
    wait_for(lambda: not client.get_status().camera_open, 2)


def test_ranking_goes_on_when_vision_dies(make_appliance):
    sup, client = make_appliance()  # synthetic face camera
    sid = client.start_session("family")
    client.set_consent("family", True)
    fresh = wait_for(lambda: (r := client.rank(sid, k=5)).affect_used and r, 60, period_s=0.2)
    assert fresh.mood
    old_pid = sup.pid("vision")
    sup.hold("vision")  # keep it down while we watch ranking without it
    os.kill(old_pid, signal.SIGKILL)
    t_end = time.monotonic() + 3.0
    answers = []
    while time.monotonic() < t_end:
        r = client.rank(sid, k=5)  # raises on any non-OK status
        answers.append(r)
        time.sleep(0.1)
    late = [r for r in answers[-10:]]
    for r in late:  # affect went stale within the configured 1 s: behaviour-only ranking and reasons
        assert not r.affect_used
        assert all(reason.signal != "affect" for it in r.items for reason in it.reasons)
        assert all(it.reasons for it in r.items)
    sup.hold("vision", False)
    new_pid = wait_for(lambda: (p := sup.pid("vision")) and p != old_pid and p, 15)
    assert new_pid != old_pid
    wait_for(lambda: client.rank(sid, k=5).affect_used, 60, period_s=0.2)
