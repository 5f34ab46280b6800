"""The models being served and hot reload, one model package at a time.

A package folder serves under a base name: ``model.onnx`` as NAME and, when present, ``model.cif.onnx``
as NAME_cif. Loading builds every graph of the package, each with its backend and batcher, and runs a
warm-up inference that must return the outputs meta.json promises; only then are all of them swapped
in together, so NAME and NAME_cif never serve different packages. Requests already queued on the old
version finish there; if loading or warm-up fails, the old version keeps serving.

Loading is confined: a package must be the one given at start-up or lie inside the repository root
given at start-up, and at most ``max_models`` models are loaded at once.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backends import Backend, BackendError
from .batching import DynamicBatcher
from .limits import scale_cost
from .precision import load_graph
from .protocol import ProtocolError
from .shapes import warmup_shape
from .stats import ModelStats

log = logging.getLogger("scaleseg.serving")
GRAPHS = {"": "model.onnx", "_cif": "model.cif.onnx"}  # served-name suffix -> graph file of the package


@dataclass
class ServedModel:
    name: str
    package: str                      # base name of the package this graph belongs to
    version: int
    directory: Path
    graph: str                        # the package's FP32 graph file this model serves (its INT8 twin may run)
    meta: dict
    backend: Backend
    batcher: DynamicBatcher
    stats: ModelStats = field(default_factory=ModelStats)

    @property
    def precision(self) -> str:
        return self.backend.precision

    @property
    def num_classes(self) -> int:
        return len(self.meta["classes"])

    @property
    def scales(self) -> list[float]:
        """The scales this graph runs the network at (meta.json ``graphs``; a single scale when absent)."""
        return (self.meta.get("graphs") or {}).get(self.graph, {}).get("scales") or [1.0]


def read_meta(directory: Path) -> dict:
    path = directory / "meta.json"
    if not path.is_file():
        raise BackendError(f"{path}: missing; {directory} is not a model package (write one with `scaleseg export`).")
    try:
        meta = json.loads(path.read_text())
    except OSError as err:
        raise BackendError(f"{path}: cannot be read ({err.strerror}).") from None
    except (ValueError, RecursionError) as err:
        raise BackendError(f"{path}: not valid JSON ({err}).") from None
    if not isinstance(meta, dict) or meta.get("format_version") != 1 or not isinstance(meta.get("classes"), list):
        raise BackendError(f"{path}: unsupported model package format; re-export it with `scaleseg export`.")
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
                 max_queue: int = 64, on_batch=None, root: str | Path | None = None, max_models: int = 4,
                 max_work_pixels: float = float("inf"), precision: str = "auto"):
        self.backend_kind, self.precision, self.max_batch, self.max_delay_ms, self.max_queue = backend_kind, precision, max_batch, max_delay_ms, max_queue
        self.on_batch, self.max_models, self.max_work_pixels = on_batch, max_models, max_work_pixels
        self.root = Path(root).resolve() if root else None
        self.pinned: dict[str, Path] = {}          # packages given at start-up: base name -> folder
        self.models: dict[str, ServedModel] = {}
        self._lock = asyncio.Lock()

    # --- where a package may come from -------------------------------------------------------------
    def package_of(self, name: str) -> str:
        """The base name whose package serves ``name`` (NAME_cif belongs to NAME)."""
        if name in self.models:
            return self.models[name].package
        for suffix in GRAPHS:
            if suffix and name.endswith(suffix) and name[: -len(suffix)] in self.packages():
                return name[: -len(suffix)]
        return name

    def packages(self) -> dict[str, Path]:
        return {m.package: m.directory for m in self.models.values()}

    def resolve(self, package: str, directory) -> Path:
        """The folder to load ``package`` from; 400 for a malformed path, 403 outside what is allowed."""
        if directory is None:
            current = self.packages().get(package) or self.pinned.get(package)
            if current is not None:
                return current
            if self.root is None:
                raise ProtocolError(f"model {package!r} is not loaded and this server has no --model-repository; "
                                    "start it with one to load packages by name", 404)
            directory = package
        if not isinstance(directory, str) or not directory or "\0" in directory:
            raise ProtocolError("parameters.model_dir must be a non-empty string: a package folder")
        path = Path(directory)
        if self.root is not None and not path.is_absolute():
            path = self.root / path
        try:
            path = path.resolve()
            path.is_dir()  # a name longer than the file system takes fails here, not half-way through a load
        except (OSError, RuntimeError) as err:  # RuntimeError: a symbolic-link loop
            reason = getattr(err, "strerror", None) or str(err)
            raise ProtocolError(f"model_dir {directory[:200]!r} cannot be opened ({reason}); give a package folder "
                                "of the model repository") from None
        if path in self.pinned.values() or (self.root is not None and path.is_relative_to(self.root)):
            return path
        where = f"inside the model repository {self.root}" if self.root else "the package given at start-up"
        raise ProtocolError(f"model_dir {directory!r} is outside what this server may load: {where}", 403)

    # --- loading -------------------------------------------------------------------------------------
    def _build(self, name: str, package: str, directory: Path, graph: str, version: int) -> ServedModel:
        meta = read_meta(directory)
        try:
            backend = load_graph(directory, graph, meta, self.backend_kind, self.precision, lambda b: warm_up(b, meta))
        except BackendError:
            raise
        except Exception as err:  # a damaged graph file raises whatever its runtime raises
            log.warning("could not load %s from %s: %r", graph, directory, err)
            raise BackendError(f"{directory / graph}: cannot be loaded ({type(err).__name__}); the file is damaged or "
                               "not a graph of this package; re-export it with `scaleseg export`") from None
        stats = ModelStats()
        cost = scale_cost((meta.get("graphs") or {}).get(graph, {}).get("scales") or [1.0])
        # An engine runs batches up to its profile's maximum only, so the batcher stacks no more than that.
        max_batch = min(self.max_batch, backend.profile.max_batch) if backend.profile else self.max_batch
        batcher = DynamicBatcher(backend, max_batch, self.max_delay_ms, self.max_queue, self.on_batch,
                                 self.max_work_pixels, cost, stats)
        return ServedModel(name, package, version, directory, graph, meta, backend, batcher, stats)

    def _build_package(self, package: str, directory: Path, version: int) -> list[ServedModel]:
        return [self._build(package + suffix, package, directory, graph, version)
                for suffix, graph in GRAPHS.items() if suffix == "" or (directory / graph).is_file()]

    async def load(self, name: str, directory=None, version: int | None = None) -> list[ServedModel]:
        """Load (or reload) the package serving ``name`` from ``directory`` (default: where it was loaded
        from); every graph of the package switches at once. Returns the models now serving it."""
        async with self._lock:
            package = self.package_of(name)
            path = self.resolve(package, directory)
            old = [m for m in self.models.values() if m.package == package]
            graphs = [suffix for suffix, graph in GRAPHS.items() if suffix == "" or (path / graph).is_file()]
            self._refuse_foreign(package, [package + suffix for suffix in graphs])
            if len(self.models) - len(old) + len(graphs) > self.max_models:
                raise ProtocolError(f"loading {package!r} would serve {len(self.models) - len(old) + len(graphs)} models; "
                                    f"this server holds at most {self.max_models}; unload one first", 409)
            if version is None:
                version = max((m.version for m in old), default=0) + 1
            built = await asyncio.get_running_loop().run_in_executor(None, self._build_package, package, path, version)
            for model in old:
                del self.models[model.name]
            for model in built:
                model.batcher.start()
                self.models[model.name] = model
            log.info("serving %s version %d from %s on %s", ", ".join(f"{m.name} ({m.precision})" for m in built),
                     version, path, built[0].backend.description)
        for model in old:
            asyncio.get_running_loop().create_task(model.batcher.drain())
        return built

    def _refuse_foreign(self, package: str, names: list[str]) -> None:
        """409 when loading ``package`` would take over a name another package serves (``a``'s CIF graph
        is ``a_cif``, which may also be a package of its own): nothing is replaced without an unload."""
        for name in names:
            model = self.models.get(name)
            if model is not None and model.package != package:
                raise ProtocolError(
                    f"loading package {package!r} would serve one of its graphs as {name!r}, but {name!r} is loaded "
                    f"from package {model.package!r} ({model.directory}); unload it first (POST "
                    f"/v2/repository/models/{name}/unload) or load this package under another name", 409)

    async def load_pinned(self, package: str, directory: str | Path) -> list[ServedModel]:
        """The start-up package: always allowed to load and reload."""
        self.pinned[package] = Path(directory).resolve()
        return await self.load(package, None)

    async def unload(self, name: str) -> list[str]:
        """Stop serving ``name``; unloading a package's base name unloads its sibling graphs too."""
        async with self._lock:
            if name not in self.models:
                raise ProtocolError(f"model {name!r} is not loaded; loaded: {sorted(self.models)}", 404)
            gone = [m for m in self.models.values() if name in (m.name, m.package)]
            for model in gone:
                del self.models[model.name]
        await asyncio.gather(*(m.batcher.drain() for m in gone))
        return [m.name for m in gone]

    def available(self) -> dict[str, Path]:
        """Package folders in the repository root (base name -> folder), loaded or not."""
        found = {}
        if self.root is not None and self.root.is_dir():
            for meta in sorted(self.root.glob(f"*{os.sep}meta.json")):
                found[meta.parent.name] = meta.parent
        return found

    def get(self, name: str) -> ServedModel | None:
        return self.models.get(name)

    @property
    def waiting(self) -> int:
        return sum(m.batcher.waiting for m in self.models.values())

    async def close(self) -> None:
        await asyncio.gather(*(m.batcher.drain() for m in self.models.values()))
