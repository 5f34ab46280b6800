"""Connections bounded in time, against the real server (one worker and two): clients that dribble their
headers or stall or dribble their body get 408 and are closed by the configured total deadline, while
other clients are served meanwhile; malformed framing is answered in the one {"error": ...} shape."""
from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from tests.test_serving import Server

HEADER_S, BODY_S, RATE_KBPS = 1.0, 1.0, 1.0  # a 1000-byte body gets 1 s + 1000 B / (1 kB/s) = 2 s
SLACK = 1.5  # scheduling on a loaded CI machine


@pytest.fixture(scope="module", params=[1, 2], ids=["1-worker", "2-workers"])
def server(package, request):
    s = Server(package, "--workers", str(request.param), "--header-timeout", str(HEADER_S),
               "--body-timeout", str(BODY_S), "--min-body-kbps", str(RATE_KBPS))
    yield s
    s.stop()


def _connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.settimeout(30)
    return sock


def _answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _dribble(sock: socket.socket, pieces, every: float) -> float:
    """Send ``pieces`` one by one every ``every`` seconds until the server closes; returns the seconds taken."""
    tic = time.monotonic()
    try:
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(every)
    except OSError:
        pass  # closed by the server: what we wait for
    return time.monotonic() - tic


def _assert_408(data: bytes, what: str) -> None:
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), data[:300]
    assert what in json.loads(body)["error"]


def test_dribbled_headers_are_cut_at_the_deadline_while_others_are_served(server):
    results = {}

    def slow_client(k):
        sock = _connect(server)
        pieces = [b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n"] + [b"X-Slow: %d\r\n" % i for i in range(100)]
        sender = threading.Thread(target=_dribble, args=(sock, pieces, 0.3))
        tic = time.monotonic()
        sender.start()
        data = _answer(sock)
        results[k] = (time.monotonic() - tic, data)
        sender.join()
        sock.close()

    threads = [threading.Thread(target=slow_client, args=(k,)) for k in range(10)]
    for t in threads:
        t.start()
    served = []
    while any(t.is_alive() for t in threads):  # the slow clients do not block anyone else
        tic = time.monotonic()
        assert httpx.get(f"{server.url}/v2/models/seg", timeout=5).status_code == 200
        served.append(time.monotonic() - tic)
        time.sleep(0.1)
    for t in threads:
        t.join()
    assert len(results) == 10
    for seconds, data in results.values():
        assert HEADER_S - 0.2 < seconds < HEADER_S + SLACK, seconds
        _assert_408(data, "headers")
    assert served and max(served) < 1.0, served


def test_stalled_and_dribbled_bodies_are_cut_by_their_size_scaled_deadline(server):
    head = (b"POST /v2/models/seg/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n")
    limit = BODY_S + 1000 / (RATE_KBPS * 1000)
    for pieces, every in [([head + b'{"inputs": '], 60), ([head] + [b" "] * 999, 0.2)]:  # stalls; one byte per 0.2 s
        sock = _connect(server)
        tic = time.monotonic()
        sender = threading.Thread(target=_dribble, args=(sock, pieces, every), daemon=True)
        sender.start()
        data = _answer(sock)
        seconds = time.monotonic() - tic
        sock.close()
        assert limit - 0.2 < seconds < limit + SLACK, seconds
        _assert_408(data, "body")
    assert httpx.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200


def test_a_prompt_large_body_is_not_cut(server):
    body = json.dumps({"inputs": [{"name": "image", "shape": [1, 3, 32, 32], "datatype": "UINT8",
                                   "data": [7] * 3072}]}).encode()
    assert len(body) > 1000  # longer than the slow bodies above, sent at full speed
    assert httpx.post(f"{server.url}/v2/models/seg/infer", content=body, timeout=10).status_code == 200


@pytest.mark.parametrize("head", [
    b"POST /v2/models/seg/infer HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /v2/models/seg/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n",
    b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nthis line has no colon\r\n\r\n",
    b"NOT-HTTP\r\n\r\n",
])
def test_malformed_framing_gets_the_json_error_shape(server, head):
    sock = _connect(server)
    sock.sendall(head)
    data = _answer(sock)
    sock.close()
    status, _, body = data.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in status.lower(), data[:300]
    assert set(json.loads(body)) == {"error"}


@pytest.mark.parametrize("head", [
    b"POST /v2/models/seg/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 900000000\r\n\r\n",                      # refused (413) before the body is read
    b"POST /v2/models/seg/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n",  # 400
], ids=["413", "400"])
def test_an_early_answer_reaches_a_client_that_is_still_sending(server, head):
    """The server answers before it has read what the client sends; it half-closes and drops what keeps
    coming (a lingering close), so the answer is not destroyed by the reset a full close would send."""
    for _ in range(5):
        sock = _connect(server)
        sock.sendall(head)
        sender = threading.Thread(target=_dribble, args=(sock, [b"x" * 65536] * 2000, 0.0), daemon=True)
        sender.start()
        data = _answer(sock)
        sock.close()
        sender.join(10)
        assert not sender.is_alive()
        assert data.startswith(b"HTTP/1.1 4"), data[:300]
        assert set(json.loads(data.partition(b"\r\n\r\n")[2])) == {"error"}
