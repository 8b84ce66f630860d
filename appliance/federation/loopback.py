"""A real Flower deployment on loopback: one SuperLink, a few SuperNodes, `flwr run` (no Ray).

Used by the deployment tests (a round over the real transport; later the dropout and wire tests). Each
SuperNode costs two Python processes (~130 MB each) plus one ClientApp process (~90 MB) per message,
so keep it to a handful of nodes on a small machine. Everything runs with `--insecure` on 127.0.0.1
only, Flower's own state lives under the work directory (FLWR_HOME), and every process started here
is stopped by its own id (Flower's SuperExec children watch their parent's pid and exit with it).
With `tap=True` each SuperNode reaches the SuperLink through its own recording relay
(`wiretap.TcpTap`), so a test can read every byte each box sent (the wire test).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

APP_PYPROJECT = """\
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "appliance-fleet-head"
version = "1.0.0"
description = "Federated fine-tuning of the appliance's ranking head (SecAgg+, central DP)"
dependencies = []

[tool.flwr.app]
publisher = "appliance"

[tool.flwr.app.components]
serverapp = "{serverapp}"
clientapp = "{clientapp}"

[tool.flwr.app.config]
{config}
"""


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def write_app_project(path: Path, run_config: dict[str, Any],
                      serverapp: str = "appliance.federation.flower_app:server_app",
                      clientapp: str = "appliance.federation.flower_app:client_app") -> Path:
    """A Flower app directory (what `flwr run` packs into a FAB) whose components are our apps;
    `run_config` gives every run-config key its default. Python files put in the directory travel in
    the FAB and are importable by the ServerApp/ClientApp processes."""
    path.mkdir(parents=True, exist_ok=True)
    lines = "\n".join(f"{k} = {_toml_value(v)}" for k, v in sorted(run_config.items()))
    (path / "pyproject.toml").write_text(APP_PYPROJECT.format(config=lines, serverapp=serverapp,
                                                              clientapp=clientapp))
    return path


def _dicts(obj: Any):
    if isinstance(obj, dict):
        yield obj
        for v in obj.values():
            yield from _dicts(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _dicts(v)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


class LoopbackFederation:
    """`with LoopbackFederation(workdir, node_configs) as fed: fed.run(app_dir, overrides)`."""

    def __init__(self, workdir: Path, node_configs: Iterable[dict[str, Any]], start_timeout: float = 60.0,
                 tap: bool = False) -> None:
        self.workdir = Path(workdir)
        self.tap = tap
        self.taps: list = []  # one wiretap.TcpTap per SuperNode when tap
        self.node_configs = list(node_configs)
        self.start_timeout = start_timeout
        self.procs: list[subprocess.Popen] = []
        self.port = free_port()
        self.home = self.workdir / "flwr-home"
        self.env = dict(os.environ)
        self.env["FLWR_HOME"] = str(self.home)
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        self.env.setdefault("PYTHONUNBUFFERED", "1")

    # -- lifecycle
    def __enter__(self) -> LoopbackFederation:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen:
        log = open(self.workdir / log_name, "wb")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir)
        log.close()
        self.procs.append(p)
        return p

    def log(self, name: str) -> str:
        f = self.workdir / name
        return f.read_text(errors="replace") if f.exists() else ""

    def _wait(self, what: str, ok, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if ok():
                return
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a Flower process exited ({p.args[0]}, rc {p.returncode}) while "
                                       f"waiting for {what}:\n{self.log('superlink.log')[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"{what} not ready after {timeout}s:\n{self.log('superlink.log')[-3000:]}")

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{self.port}"\n'
            "insecure = true\n")
        self._spawn([_bin("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                     "--host", "127.0.0.1", "--port", str(self.port)], "superlink.log")
        self._wait("SuperLink", lambda: "Uvicorn running" in self.log("superlink.log"), self.start_timeout)
        for i, cfg in enumerate(self.node_configs):
            node_cfg = " ".join(f"{k}={_toml_value(v)}" for k, v in cfg.items())
            link = self.port
            if self.tap:
                from appliance.federation.wiretap import TcpTap

                self.taps.append(TcpTap(("127.0.0.1", self.port)))
                link = self.taps[-1].port
            self._spawn([_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}",
                         "--host", "127.0.0.1", "--port", str(free_port()), "--max-retries", "10",
                         "--node-config", node_cfg], f"supernode-{i}.log")
        n = len(self.node_configs)
        self._wait(f"{n} SuperNodes", lambda: self.log("superlink.log").count("Activated node_id") >= n,
                   self.start_timeout)

    def stop(self) -> None:
        """SIGTERM to what we started and to their descendants (SuperExec, ServerApp and ClientApp
        processes), each by pid; SIGKILL to whatever is still there after a grace period."""
        import psutil

        tree: list[psutil.Process] = []
        for p in reversed(self.procs):  # SuperNodes first, the SuperLink last
            try:
                proc = psutil.Process(p.pid)
                tree += proc.children(recursive=True) + [proc]
            except psutil.NoSuchProcess:
                pass
        for proc in tree:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(tree, timeout=10)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        for p in self.procs:
            if p.poll() is None:
                p.wait(timeout=5)
        self.procs.clear()
        for t in self.taps:  # the recordings stay readable
            t.close()

    # -- runs
    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run([_bin("flwr"), *args], env=self.env, cwd=self.workdir, capture_output=True,
                              text=True, timeout=timeout)

    def run(self, app_dir: Path, overrides: dict[str, Any] | None = None, timeout: float = 120.0) -> int:
        """Submit the app; returns the run id once the SuperLink reports the run finished."""
        args = ["run", str(app_dir), "loopback", "--format", "json"]
        for k, v in (overrides or {}).items():
            args += ["--run-config", f"{k}={_toml_value(v)}"]
        res = self.flwr(*args)
        if res.returncode != 0:
            raise RuntimeError(f"flwr run failed ({res.returncode}): {res.stdout}\n{res.stderr}")
        m = re.search(r'"run-id"\s*:\s*"?(\d+)', res.stdout) or re.search(r"run (\d+)", res.stdout)
        if not m:
            raise RuntimeError(f"no run id in: {res.stdout}")
        run_id = int(m.group(1))
        end = time.monotonic() + timeout
        status = ""
        while time.monotonic() < end:
            status = self.status(run_id)
            if status.startswith("finished"):
                return run_id
            time.sleep(1.0)
        raise TimeoutError(f"run {run_id} still {status!r} after {timeout}s:\n{self.run_log(run_id)[-3000:]}")

    def status(self, run_id: int) -> str:
        """'pending', 'starting', 'running', 'finished:completed', 'finished:failed', ..."""
        ls = self.flwr("ls", "loopback", "--run-id", str(run_id), "--format", "json")
        try:
            runs = [r for r in _dicts(json.loads(ls.stdout)) if str(r.get("run-id")) == str(run_id)]
        except ValueError:
            return ""
        if not runs:
            return ""
        run = runs[0]
        details = run.get("status-details", "")
        return run["status"] + (f":{details}" if run["status"] == "finished" else "")

    def run_log(self, run_id: int) -> str:
        """The ServerApp's log of a run (as `flwr log --show` prints it)."""
        return self.flwr("log", str(run_id), "loopback", "--show").stdout
