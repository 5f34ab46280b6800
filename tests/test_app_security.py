"""The app's security: the Label Studio token never reaches a browser and is only sent to its own URL;
a network-facing app needs --auth."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from app.main import main as app_main
from app.ui import App

TOKEN = "s3cret-label-studio-token-0123456789abcdef"


class Recorder(BaseHTTPRequestHandler):
    """An HTTP server that answers like Label Studio's whoami and records the Authorization headers it got."""
    seen: list[str] = []

    def do_GET(self):
        type(self).seen.append(self.headers.get("Authorization", ""))
        body = json.dumps({"email": "someone@example.com"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def recorder():
    Recorder.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", Recorder.seen
    server.shutdown()


@pytest.fixture
def secured_app(package, data_copy, tmp_path, recorder):
    """The app configured with a token for the recording server; launched on loopback."""
    configured_url, _ = recorder
    app = App(package, data_copy, tmp_path / "work", ls_url=configured_url, ls_token=TOKEN)
    demo = app.blocks()
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, ssr_mode=False, quiet=True)
    yield app, demo.local_url
    demo.close()


def test_token_never_reaches_the_browser(secured_app):
    _, url = secured_app
    for path in ("", "config", "gradio_api/info"):
        r = httpx.get(url + path, timeout=30)
        assert r.status_code == 200 and TOKEN not in r.text, path


def test_stored_token_only_goes_to_its_own_url(secured_app, recorder):
    from gradio_client import Client

    app, url = secured_app
    configured_url, seen = recorder
    other = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)  # the attacker's server: records into the same list
    threading.Thread(target=other.serve_forever, daemon=True).start()
    attacker = f"http://127.0.0.1:{other.server_address[1]}"
    try:
        client = Client(url, verbose=False)
        with pytest.raises(Exception, match="belongs to"):
            client.predict(attacker, "", api_name="/ls_connect")
        assert seen == []  # nothing was sent anywhere
        # a token typed for another URL is used for that request only
        assert "Connected" in client.predict(attacker, "their-own-token", api_name="/ls_connect")[0]
        assert seen == ["Token their-own-token"]
        with pytest.raises(Exception, match="belongs to"):
            client.predict(attacker, "", api_name="/ls_connect")
        # the configured URL with an empty box uses the stored token, server-side
        assert "Connected" in client.predict(configured_url, "", api_name="/ls_connect")[0]
        assert seen == ["Token their-own-token", f"Token {TOKEN}"]
    finally:
        other.shutdown()


def test_network_host_needs_auth(tmp_path, monkeypatch):
    monkeypatch.delenv("SCALESEG_APP_AUTH", raising=False)
    with pytest.raises(SystemExit, match="--auth"):
        app_main([str(tmp_path), str(tmp_path), "--host", "0.0.0.0"])
    from app.main import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("myhost")
