"""TCP with mutual TLS: only a client whose certificate our CA signed gets in; a token is not needed then."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.client import ApplianceClient
from appliance.config.schema import validate_config
from appliance.errors import ConfigError
from appliance.serving.process import RankerProcess


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key, issuer_name: str, issuer_key, ca: bool = False, server: bool = False) -> x509.Certificate:  # noqa: ANN001
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                         x509.DNSName("localhost")]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _pki(tmp_path):
    """A box CA that signs the server and the player's client certificate, and a stranger's CA."""
    ca_key, rogue_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert("box CA", ca_key, "box CA", ca_key, ca=True)
    rogue_ca = _cert("rogue CA", rogue_key, "rogue CA", rogue_key, ca=True)
    srv_key, cli_key, bad_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    srv = _cert("appliance", srv_key, "box CA", ca_key, server=True)
    cli = _cert("player", cli_key, "box CA", ca_key)
    bad = _cert("player", bad_key, "rogue CA", rogue_key)
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    files = {"ca.pem": pem(ca), "server.pem": pem(srv), "server.key": _pem_key(srv_key)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    good = (pem(ca), pem(cli), _pem_key(cli_key))
    stranger = (pem(ca), pem(bad) + pem(rogue_ca), _pem_key(bad_key))
    return good, stranger


def test_tcp_with_mutual_tls_admits_only_our_clients(cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("APPLIANCE_TOKEN", raising=False)
    good, stranger = _pki(tmp_path)
    proc = RankerProcess(cfg.with_overrides(serving={
        "tcp_port": _free_port(), "tls_cert": str(tmp_path / "server.pem"), "tls_key": str(tmp_path / "server.key"),
        "tls_client_ca": str(tmp_path / "ca.pem")}))
    clients = []
    try:
        target = f"127.0.0.1:{proc.servers.tcp_port}"
        ok = ApplianceClient(target, tls=good)
        clients.append(ok)
        sid = ok.start_session("mtls")
        assert len(ok.rank(sid, k=3).items) == 3

        no_cert = ApplianceClient(target, tls=(good[0], None, None))  # TLS, but no client certificate
        rogue = ApplianceClient(target, tls=stranger)                  # a certificate we did not sign
        plain = ApplianceClient(target)                                # no TLS at all
        clients += [no_cert, rogue, plain]
        for c in (no_cert, rogue, plain):
            with pytest.raises(grpc.RpcError) as e:
                c.start_session("intruder")
            assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)
        assert proc.store.get_profile("intruder") is None
    finally:
        for c in clients:
            c.close()
        proc.stop()


def test_mtls_settings_go_together_and_must_be_readable(cfg, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="go together"):
        validate_config({"serving": {"tcp_port": 9000, "tls_cert": "/x.pem"}}, source="test")
    monkeypatch.delenv("APPLIANCE_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="tls_cert: cannot read"):
        RankerProcess(cfg.with_overrides(serving={"tcp_port": _free_port(), "tls_cert": str(tmp_path / "none.pem"),
                                                  "tls_key": str(tmp_path / "none.key"),
                                                  "tls_client_ca": str(tmp_path / "none-ca.pem")}))
