"""Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe:
JSON messages ended by NUL on fds 3 and 4), so tests need no websocket library."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

INSTALLER = Path(__file__).resolve().parent.parent / "scripts" / "install-chromium.sh"


def find_chromium() -> str:
    """$CHROMIUM, chromium on the PATH, or Debian's package installed by
    scripts/install-chromium.sh (as root, from Debian's registry)."""
    found = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if found:
        return found
    done = subprocess.run(["sh", str(INSTALLER)], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"no chromium and {INSTALLER.name} failed:\n{done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


class Browser:
    """One headless Chromium with one page (`open`, `evaluate`, `wait_for`, `screenshot`)."""

    def __init__(self, width: int = 1280, height: int = 1000):
        self.profile = tempfile.mkdtemp(prefix="tinkerd-chromium-")
        # Chromium reads commands on fd 3 and writes replies on fd 4; bash puts our
        # pipes there (moved above fd 10 first, so the two redirections cannot collide).
        read_end, self._to_chrome = os.pipe()
        self._from_chrome, write_end = os.pipe()
        theirs = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (read_end, write_end)]
        for fd in (read_end, write_end):
            os.close(fd)
        self.proc = subprocess.Popen(
            [
                "bash",  # dash takes single-digit fds only
                "-c",
                f'exec "$@" 3<&{theirs[0]} 4>&{theirs[1]} {theirs[0]}<&- {theirs[1]}>&-',
                "bash",
                find_chromium(),
                "--headless",
                "--no-sandbox",  # tests run as root in containers
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                "--remote-debugging-pipe",
                f"--user-data-dir={self.profile}",
                "about:blank",
            ],
            pass_fds=theirs,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for fd in theirs:
            os.close(fd)
        self._buffer = b""
        self._id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        self.call(
            "Emulation.setDeviceMetricsOverride",
            session=True,
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def call(self, method: str, session: bool = False, **params) -> dict:
        """Send one command and return its result (events in between are dropped)."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def _read(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed its DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, url: str) -> None:
        self.call("Page.navigate", session=True, url=url)

    def evaluate(self, expression: str):
        result = self.call(
            "Runtime.evaluate", session=True, expression=expression, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, expected, timeout: float = 30.0):
        """Evaluate `expression` until it equals `expected` (errors count as not yet)."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except RuntimeError as e:  # e.g. the page is still loading
                value = e
            if value == expected:
                return value
            time.sleep(0.2)
        raise AssertionError(f"{expression} is {value!r} after {timeout} s, not {expected!r}")

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, OSError):  # it may be gone already
            self.call("Browser.close")
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)
        shutil.rmtree(self.profile, ignore_errors=True)
