"""A real headless Chromium driven over the DevTools protocol, for tests of the HTML the product writes.

Uses the system's browser (Debian's ``chromium``; ``CHROMIUM`` names another binary) and the websocket-client
package, so nothing is downloaded at test time. ``Browser.open`` loads a page and reports what a user would
see go wrong: console errors, uncaught exceptions and the browser's own error log (blocked or missing
resources, Content-Security-Policy violations).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import websocket

STARTUP_SECONDS = 30
COMMAND_SECONDS = 30


def find_chromium() -> str | None:
    """The browser binary: $CHROMIUM, else the first of the usual names on PATH."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclasses.dataclass
class PageReport:
    errors: list[str]  # console errors, uncaught exceptions, error entries of the browser's log
    images: int  # <img> elements in the document
    loaded_images: int  # of those, decoded with a non-zero natural width
    screenshot: Path


class Browser:
    """One headless Chromium process with one page, talking CDP over a websocket."""

    def __init__(self, binary: str, profile: Path):
        args = [
            binary, "--headless", "--remote-debugging-port=0", f"--user-data-dir={profile}",
            "--no-first-run", "--no-default-browser-check", "--disable-gpu", "--disable-extensions",
            "--hide-scrollbars", "--window-size=1280,1024", "about:blank",
        ]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to start its sandbox as root (CI containers)
        self.profile = profile
        # A file, not a pipe: nobody reads Chromium's chatter while it runs, and a full pipe would block it.
        self.log = profile / "chromium.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.ws = websocket.create_connection(self._page_websocket(), timeout=COMMAND_SECONDS,
                                                  suppress_origin=True)
        except BaseException:
            self.close()
            raise
        self._next_id = 0
        self._events: list[dict[str, Any]] = []

    def _page_websocket(self) -> str:
        # With port 0 Chromium picks a free port and writes it to DevToolsActivePort in the profile.
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + STARTUP_SECONDS
        while not port_file.is_file() or not port_file.read_text().strip():
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"chromium did not open its DevTools port in {STARTUP_SECONDS} s")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=COMMAND_SECONDS) as response:
            targets = json.load(response)
        return next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Run one CDP command and return its result; events arriving meanwhile are kept for ``open``."""
        self._next_id += 1
        self.ws.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self._events.append(message)

    def _wait_for(self, event: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(e["method"] == event for e in self._events):
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            message = json.loads(self.ws.recv())  # raises WebSocketTimeoutException past the deadline
            if "method" in message:
                self._events.append(message)
        self.ws.settimeout(COMMAND_SECONDS)

    def open(self, path: Path, screenshot: Path) -> PageReport:
        """Load ``path`` from file://, then count its images and take a full-page screenshot."""
        self._events.clear()
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        self.send("Page.navigate", url=path.resolve().as_uri())
        self._wait_for("Page.loadEventFired", COMMAND_SECONDS)
        counts = self.send(
            "Runtime.evaluate", returnByValue=True,
            expression="[document.images.length,"
                       " Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length]",
        )["result"]["value"]
        shot = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        self.send("Runtime.evaluate", expression="0")  # collects events that arrived after the screenshot
        return PageReport(errors=self._errors(), images=counts[0], loaded_images=counts[1], screenshot=screenshot)

    def _errors(self) -> list[str]:
        out = []
        for e in self._events:
            params = e.get("params", {})
            if e["method"] == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif e["method"] == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                out.append("exception: " + details.get("exception", {}).get("description", details.get("text", "")))
            elif e["method"] == "Log.entryAdded" and params["entry"]["level"] == "error":
                out.append(f"log ({params['entry']['source']}): {params['entry']['text']}")
        return out

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            ws.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)  # its own session: the renderer and GPU processes go with it
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
