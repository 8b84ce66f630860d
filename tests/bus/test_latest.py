"""ZeroMQ latest-value bus over ipc://: a slow subscriber sees the newest message, never a backlog."""

from __future__ import annotations

import time

from appliance.bus import LatestPublisher, LatestSubscriber


def test_slow_subscriber_gets_only_the_newest(run_dir):
    ep = f"ipc://{run_dir}/t.ipc"
    pub = LatestPublisher(ep, bind=True)
    sub = LatestSubscriber(ep)
    time.sleep(0.2)  # slow-joiner: let the subscription reach the publisher
    for i in range(500):
        pub.publish(str(i).encode())
    time.sleep(0.2)
    got = sub.recv(timeout_ms=500)
    assert got is not None and int(got) >= 400, got  # conflated: newest (or near it), not message 0
    assert sub.recv(timeout_ms=50) is None  # nothing queued behind it
    pub.close()
    sub.close()


def test_publisher_never_blocks_without_subscriber(run_dir):
    pub = LatestPublisher(f"ipc://{run_dir}/nobody.ipc", bind=True)
    t0 = time.perf_counter()
    for _ in range(10_000):
        pub.publish(b"x" * 100)
    assert time.perf_counter() - t0 < 2.0
    pub.close()


def test_stale_socket_file_is_replaced(run_dir):
    path = run_dir / "stale.ipc"
    path.write_bytes(b"")
    pub = LatestPublisher(f"ipc://{path}", bind=True)
    sub = LatestSubscriber(f"ipc://{path}")
    time.sleep(0.2)
    pub.publish(b"hello")
    assert sub.recv(timeout_ms=1000) == b"hello"
    pub.close()
    sub.close()
