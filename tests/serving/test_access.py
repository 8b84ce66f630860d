"""Who may connect to the Unix socket: its owner and the members of `serving.socket_group`, nobody else.

grpcio does not tell a server who is on the other end of a Unix socket (no SO_PEERCRED: `context.peer()`
is "unix:", the auth context only says "insecure"), so the kernel's permission check at connect() is the
access check; these tests connect as other users to show it holds.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from appliance.serving.process import RankerProcess

SYSTEM_PYTHON = "/usr/bin/python3"
CONNECT = ("import socket, sys\n"
           "s = socket.socket(socket.AF_UNIX)\n"
           "try:\n    s.connect(sys.argv[1]); print('connected')\n"
           "except PermissionError: print('refused')\n")


def _connect_as(sock: str, uid: int, gid: int, groups: list[int]) -> str:
    def demote() -> None:
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)

    r = subprocess.run([SYSTEM_PYTHON, "-c", CONNECT, sock], preexec_fn=demote, capture_output=True, text=True,
                       timeout=30, cwd="/")
    return r.stdout.strip() or r.stderr.strip()


@pytest.mark.skipif(os.geteuid() != 0 or not Path(SYSTEM_PYTHON).exists(), reason="needs root to act as other users")
def test_only_the_socket_group_may_connect(cfg):
    import grp

    gid = grp.getgrnam("nogroup").gr_gid if "nogroup" in {g.gr_name for g in grp.getgrall()} else 65534
    proc = RankerProcess(cfg.with_overrides(serving={"socket_group": str(gid)}))
    try:
        sock = proc.servers.unix_socket
        st = os.stat(sock)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == gid
        d = os.stat(os.path.dirname(sock))
        assert d.st_gid == gid and d.st_mode & stat.S_IXGRP and not d.st_mode & stat.S_IWGRP
        stranger = 54321
        assert _connect_as(sock, stranger, stranger, []) == "refused"
        assert _connect_as(sock, stranger, gid, []) == "connected"          # primary group
        assert _connect_as(sock, stranger, stranger, [gid]) == "connected"  # supplementary group
    finally:
        proc.stop()


@pytest.mark.skipif(os.geteuid() != 0 or not Path(SYSTEM_PYTHON).exists(), reason="needs root to act as other users")
def test_without_a_group_only_the_owner_may_connect(ranker):
    sock = ranker.servers.unix_socket
    st = os.stat(sock)
    assert stat.S_IMODE(st.st_mode) == 0o660
    other_gid = 54322 if st.st_gid != 54322 else 54323
    assert _connect_as(sock, 54321, other_gid, []) == "refused"


def test_unknown_socket_group_is_a_config_error(cfg):
    from appliance.errors import ConfigError

    with pytest.raises(ConfigError, match="socket_group"):
        RankerProcess(cfg.with_overrides(serving={"socket_group": "no-such-group-here"}))


def test_ping_is_the_empty_round_trip(client):
    client.ping()
    from appliance.v1 import status_pb2

    assert client.status.Ping(status_pb2.PingRequest(), timeout=5) == status_pb2.PingResponse()
