"""Hot reload across ``scaleseg serve --workers N`` processes, each holding its own copy of the models.

The worker that answers a load or unload writes the wanted state (package -> folder and version, or
None once unloaded) to ``state.json`` in a folder the workers share, under a file lock so loads from
different workers are serialised. Every worker polls that file, brings its models to that state and
acknowledges the generation it reached; the answering worker replies once every live worker has
acknowledged, so a client that got 200 finds the new version on every worker.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

POLL_SECONDS = 0.2


class WorkerSync:
    def __init__(self, directory: str | Path, workers: int):
        self.dir, self.workers = Path(directory), workers
        (self.dir / "acks").mkdir(parents=True, exist_ok=True)
        self.applied = 0

    def read(self) -> dict:
        path = self.dir / "state.json"
        return json.loads(path.read_text()) if path.is_file() else {"generation": 0, "packages": {}}

    @contextmanager
    def locked(self):
        """Blocking; call from a worker thread."""
        with open(self.dir / "lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def publish(self, state: dict, package: str, entry: dict | None, replaces: tuple[str, ...] = ()) -> int:
        """Record ``package``'s new entry (None: unloaded) as the next generation, dropping the entries of
        ``replaces`` (its sibling graphs, which a package load brings back); call under ``locked``."""
        kept = {k: v for k, v in state["packages"].items() if k not in replaces}
        state = {"generation": state["generation"] + 1, "packages": {**kept, package: entry}}
        tmp = self.dir / f"state.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(state))
        tmp.replace(self.dir / "state.json")
        return state["generation"]

    def ack(self, generation: int) -> None:
        self.applied = generation
        tmp = self.dir / "acks" / f".{os.getpid()}.tmp"
        tmp.write_text(str(generation))
        tmp.replace(self.dir / "acks" / str(os.getpid()))

    def acknowledged(self, generation: int) -> int:
        """How many live workers have reached ``generation``."""
        count = 0
        for path in (self.dir / "acks").glob("[0-9]*"):
            try:
                os.kill(int(path.name), 0)
                count += int(path.read_text()) >= generation
            except (ProcessLookupError, ValueError, OSError):
                continue
        return count

    def wait_for_all(self, generation: int, timeout: float = 120.0) -> int:
        """Blocking; the number of workers that switched by the deadline."""
        deadline = time.monotonic() + timeout
        while (done := self.acknowledged(generation)) < self.workers and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS / 2)
        return done
