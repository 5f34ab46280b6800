"""Start a local Label Studio server for the demo and the tests: its own virtual environment (created
once and reused, since its pinned dependencies clash with ours), a free loopback port, SQLite in the
given folder, a legacy API token, local-files serving on, and nothing calling out to the internet."""
from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from filelock import FileLock, Timeout

from .spawn import python_command

REPO = Path(__file__).resolve().parents[1]
# In a checkout the venv sits beside the project's own (.venv-labelstudio, git-ignored); otherwise in the cache.
DEFAULT_VENV = REPO / ".venv-labelstudio" if (REPO / "pyproject.toml").is_file() else Path.home() / ".cache" / "scaleseg" / "venv-labelstudio"
VENV = Path(os.environ.get("SCALESEG_LS_VENV", DEFAULT_VENV))
VERSION = "1.23.2"
INSTALL_WAIT_S = 1800  # a slow network's install takes minutes; a held lock past this is a stuck install


def ensure_venv() -> Path:
    """The label-studio executable, installing it into its own venv on first use (a few minutes)."""
    exe = VENV / "bin" / "label-studio"
    marker = VENV / f".label-studio-{VERSION}"
    if marker.is_file():
        return exe
    # Two processes starting Label Studio at once (the app and the demo, two test workers) must not install
    # into one venv side by side: pip then reads the other's half-written packages and fails. One installs;
    # the other waits, then finds the marker, or installs itself if the first failed.
    VENV.mkdir(parents=True, exist_ok=True)
    lock = FileLock(VENV / ".install.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another process's install of label-studio into {VENV}", flush=True)
        try:
            lock.acquire(timeout=INSTALL_WAIT_S)
        except Timeout:
            raise RuntimeError(f"another process has been installing label-studio into {VENV} for {INSTALL_WAIT_S // 60} "
                               f"minutes (it holds {lock.lock_file}): stop it and start again") from None
    try:
        if not marker.is_file():
            print(f"installing label-studio {VERSION} into {VENV} (first time only, a few minutes)", flush=True)
            subprocess.run(python_command("venv", str(VENV)), check=True)
            subprocess.run([str(VENV / "bin" / "pip"), "install", "--quiet", f"label-studio=={VERSION}"], check=True)
            marker.touch()
    finally:
        lock.release()
    return exe


@dataclass
class LabelStudioServer:
    url: str
    token: str
    process: subprocess.Popen
    python: Path

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start(data_dir: Path, port: int = 0, token: str = "", username: str = "labeller@example.com",
          password: str = "") -> LabelStudioServer:
    """Start the server with ``data_dir`` as its home; waits until /health answers."""
    exe = ensure_venv()
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    if not port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    token = token or secrets.token_hex(20)
    env = {**os.environ,
           "LABEL_STUDIO_USERNAME": username, "LABEL_STUDIO_PASSWORD": password or secrets.token_hex(8),
           "LABEL_STUDIO_USER_TOKEN": token, "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
           "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "", "COLLECT_ANALYTICS": "false", "LATEST_VERSION_CHECK": "false",
           "SSRF_PROTECTION_ENABLED": "false", "ML_BLOCK_LOCAL_IP": "false",
           "LOCAL_FILES_SERVING_ENABLED": "true", "LOCAL_FILES_DOCUMENT_ROOT": "/",
           "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir)}
    with open(data_dir / "label-studio.log", "w") as log:  # the server writes through its own copy of the handle
        proc = subprocess.Popen([str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
                                 "--data-dir", str(data_dir), "--log-level", "WARNING"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=data_dir)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("Label Studio exited:\n" + (data_dir / "label-studio.log").read_text()[-3000:])
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return LabelStudioServer(url, token, proc, VENV / "bin" / "python")
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError("Label Studio did not become healthy in 180 s:\n" + (data_dir / "label-studio.log").read_text()[-3000:])
