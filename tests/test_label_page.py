"""The labelling page: HTTP API checks and an end-to-end run in real headless Chromium."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from robustlab.data import labels as L
from robustlab.data import votes as V
from robustlab.invariance.label_server import MAX_BODY, LabelServer

DATA = Path(
    os.environ.get("ROBUSTLAB_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data"
)


@pytest.fixture(autouse=True)
def _data_env(monkeypatch):
    monkeypatch.setenv("ROBUSTLAB_DATA_DIR", str(DATA))


@pytest.fixture
def store_path(tmp_path):
    """Four thesis examples; alice has already labelled the first, bob the first three."""
    full = L.import_thesis(tmp_path / "unused.json")
    store = L.LabelStore(tmp_path / "store.json", full.examples[:4], name="page-test")
    for e in store.examples:
        e.votes = {}
    store.examples[0].votes = {"alice": 7}
    for e in store.examples[:3]:
        e.votes["bob"] = 5
    store.save()
    return store.path


@pytest.fixture
def server(store_path):
    srv = LabelServer(store_path, "alice", port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read()


def _post(url: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_api_hides_target_and_earlier_votes(server):
    status, body = _get(server.url + "api/next")
    nxt = json.loads(body)
    assert (
        status == 200
        and nxt["id"] == "thesis-eps0.3-1"
        and nxt["progress"] == {"done": 1, "total": 4}
    )
    assert set(nxt) == {"rater", "progress", "done", "id", "image"}
    status, png = _get(server.url + nxt["image"])
    assert status == 200 and png.startswith(b"\x89PNG")
    page = _get(server.url)[1].decode()
    assert "target" not in page.lower() and "image-rendering: pixelated" in page


def test_api_saves_each_vote_and_rejects_bad_ones(server, store_path):
    assert _post(server.url + "api/vote", {"id": "thesis-eps0.3-1", "vote": 11})[0] == 400
    assert _post(server.url + "api/vote", {"id": "nope", "vote": 3})[0] == 400
    assert _post(server.url + "api/vote", {"vote": 3})[0] == 400
    assert (
        _post(server.url + "api/vote", {"id": "thesis-eps0.3-0", "vote": 3})[0] == 409
    )  # already voted
    status, nxt = _post(server.url + "api/vote", {"id": "thesis-eps0.3-1", "vote": "X"})
    assert status == 200 and nxt["id"] == "thesis-eps0.3-2"
    on_disk = L.LabelStore.load(store_path)
    assert on_disk.examples[1].votes == {"bob": 5, "alice": V.NOT_A_DIGIT}
    assert on_disk.examples[0].votes == {"alice": 7, "bob": 5}


def test_two_raters_share_one_store(store_path):
    servers = [LabelServer(store_path, r, port=0) for r in ("alice", "carol")]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    try:
        assert _post(servers[0].url + "api/vote", {"id": "thesis-eps0.3-1", "vote": 1})[0] == 200
        assert _post(servers[1].url + "api/vote", {"id": "thesis-eps0.3-0", "vote": 2})[0] == 200
        votes = [e.votes for e in L.LabelStore.load(store_path).examples[:2]]
        assert votes == [{"alice": 7, "bob": 5, "carol": 2}, {"bob": 5, "alice": 1}]
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()


def test_cli_prints_url_and_serves(store_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "robustlab.cli",
            "label",
            "--store",
            str(store_path),
            "--rater",
            "dave",
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert "0/4 done" in line and "http://127.0.0.1:" in line
        url = line.rsplit(" ", 1)[1].strip()
        assert json.loads(_get(url + "api/next")[1])["id"] == "thesis-eps0.3-0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_cli_rejects_bad_store(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    res = subprocess.run(
        [sys.executable, "-m", "robustlab.cli", "label", "--store", str(bad), "--rater", "x"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    last = res.stderr.strip().splitlines()[-1]  # earlier lines: library start-up noise
    assert res.returncode == 2 and last.startswith("robustlab label: error:")
    assert "corrupt label store" in last


def _raw(server, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> int:
    """One request with exactly these headers (http.client adds only Host unless given)."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host="Host" in headers, skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        if body:
            conn.send(body)
        return conn.getresponse().status
    finally:
        conn.close()


def _vote_headers(server, **extra: str) -> dict[str, str]:
    host, port = server.server_address[:2]
    return {"Host": f"{host}:{port}", "Content-Type": "application/json", **extra}


VOTE = json.dumps({"id": "thesis-eps0.3-1", "vote": 4}).encode()


@pytest.mark.parametrize(
    ("change", "status"),
    [
        ({"Origin": "http://evil.example"}, 403),  # a cross-origin page posting a vote
        ({"Origin": "null"}, 403),  # sandboxed iframe / file:// page
        ({"Sec-Fetch-Site": "cross-site"}, 403),
        ({"Content-Type": "text/plain"}, 415),  # a form or no-preflight fetch
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ({"Content-Length": "-5"}, 400),
        ({"Content-Length": str(MAX_BODY + 1)}, 413),
        ({"Content-Length": "lots"}, 400),
        ({"Content-Length": None}, 411),
        ({"Host": "evil.example:{port}"}, 421),  # DNS rebinding: our port under another name
    ],
)
def test_unsafe_vote_posts_are_refused_and_record_nothing(server, store_path, change, status):
    headers = {**_vote_headers(server), "Content-Length": str(len(VOTE))}
    for k, v in change.items():
        headers.pop(k, None)
        if v is not None:
            headers[k] = v.format(port=server.server_address[1])
    body = VOTE if headers.get("Content-Length") == str(len(VOTE)) else b""
    assert _raw(server, "POST", "/api/vote", headers, body) == status
    assert "alice" not in L.LabelStore.load(store_path).examples[1].votes


def test_a_same_origin_vote_is_accepted(server, store_path):
    host, port = server.server_address[:2]
    headers = {
        **_vote_headers(server),
        "Origin": f"http://{host}:{port}",
        "Sec-Fetch-Site": "same-origin",
        "Content-Type": "application/json; charset=utf-8",
        "Content-Length": str(len(VOTE)),
    }
    assert _raw(server, "POST", "/api/vote", headers, VOTE) == 200
    assert L.LabelStore.load(store_path).examples[1].votes["alice"] == 4
    # localhost and 127.0.0.1 are the same loopback server
    assert _raw(server, "GET", "/api/next", {"Host": f"localhost:{port}"}) == 200
    assert _raw(server, "GET", "/api/next", {"Host": f"evil.example:{port}"}) == 421


def test_binds_loopback_by_default_and_warns_loudly_otherwise(store_path):
    srv = LabelServer(store_path, "alice", port=0)
    try:
        assert srv.server_address[0] == "127.0.0.1"
    finally:
        srv.server_close()
    # a documentation-only address (TEST-NET-1): the bind fails, after the warning
    res = subprocess.run(
        [sys.executable, "-m", "robustlab.cli", "label", "--store", str(store_path)]
        + ["--rater", "x", "--host", "192.0.2.1", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert res.returncode == 2
    assert "WARNING: binding 192.0.2.1, not 127.0.0.1" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("robustlab label: error: cannot serve")


def test_labelling_in_headless_chromium(browser, server, store_path):
    page = browser.new_page()
    page.goto(server.url)
    img = page.locator("#digit")
    # resumes at the first example alice has not labelled
    page.wait_for_function("document.getElementById('digit').dataset.id === 'thesis-eps0.3-1'")
    page.wait_for_function("document.getElementById('digit').naturalWidth === 28")
    assert page.locator("#progress").inner_text() == "1 / 4 labelled"
    assert img.evaluate("e => getComputedStyle(e).imageRendering") == "pixelated"
    assert img.bounding_box()["width"] >= 280
    body = page.locator("body").inner_text()
    assert "target" not in body.lower()

    page.get_by_role("button", name="3", exact=True).click()  # click
    page.wait_for_function("document.getElementById('digit').dataset.id === 'thesis-eps0.3-2'")
    assert L.LabelStore.load(store_path).examples[1].votes["alice"] == 3  # saved at once

    page.keyboard.press("x")  # key: not a digit
    page.wait_for_function("document.getElementById('digit').dataset.id === 'thesis-eps0.3-3'")
    assert page.locator("#progress").inner_text() == "3 / 4 labelled"

    page.reload()  # resume after a reload: earlier votes are not shown again
    page.wait_for_function("document.getElementById('digit').dataset.id === 'thesis-eps0.3-3'")
    page.keyboard.press("8")
    page.wait_for_selector("#done", state="visible")
    assert page.locator("#progress").inner_text() == "4 / 4 labelled"
    assert page.locator("#task").is_hidden()

    votes = [e.votes.get("alice") for e in L.LabelStore.load(store_path).examples]
    assert votes == [7, 3, V.NOT_A_DIGIT, 8]
    assert np.array_equal(L.LabelStore.load(store_path).vote_matrix()[0].shape, (4, 2))
