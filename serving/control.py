"""Repository load and unload as every transport offers them (HTTP routes in ``server``, RPCs in
``grpc_service``), and keeping the worker processes of ``--workers N`` on one set of models: the worker
that answers publishes the change (``workers.WorkerSync``) and replies once every worker follows it."""
from __future__ import annotations

import asyncio
import logging
import os

from .backends import BackendError
from .inference import find_model
from .protocol import ProtocolError
from .repository import GRAPHS, Repository, ServedModel
from .workers import WorkerSync

log = logging.getLogger("scaleseg.serving")


class RepositoryControl:
    def __init__(self, repo: Repository, sync: WorkerSync | None):
        self.repo, self.sync = repo, sync
        self.lock = asyncio.Lock()  # one reconcile or load at a time in this worker

    async def reconcile(self) -> None:
        """Bring this worker's packages to the state the workers share (under ``lock``)."""
        shared = self.sync.read()
        if shared["generation"] <= self.sync.applied:
            return
        for package, entry in shared["packages"].items():
            current = self.repo.get(package)
            try:
                if entry is None and current is not None:
                    await self.repo.unload(package)
                elif entry is not None and (current is None or current.version != entry["version"]):
                    await self.repo.load(package, entry["directory"], version=entry["version"])
            except (BackendError, ProtocolError) as err:
                log.error("worker %d could not follow %s to generation %d: %s", os.getpid(), package,
                          shared["generation"], err)
        self.sync.ack(shared["generation"])

    async def follow_other_workers(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            async with self.lock:
                await self.reconcile()

    async def _change_shared_state(self, change, package: str) -> int | None:
        """Run ``change`` (load or unload here) and, with several workers, make every worker follow it;
        returns how many workers serve the result."""
        if self.sync is None:
            await change()
            return None
        async with self.lock:
            loop = asyncio.get_running_loop()
            lock = self.sync.locked()
            await loop.run_in_executor(None, lock.__enter__)
            try:
                await self.reconcile()
                await change()
                current = self.repo.get(package)
                entry = {"directory": str(current.directory), "version": current.version} if current else None
                siblings = tuple(package + suffix for suffix in GRAPHS if suffix) if current else ()
                generation = self.sync.publish(self.sync.read(), package, entry, siblings)
                self.sync.ack(generation)
            finally:
                lock.__exit__(None, None, None)
        return await loop.run_in_executor(None, self.sync.wait_for_all, generation)

    async def load(self, name: str, params: dict) -> dict:
        """Load (or reload) the package serving ``name``; ``params`` may name its folder as ``model_dir``."""
        unsupported = sorted(k for k in params if k != "model_dir")
        if unsupported:
            raise ProtocolError(f"load parameters {unsupported} are not supported; give parameters.model_dir: a package "
                                "folder inside the model repository")
        package = self.repo.package_of(name)
        current = self.repo.get(package)
        loaded: list[ServedModel] = []

        async def change():
            loaded.extend(await self.repo.load(name, params.get("model_dir")))
        try:
            workers = await self._change_shared_state(change, package)
        except BackendError as err:
            kept = f"; version {current.version} keeps serving" if current else ""
            raise ProtocolError(f"could not load {name!r}: {err}{kept}") from None
        answer = {"name": package, "version": str(loaded[0].version), "backend": loaded[0].backend.description,
                  "models": [m.name for m in loaded]}
        return answer | ({"workers_switched": workers} if workers is not None else {})

    async def unload(self, name: str) -> dict:
        find_model(self.repo, name)
        gone: list[str] = []

        async def change():
            gone.extend(await self.repo.unload(name))
        workers = await self._change_shared_state(change, name)
        return {"unloaded": gone} | ({"workers_switched": workers} if workers is not None else {})
