"""The labelling page: a stdlib HTTP server on 127.0.0.1 serving one rater.

Routes: ``GET /`` the page; ``GET /api/next`` the next example this rater has not voted on
(id, image URL, progress and, for an L0 candidate, a ``context`` line, see
:func:`candidate_context`; never an earlier vote nor the target label); ``GET /image/<id>.png``
the 28x28 image; ``POST /api/vote`` ``{"id", "vote"}`` records the vote (0..9 or "X") and
saves the store atomically before answering. Every vote re-reads the store under an exclusive
file lock, so several raters' servers can share one store file without losing votes.

Security: it binds 127.0.0.1 unless told otherwise (and then warns); every request must carry a
Host header naming this server (no DNS rebinding); a vote must be a same-origin POST
(`Origin`, when sent, equals this server; `Sec-Fetch-Site`, when sent, is not cross-site) with
`Content-Type: application/json` and a Content-Length between 1 and MAX_BODY bytes.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import re
import struct
import sys
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from robustlab.data.labels import Example, LabelStore, check_rater
from robustlab.errors import RobustlabError

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>robustlab labelling</title>
<style>
 body { font-family: sans-serif; margin: 2em; background: #fafafa; }
 #digit { width: 392px; height: 392px; image-rendering: pixelated; border: 1px solid #888;
          display: block; background: #fff; }
 .keys button { font-size: 1.6em; width: 2.4em; margin: .15em; }
 .keys button.wide { width: auto; padding: 0 .6em; }
 #status { min-height: 1.4em; color: #555; }
</style></head>
<body>
<h1>Which digit is this?</h1>
<p>Rater: <b id="rater"></b> &middot; <span id="progress">loading&hellip;</span></p>
<div id="task">
 <img id="digit" alt="digit to label" width="392" height="392">
 <p id="context" hidden></p>
 <div class="keys" id="keys"></div>
 <p>Click a button or press a key 0&ndash;9; press X if it is not a digit.</p>
</div>
<p id="done" hidden>All examples are labelled. Thank you!</p>
<p id="status"></p>
<script>
let current = null, busy = false;
const keys = document.getElementById("keys");
for (const v of ["0","1","2","3","4","5","6","7","8","9","X"]) {
  const b = document.createElement("button");
  b.textContent = v === "X" ? "Not a digit (X)" : v;
  if (v === "X") b.className = "wide";
  b.dataset.vote = v;
  b.addEventListener("click", () => vote(v));
  keys.appendChild(b);
}
document.addEventListener("keydown", (e) => {
  if (/^[0-9]$/.test(e.key)) vote(e.key);
  else if (e.key === "x" || e.key === "X") vote("X");
});
function show(data) {
  document.getElementById("rater").textContent = data.rater;
  document.getElementById("progress").textContent =
    data.progress.done + " / " + data.progress.total + " labelled";
  if (data.done) {
    current = null;
    document.getElementById("task").hidden = true;
    document.getElementById("done").hidden = false;
    return;
  }
  current = data.id;
  const context = document.getElementById("context");
  context.textContent = data.context || "";
  context.hidden = !data.context;
  document.getElementById("digit").src = data.image;
  document.getElementById("digit").dataset.id = data.id;
}
async function load() {
  const r = await fetch("api/next", {cache: "no-store"});
  show(await r.json());
}
async function vote(v) {
  if (busy || current === null) return;
  busy = true;
  document.getElementById("status").textContent = "saving\\u2026";
  try {
    const r = await fetch("api/vote", {method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({id: current, vote: v})});
    const data = await r.json();
    if (!r.ok) { document.getElementById("status").textContent = "error: " + data.error; return; }
    document.getElementById("status").textContent = "saved";
    show(data);
  } catch (err) {
    document.getElementById("status").textContent = "error: " + err;
  } finally { busy = false; }
}
load();
</script></body></html>
"""

MAX_BODY = 10_000  # bytes; a vote is about 40


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Refused(Exception):
    """A request refused before it is handled: HTTP status and a short reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


_IMAGE_RE = re.compile(r"^/image/([A-Za-z0-9._-]+)\.png$")


def png_bytes(image: np.ndarray) -> bytes:
    """8-bit greyscale PNG of a [0, 1] image, drawn as dark ink on white."""
    pix = np.round((1.0 - np.clip(image, 0.0, 1.0)) * 255.0).astype(np.uint8)
    h, w = pix.shape
    raw = b"".join(b"\x00" + pix[r].tobytes() for r in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def candidate_context(ex: Example) -> str | None:
    """The line shown beside an L0 candidate (None for other examples). It never names the class
    the candidate was moved towards: a rater told the target would be primed towards it."""
    if ex.rank is None or ex.n_candidates is None or ex.changed_pixels is None:
        return None
    return (
        f"candidate {ex.rank} of {ex.n_candidates} for MNIST {ex.source_split} image "
        f"{ex.source_index}, {ex.changed_pixels} pixels changed"
    )


@contextmanager
def locked(store_path: Path) -> Iterator[None]:
    """Exclusive inter-process lock on `<store>.lock` for read-modify-write of the store."""
    lock_path = store_path.with_name(store_path.name + ".lock")
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class LabelServer(ThreadingHTTPServer):
    """Serves the labelling page for one rater and one store file."""

    daemon_threads = True

    def __init__(self, store_path: str | Path, rater: str, host: str = "127.0.0.1", port: int = 0):
        self.store_path = Path(store_path)
        self.rater = check_rater(rater)
        self.lock = threading.Lock()
        self.store = LabelStore.load(self.store_path)  # fail early on a bad store
        super().__init__((host, port), _Handler)

    def allowed_host(self, header: str | None) -> bool:
        """Is `header` (a Host header) this server? Wildcard binds accept any name on our port."""
        if not header:
            return False
        bound, port = self.server_address[:2]
        name, _, hport = header.rpartition(":") if not header.endswith("]") else (header, "", "")
        if not hport.isdigit() or int(hport) != port:
            return False
        name = name.strip("[]").lower()
        if bound in ("0.0.0.0", "::", ""):
            return True
        return name == str(bound).lower() or (is_loopback(str(bound)) and is_loopback(name))

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def next_payload(self) -> dict[str, Any]:
        ex = self.store.next_for(self.rater)
        done, total = self.store.progress(self.rater)
        payload: dict[str, Any] = {
            "rater": self.rater,
            "progress": {"done": done, "total": total},
            "done": ex is None,
        }
        if ex is not None:
            payload |= {"id": ex.id, "image": f"image/{ex.id}.png"}
            if (context := candidate_context(ex)) is not None:
                payload["context"] = context
        return payload

    def vote(self, example_id: str, vote: Any) -> dict[str, Any]:
        with self.lock, locked(self.store_path):
            store = LabelStore.load(self.store_path)  # pick up other raters' votes
            if self.rater in store.get(example_id).votes:
                raise _Conflict(f"{self.rater} has already labelled {example_id}")
            store.add_vote(example_id, self.rater, vote)  # saves atomically
            self.store = store
            return self.next_payload()


class _Conflict(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    server: LabelServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # keep the console for the URL

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _check_host(self) -> bool:
        if self.server.allowed_host(self.headers.get("Host")):
            return True
        self.close_connection = True  # a body, if any, is left unread
        self._json(HTTPStatus.MISDIRECTED_REQUEST, {"error": "unknown Host"})
        return False

    def _check_vote_request(self) -> int:
        """Refuse cross-origin, non-JSON and badly sized vote POSTs; return the body length."""
        origin = self.headers.get("Origin")
        if origin is not None and origin != f"http://{self.headers.get('Host')}":
            raise _Refused(HTTPStatus.FORBIDDEN, "cross-origin votes are refused")
        if self.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            raise _Refused(HTTPStatus.FORBIDDEN, "cross-site votes are refused")
        ctype = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            raise _Refused(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send Content-Type: application/json")
        text = self.headers.get("Content-Length")
        if text is None:
            raise _Refused(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
        try:
            length = int(text)
        except ValueError:
            raise _Refused(HTTPStatus.BAD_REQUEST, "Content-Length is not a number") from None
        if length < 1:
            raise _Refused(HTTPStatus.BAD_REQUEST, "Content-Length must be positive")
        if length > MAX_BODY:
            raise _Refused(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"a vote is at most {MAX_BODY} bytes"
            )
        return length

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        if not self._check_host():
            return
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
        elif path == "/api/next":
            with self.server.lock:
                self._json(HTTPStatus.OK, self.server.next_payload())
        elif m := _IMAGE_RE.match(path):
            try:
                with self.server.lock:
                    img = self.server.store.get(m.group(1)).image
            except RobustlabError:
                self._json(HTTPStatus.NOT_FOUND, {"error": "unknown example"})
                return
            self._send(HTTPStatus.OK, png_bytes(img), "image/png")
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        if not self._check_host():
            return
        if self.path.split("?", 1)[0] != "/api/vote":
            self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
            return
        try:
            length = self._check_vote_request()
        except _Refused as exc:
            self.close_connection = True  # the body, if any, is left unread
            self._json(exc.status, {"error": str(exc)})
            return
        try:
            body = json.loads(self.rfile.read(length))
            payload = self.server.vote(str(body["id"]), body["vote"])
        except (ValueError, KeyError, TypeError):
            self._json(
                HTTPStatus.BAD_REQUEST, {"error": 'send JSON {"id": ..., "vote": 0-9 or "X"}'}
            )
        except _Conflict as exc:
            self._json(HTTPStatus.CONFLICT, {"error": str(exc)})
        except RobustlabError as exc:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        else:
            self._json(HTTPStatus.OK, payload)


def serve(store_path: str | Path, rater: str, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Print the page's URL and serve until interrupted."""
    if not is_loopback(host):
        print(
            f"WARNING: binding {host}, not 127.0.0.1: anyone who can reach this machine on port "
            f"{port} can see the images and vote as {rater}. Use --host 127.0.0.1 unless you "
            "mean it.",
            file=sys.stderr,
            flush=True,
        )
    server = LabelServer(store_path, rater, host, port)
    done, total = server.store.progress(server.rater)
    print(f"labelling page for {server.rater} ({done}/{total} done): {server.url}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
