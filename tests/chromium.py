"""Headless Chromium for the page tests (the feature browser, the probe app): the binary on PATH, if any, and a
driver speaking the DevTools protocol over a pipe (stdlib only)."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import time
from pathlib import Path


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


class Chromium:
    """Headless Chromium driven by the DevTools protocol over --remote-debugging-pipe (stdlib only:
    NUL-separated JSON on fds 3 and 4). The network is closed: a dead proxy and no name resolution, except
    127.0.0.1 with `loopback` (a local server's page; loopback also bypasses the proxy)."""

    def __init__(self, binary: str, profile: str, loopback: bool = False):
        to_chrome, from_chrome = os.pipe(), os.pipe()
        # The child's ends sit above 4 so that bash can move them onto 3 and 4 (no preexec_fn in a threaded process).
        read_end = fcntl.fcntl(to_chrome[0], fcntl.F_DUPFD, 10)
        write_end = fcntl.fcntl(from_chrome[1], fcntl.F_DUPFD, 10)
        for fd in (to_chrome[0], from_chrome[1]):
            os.close(fd)
        args = [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--remote-debugging-pipe",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--proxy-server=127.0.0.1:9",
            "--host-resolver-rules=MAP * ~NOTFOUND" + (", EXCLUDE 127.0.0.1" if loopback else ""),
            "--window-size=1280,1000",
            "about:blank",
        ]
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec 3<&{read_end} 4>&{write_end} {read_end}<&- {write_end}>&-; exec "$@"', "bash", *args],
            pass_fds=(read_end, write_end),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for fd in (read_end, write_end):
            os.close(fd)
        self.send_file = os.fdopen(to_chrome[1], "wb", buffering=0)
        self.recv_file = os.fdopen(from_chrome[0], "rb", buffering=0)
        self.buffer, self.last_id, self.events = b"", 0, []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable", self.session)
        self.call("Network.enable", self.session)

    def _message(self) -> dict:
        while b"\0" not in self.buffer:
            chunk = self.recv_file.read(1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self.send_file.write(json.dumps(message).encode() + b"\0")
        while True:
            reply = self._message()
            if reply.get("id") == self.last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def eval(self, expression: str):
        result = self.call("Runtime.evaluate", self.session, expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if value := self.eval(expression):
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {expression}")

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", self.session, format="png")["data"]))
        return path

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except RuntimeError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
