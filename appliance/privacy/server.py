"""HTTP server of the privacy page. It holds no state of its own: every answer comes from the
appliance over gRPC, so the page shows exactly what the box does (the camera indicator is the vision
process's real capture state) and a toggle here is the same call a player would make.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import grpc
from google.protobuf.json_format import MessageToDict

from appliance.client import ApplianceClient
from appliance.config.schema import PrivacyPageConfig
from appliance.errors import ConfigError
from appliance.v1 import profile_pb2

log = logging.getLogger("appliance.privacy")
STATIC = Path(__file__).resolve().parent / "static"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8"}
PROFILE_PATH = re.compile(r"^/api/profiles/([A-Za-z0-9_-]{1,64})(/consent|/forget)?$")
GRPC_TO_HTTP = {grpc.StatusCode.NOT_FOUND: HTTPStatus.NOT_FOUND,
                grpc.StatusCode.INVALID_ARGUMENT: HTTPStatus.BAD_REQUEST,
                grpc.StatusCode.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE}


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class PrivacyPage:
    """Serve the page on cfg.host:cfg.port, talking to the appliance at `target` (unix:... socket)."""

    def __init__(self, cfg: PrivacyPageConfig, target: str) -> None:
        self.cfg = cfg
        self.token = os.environ.get(cfg.pairing_token_env, "")
        if not _is_loopback(cfg.host) and len(self.token) < 16:
            raise ConfigError(f"privacy.host {cfg.host} is not loopback: set ${cfg.pairing_token_env} "
                              "(>= 16 characters) to pair devices on the LAN")
        self.client = ApplianceClient(target)
        page = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "appliance-privacy"

            def log_message(self, fmt: str, *args: object) -> None:  # no paths or profile ids in logs
                pass

            def do_GET(self) -> None:
                page._handle(self, "GET")

            def do_POST(self) -> None:
                page._handle(self, "POST")

        self.httpd = ThreadingHTTPServer((cfg.host, cfg.port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="privacy-page", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}/"

    def start(self) -> PrivacyPage:
        self._thread.start()
        log.info("privacy page on %s", self.url)
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.client.close()

    # -- request handling -------------------------------------------------------------------------
    def _authorised(self, req: BaseHTTPRequestHandler) -> bool:
        if not self.token:
            return True  # loopback only (checked at start)
        got = req.headers.get("X-Pairing-Token") or parse_qs(urlparse(req.path).query).get("token", [""])[0]
        return hmac.compare_digest(got.encode(), self.token.encode())

    def _handle(self, req: BaseHTTPRequestHandler, method: str) -> None:
        path = urlparse(req.path).path
        try:
            if not self._authorised(req):
                return self._send(req, HTTPStatus.UNAUTHORIZED, {"error": "pairing token required"})
            if method == "GET" and not path.startswith("/api/"):
                return self._static(req, path)
            if method == "GET" and path == "/api/status":
                st = self.client.get_status()
                return self._send(req, HTTPStatus.OK, {"camera_open": st.camera_open, "vision_alive": st.vision_alive,
                                                       "faces": st.faces, "mood": st.mood})
            if method == "GET" and path == "/api/profiles":
                resp = self.client.profile.List(profile_pb2.ListProfilesRequest(), timeout=5)
                return self._send(req, HTTPStatus.OK, MessageToDict(resp, always_print_fields_with_no_presence=True))
            m = PROFILE_PATH.match(path)
            if m is None:
                return self._send(req, HTTPStatus.NOT_FOUND, {"error": "no such page"})
            profile_id, action = m.group(1), m.group(2)
            if method == "GET" and action is None:
                ex = self.client.profile.Explain(profile_pb2.ExplainRequest(profile_id=profile_id, top_k=5),
                                                 timeout=5)
                return self._send(req, HTTPStatus.OK, MessageToDict(ex, always_print_fields_with_no_presence=True))
            if method == "POST" and action == "/consent":
                body = self._json_body(req)
                if not isinstance(body.get("camera_affect"), bool):
                    return self._send(req, HTTPStatus.BAD_REQUEST, {"error": "camera_affect must be true or false"})
                st = self.client.set_consent(profile_id, body["camera_affect"])
                return self._send(req, HTTPStatus.OK, {"profile_id": profile_id, "camera_affect": st.camera_affect})
            if method == "POST" and action == "/forget":
                out = self.client.forget(profile_id)
                return self._send(req, HTTPStatus.OK, MessageToDict(out, always_print_fields_with_no_presence=True))
            return self._send(req, HTTPStatus.METHOD_NOT_ALLOWED, {"error": "method not allowed"})
        except grpc.RpcError as exc:
            code = GRPC_TO_HTTP.get(exc.code(), HTTPStatus.BAD_GATEWAY)
            return self._send(req, code, {"error": exc.details() or exc.code().name})
        except ValueError:
            return self._send(req, HTTPStatus.BAD_REQUEST, {"error": "body must be JSON"})

    @staticmethod
    def _json_body(req: BaseHTTPRequestHandler) -> dict:
        length = int(req.headers.get("Content-Length") or 0)
        if length > 4096:
            raise ValueError("body too large")
        data = json.loads(req.rfile.read(length) or b"{}")
        if not isinstance(data, dict):
            raise ValueError("not an object")
        return data

    @staticmethod
    def _static(req: BaseHTTPRequestHandler, path: str) -> None:
        name = "index.html" if path in ("/", "") else path.lstrip("/")
        file = (STATIC / name).resolve()
        if file.parent != STATIC or not file.is_file() or file.suffix not in CONTENT_TYPES:
            return PrivacyPage._send(req, HTTPStatus.NOT_FOUND, {"error": "no such page"})
        body = file.read_bytes()
        req.send_response(HTTPStatus.OK)
        req.send_header("Content-Type", CONTENT_TYPES[file.suffix])
        req.send_header("Content-Length", str(len(body)))
        req.send_header("Cache-Control", "no-store")
        req.send_header("Content-Security-Policy", "default-src 'self'")
        req.end_headers()
        req.wfile.write(body)

    @staticmethod
    def _send(req: BaseHTTPRequestHandler, status: HTTPStatus, payload: dict) -> None:
        body = json.dumps(payload).encode()
        req.send_response(status)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(body)))
        req.send_header("Cache-Control", "no-store")
        req.end_headers()
        req.wfile.write(body)
