"""GStreamer capture as a `gst-launch-1.0 ... ! fdsink fd=1` child process read as raw BGR frames.

Why a child: the PyPI OpenCV wheels have no GStreamer, PyGObject needs system headers, but the
gst-launch-1.0 binary exists on Debian and on JetPack alike. A crash in a camera driver or plugin then
kills only the child, and close() can always end it (its own process group, TERM then KILL).
Where OpenCV itself has GStreamer (JetPack), `opencv_gstreamer_source` offers the in-process route.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import shlex
import shutil
import signal
import subprocess
import threading
import time
from fractions import Fraction

import cv2
import numpy as np

from appliance.capture.base import ThreadedSource
from appliance.capture.frame import redact
from appliance.capture.opencv_source import OpenCVSource
from appliance.errors import CaptureError

log = logging.getLogger(__name__)

GST_LAUNCH = "gst-launch-1.0"
DEBIAN_PACKAGES = "gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good"
#: extra decoders for H.264/H.265 files and RTSP cameras on Debian (JetPack has nvv4l2decoder)
DEBIAN_DECODERS = "gstreamer1.0-libav gstreamer1.0-plugins-bad"


def gst_fraction(fps: float) -> str:
    """15.0 -> '15/1', 29.97 -> '30000/1001': GStreamer caps take exact fractions."""
    f = Fraction(fps).limit_denominator(1001)
    return f"{f.numerator}/{f.denominator}"


def find_gst_launch(executable: str = GST_LAUNCH) -> str:
    """Path of gst-launch-1.0, or CaptureError telling the fleet team what to install."""
    path = shutil.which(executable)
    if path is None:
        raise CaptureError(
            f"GStreamer capture needs '{executable}', which is not installed. On Debian/Ubuntu: "
            f"apt-get install {DEBIAN_PACKAGES} (and {DEBIAN_DECODERS} for H.264/RTSP); "
            "on Jetson it comes with JetPack (nvidia-l4t-gstreamer).")
    return path


def opencv_has_gstreamer() -> bool:
    """True when this cv2 was built with GStreamer (JetPack's OpenCV; not the PyPI wheels)."""
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line.split(":", 1)[1]
    return False


def output_caps(width: int, height: int) -> str:
    """The tail every description gets: whatever the camera sends becomes BGR at the configured size."""
    return f"videoconvert ! videoscale ! video/x-raw,format=BGR,width={width},height={height}"


def _summarise_stderr(text: str) -> str:
    """The lines of gst-launch's stderr that say what went wrong, without repetition."""
    keep: list[str] = []
    for line in text.splitlines():
        s = line.strip()
        if not s or s in keep:
            continue
        if s.startswith(("ERROR", "WARNING", "No such", "Could not", "Failed", "Internal data")) or not keep:
            keep.append(s)
    out = " | ".join(keep) or "no message on stderr"
    return redact(out[:600])


class GStreamerSource(ThreadedSource):
    """Runs `gst-launch-1.0 -q DESCRIPTION ! <tail> ! fdsink fd=1` and reads W*H*3-byte frames."""

    #: open() waits this long for the first frame (or the child's early exit) before returning
    open_wait_s: float = 3.0
    #: close(): grace between SIGTERM and SIGKILL to the child's process group
    term_grace_s: float = 0.04

    def __init__(self, description: str, width: int, height: int, fps: float,
                 gst_launch: str = GST_LAUNCH, name: str | None = None) -> None:
        super().__init__(name or f"gstreamer:{description.split('!', 1)[0].strip()}", width, height)
        self.description = description.strip()
        self.fps = float(fps)
        self.gst_launch = gst_launch
        self.frame_bytes = self.width * self.height * 3
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=40)
        self._stderr_thread: threading.Thread | None = None
        self._buf = bytearray(self.frame_bytes)
        self._got = 0

    @property
    def pid(self) -> int | None:
        """The child's pid (also its process group id) while it runs."""
        return self._proc.pid if self._proc is not None else None

    def command(self, executable: str | None = None) -> list[str]:
        """argv of the child; gst-launch re-escapes each argument, so shell-style quoting is kept."""
        tail = f"{output_caps(self.width, self.height)} ! fdsink fd=1 sync=false"
        try:
            tokens = shlex.split(f"{self.description} ! {tail}")
        except ValueError as exc:
            raise CaptureError(f"{self.name}: cannot parse pipeline description: {exc}") from None
        return [executable or self.gst_launch, "-q", *tokens]

    # -- life cycle ---------------------------------------------------------------------------------
    def _start(self) -> None:
        exe = find_gst_launch(self.gst_launch)
        self._stderr.clear()
        self._buf, self._got = bytearray(self.frame_bytes), 0
        try:
            self._proc = subprocess.Popen(
                self.command(exe), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                bufsize=0, start_new_session=True)  # own process group: close() kills plugins' helpers too
        except OSError as exc:
            raise CaptureError(f"{self.name}: cannot start {exe}: {exc}") from None
        self._stderr_thread = threading.Thread(target=self._drain_stderr, args=(self._proc,),
                                               name=f"capture-stderr:{self.name}", daemon=True)
        self._stderr_thread.start()
        try:
            self._wait_first_output()
        except CaptureError:
            self._release()  # no pipe may leak across a restart loop
            raise

    def _wait_first_output(self) -> None:
        """Read the first frame inside open(), so a pipeline that does not parse, link or play fails
        open() with GStreamer's own words; a camera still warming up after open_wait_s is no error."""
        got = self._fill(deadline=time.monotonic() + self.open_wait_s)
        if self._stop.is_set():
            self._kill_child()
            raise CaptureError(f"{self.name}: closed while opening")
        if got is None:
            code = self._exit_code()
            msg = self._end_reason()
            self._kill_child()
            if code == 0:
                raise CaptureError(f"{self.name}: the pipeline ended before its first frame ({msg})")
            raise CaptureError(f"{self.name}: {msg}")
        if got:
            self._slot.put(self._take_frame(), time.monotonic_ns())

    def _drain_stderr(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for raw in iter(proc.stderr.readline, b""):
            self._stderr.append(raw.decode("utf-8", "replace").rstrip())

    def _stderr_join(self) -> None:
        if self._stderr_thread is not None:
            self._stderr_thread.join(0.2)

    def _fill(self, deadline: float | None) -> bool | None:
        """Read into the frame buffer: True = a whole frame, False = deadline passed, None = EOF."""
        proc = self._proc
        if proc is None or proc.stdout is None:
            return None
        view = memoryview(self._buf)
        fd = proc.stdout.fileno()
        while self._got < self.frame_bytes:
            if deadline is not None:
                if self._stop.is_set():
                    return None  # close() during open()
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                ready, _, _ = select.select([fd], [], [], min(left, 0.05))
                if not ready:
                    continue
            n = proc.stdout.readinto(view[self._got:])
            if not n:
                return None  # EOF: the child ended (or close() killed it)
            self._got += n
        return True

    def _take_frame(self) -> np.ndarray:
        """Hand out the filled buffer as an image and start a fresh one (frames are never reused)."""
        image = np.frombuffer(self._buf, dtype=np.uint8).reshape(self.height, self.width, 3)
        self._buf = bytearray(self.frame_bytes)
        self._got = 0
        return image

    def _next_image(self) -> np.ndarray | None:
        return self._take_frame() if self._fill(deadline=None) else None

    def _exit_code(self) -> int | None:
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return None

    def _end_reason(self) -> str:
        code = self._exit_code()
        self._stderr_join()
        msg = _summarise_stderr("\n".join(self._stderr))
        if code == 0 and not self._stderr:
            return "end of stream (gst-launch-1.0 exited with code 0)"
        return f"gst-launch-1.0 exited with code {code}: {msg}"

    def _interrupt(self) -> None:
        self._kill_child()

    def _kill_child(self) -> None:
        """TERM the whole process group, KILL it after term_grace_s, and reap the child."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=self.term_grace_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=1.0)

    def _release(self) -> None:
        self._kill_child()
        proc = self._proc
        if proc is not None:
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass


def opencv_gstreamer_source(description: str, width: int, height: int, fps: float,
                            name: str | None = None) -> OpenCVSource:
    """The in-process alternative where cv2 has GStreamer: appsink keeps only the newest buffer."""
    if not opencv_has_gstreamer():
        raise CaptureError("this OpenCV build has no GStreamer support (cv2.getBuildInformation()); "
                           "use the gst-launch-1.0 child route instead")
    desc = (f"{description.strip()} ! {output_caps(width, height)} "
            "! appsink max-buffers=1 drop=true sync=false")
    return OpenCVSource(desc, width, height, fps, loop=False, api_preference=cv2.CAP_GSTREAMER,
                        name=name or f"gstreamer-cv:{description.split('!', 1)[0].strip()}")
