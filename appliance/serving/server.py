"""Build the gRPC servers: Unix socket (default, 0660) and, only when configured, TCP with a token."""

from __future__ import annotations

import os
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from appliance.config import ApplianceConfig
from appliance.errors import ConfigError
from appliance.serving.auth import TokenAuthInterceptor
from appliance.serving.core import ApplianceCore
from appliance.serving.services import (
    ConsentService,
    EventsService,
    ProfileService,
    RankerService,
    SessionsService,
    StatusService,
)
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

SERVICE_NAMES = [
    ranker_pb2.DESCRIPTOR.services_by_name["Ranker"].full_name,
    events_pb2.DESCRIPTOR.services_by_name["Events"].full_name,
    sessions_pb2.DESCRIPTOR.services_by_name["Sessions"].full_name,
    consent_pb2.DESCRIPTOR.services_by_name["Consent"].full_name,
    profile_pb2.DESCRIPTOR.services_by_name["Profile"].full_name,
    status_pb2.DESCRIPTOR.services_by_name["Status"].full_name,
]


@dataclass
class Servers:
    servers: list[grpc.Server]
    health: health.HealthServicer
    unix_socket: str
    tcp_port: int | None

    def stop(self, grace: float = 1.0) -> None:
        events = [s.stop(grace) for s in self.servers]
        for e in events:
            e.wait(grace + 1)


def _options(cfg: ApplianceConfig) -> list[tuple[str, int]]:
    size = cfg.serving.max_message_bytes
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.so_reuseport", 0),
    ]


def build_servers(cfg: ApplianceConfig, core: ApplianceCore, on_consent_change=None) -> Servers:
    """Create, bind and start the servers; health starts SERVING."""
    health_servicer = health.HealthServicer(experimental_non_blocking=True,
                                            experimental_thread_pool=futures.ThreadPoolExecutor(1))
    token = None
    if cfg.serving.tcp_port is not None:
        token = os.environ.get(cfg.serving.token_env, "")
        if not token:
            raise ConfigError(f"serving.tcp_port is set but ${cfg.serving.token_env} is empty: "
                              "TCP is only served with a token")

    def make(interceptors: list[grpc.ServerInterceptor]) -> grpc.Server:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.serving.workers,
                                                        thread_name_prefix="rpc"),
                             interceptors=interceptors, options=_options(cfg),
                             maximum_concurrent_rpcs=cfg.serving.workers * 16)
        ranker_pb2_grpc.add_RankerServicer_to_server(RankerService(core), server)
        events_pb2_grpc.add_EventsServicer_to_server(EventsService(core), server)
        sessions_pb2_grpc.add_SessionsServicer_to_server(SessionsService(core), server)
        consent_pb2_grpc.add_ConsentServicer_to_server(ConsentService(core, on_consent_change), server)
        profile_pb2_grpc.add_ProfileServicer_to_server(ProfileService(core, on_consent_change), server)
        status_pb2_grpc.add_StatusServicer_to_server(StatusService(core), server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(SERVICE_NAMES + [health.SERVICE_NAME, reflection.SERVICE_NAME],
                                            server)
        return server

    sock = cfg.path(cfg.serving.unix_socket)
    os.makedirs(os.path.dirname(sock), mode=0o700, exist_ok=True)
    if os.path.exists(sock):
        os.unlink(sock)  # left behind by a killed process
    old_umask = os.umask(0o117)  # socket created 0660, no window with wider permissions
    try:
        unix_server = make([])
        unix_server.add_insecure_port(f"unix:{sock}")
        unix_server.start()
    finally:
        os.umask(old_umask)
    os.chmod(sock, cfg.serving.socket_mode)
    servers = [unix_server]
    tcp_port = None
    if token is not None:
        tcp_server = make([TokenAuthInterceptor(token)])
        tcp_port = tcp_server.add_insecure_port(f"{cfg.serving.tcp_host}:{cfg.serving.tcp_port}")
        tcp_server.start()
        servers.append(tcp_server)
    for name in SERVICE_NAMES + [""]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return Servers(servers, health_servicer, sock, tcp_port)


class StoreHealthWatch(threading.Thread):
    """Flip gRPC health to NOT_SERVING while the store does not answer, back when it does."""

    def __init__(self, core: ApplianceCore, servers: Servers, period_s: float = 1.0) -> None:
        super().__init__(name="store-health", daemon=True)
        self.core, self.servers, self.period_s = core, servers, period_s
        self.stop_event = threading.Event()

    def run(self) -> None:
        last = True
        while not self.stop_event.wait(self.period_s):
            ok = self.core.store.ping()
            if ok != last:
                status = (health_pb2.HealthCheckResponse.SERVING if ok
                          else health_pb2.HealthCheckResponse.NOT_SERVING)
                for name in SERVICE_NAMES + [""]:
                    self.servers.health.set(name, status)
                last = ok
