"""The models being served, each a package folder with its backend and batcher, and hot reload.

Loading builds the new backend and batcher and runs a warm-up inference that must return the outputs
meta.json promises; only then is the new version swapped in. Requests already queued on the old
version finish there; if loading or warm-up fails, the old version keeps serving.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backends import Backend, BackendError, load_backend
from .batching import DynamicBatcher
from .shapes import warmup_shape

log = logging.getLogger("scaleseg.serving")


@dataclass
class ServedModel:
    name: str
    version: int
    directory: Path
    graph: str
    meta: dict
    backend: Backend
    batcher: DynamicBatcher

    @property
    def num_classes(self) -> int:
        return len(self.meta["classes"])


def read_meta(directory: Path) -> dict:
    path = directory / "meta.json"
    if not path.is_file():
        raise BackendError(f"{path}: missing; {directory} is not a model package (write one with `scaleseg export`).")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BackendError(f"{path}: not valid JSON ({err}).") from None
    if meta.get("format_version") != 1 or "classes" not in meta:
        raise BackendError(f"{path}: unsupported model package format {meta.get('format_version')!r}.")
    return meta


def warm_up(backend: Backend, meta: dict) -> None:
    """One small inference, inside the engine's profile; the outputs must be the graph's promised names and shapes."""
    shape = warmup_shape(backend.profile)
    out = backend.infer(np.zeros(shape, np.uint8))
    expected = [o["name"] for o in meta["outputs"]]
    if sorted(out) != sorted(expected):
        raise BackendError(f"warm-up returned outputs {sorted(out)}, meta.json promises {expected}")
    if out["labels"].shape != (shape[0], *shape[2:]) or out["labels"].max() >= len(meta["classes"]):
        raise BackendError("warm-up labels have the wrong shape or class ids outside classes.json")


class Repository:
    def __init__(self, backend_kind: str = "auto", max_batch: int = 8, max_delay_ms: float = 5.0,
                 max_queue: int = 64, on_batch=None):
        self.backend_kind, self.max_batch, self.max_delay_ms, self.max_queue = backend_kind, max_batch, max_delay_ms, max_queue
        self.on_batch = on_batch
        self.models: dict[str, ServedModel] = {}
        self._lock = asyncio.Lock()

    def _build(self, name: str, directory: Path, graph: str, version: int) -> ServedModel:
        meta = read_meta(directory)
        backend = load_backend(directory, self.backend_kind, graph, check=lambda b: warm_up(b, meta))
        # An engine runs batches up to its profile's maximum only, so the batcher stacks no more than that.
        max_batch = min(self.max_batch, backend.profile.max_batch) if backend.profile else self.max_batch
        batcher = DynamicBatcher(backend, max_batch, self.max_delay_ms, self.max_queue, self.on_batch)
        return ServedModel(name, version, directory, graph, meta, backend, batcher)

    async def load(self, name: str, directory: str | Path | None = None, graph: str = "model.onnx") -> ServedModel:
        """Load (or reload) ``name`` from ``directory`` (default: where it was loaded from)."""
        async with self._lock:
            old = self.models.get(name)
            if directory is None:
                if old is None:
                    raise BackendError(f"model {name!r} is not loaded; give the package folder to load it from.")
                directory = old.directory
            version = old.version + 1 if old else 1
            model = await asyncio.get_running_loop().run_in_executor(None, self._build, name, Path(directory), graph, version)
            model.batcher.start()
            self.models[name] = model
            log.info("serving %s version %d from %s on %s", name, version, directory, model.backend.description)
        if old is not None:
            asyncio.get_running_loop().create_task(old.batcher.drain())
        return model

    def get(self, name: str) -> ServedModel | None:
        return self.models.get(name)

    @property
    def waiting(self) -> int:
        return sum(m.batcher.waiting for m in self.models.values())

    async def close(self) -> None:
        await asyncio.gather(*(m.batcher.drain() for m in self.models.values()))
