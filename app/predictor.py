"""Predictions for the app: in-process through serving's backends, or from a running `scaleseg serve`
endpoint over the Open Inference Protocol (binary tensors)."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import numpy as np

from serving.backends import Backend
from serving.limits import RequestLimits, scale_cost
from serving.precision import load_graph
from serving.protocol import DATATYPES, HEADER


class RemoteBackend(Backend):
    """One model of a v2 endpoint; ``infer`` posts uint8 images as binary tensors."""
    name = "remote"

    def __init__(self, url: str, model: str, api_key: str = ""):
        self.url, self.model = url.rstrip("/"), model
        self.headers = {"X-API-Key": api_key} if api_key else {}
        self.http = httpx.Client(timeout=120)
        r = self.http.get(f"{self.url}/v2/models/{model}", headers=self.headers)
        if r.status_code != 200:
            raise RuntimeError(f"serving endpoint answered {r.status_code} for model {model}: {r.text[:300]}")
        self.precision = str(r.json().get("parameters", {}).get("precision", "fp32"))  # what the endpoint runs

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        raw = np.ascontiguousarray(images, dtype=np.uint8).tobytes()
        head = json.dumps({"inputs": [{"name": "image", "shape": list(images.shape), "datatype": "UINT8",
                                       "parameters": {"binary_data_size": len(raw)}}],
                           "parameters": {"binary_data_output": True}}).encode()
        r = self.http.post(f"{self.url}/v2/models/{self.model}/infer", content=head + raw,
                           headers={**self.headers, HEADER: str(len(head)), "Content-Type": "application/octet-stream"})
        if r.status_code != 200:
            raise RuntimeError(f"serving endpoint answered {r.status_code}: {r.text[:300]}")
        n = int(r.headers[HEADER])
        body, blob, out, offset = json.loads(r.content[:n]), r.content[n:], {}, 0
        for o in body["outputs"]:
            size = o["parameters"]["binary_data_size"]
            out[o["name"]] = np.frombuffer(blob[offset:offset + size], dtype=DATATYPES[o["datatype"]]).reshape(o["shape"])
            offset += size
        return out

    @property
    def description(self) -> str:
        return f"{self.url} ({self.model})"


class Predictor:
    def __init__(self, model_dir: Path, serving_url: str = "", model_name: str = "", api_key: str = ""):
        self.serving_url, self.api_key = serving_url, api_key
        self.model_name = model_name or Path(model_dir).resolve().name
        self._lock = threading.Lock()
        self.load(Path(model_dir))

    def load(self, model_dir: Path) -> None:
        """Switch to another package; on failure the previous one stays in use."""
        meta = json.loads((Path(model_dir) / "meta.json").read_text())
        has_cif = (Path(model_dir) / "model.cif.onnx").is_file()
        if self.serving_url:
            r = httpx.post(f"{self.serving_url.rstrip('/')}/v2/repository/models/{self.model_name}/load",
                           json={"parameters": {"model_dir": str(Path(model_dir).resolve())}},
                           headers={"X-API-Key": self.api_key} if self.api_key else {}, timeout=300)
            if r.status_code != 200:
                raise RuntimeError(f"the serving endpoint could not load {model_dir}: {r.text[:300]}")
            single = RemoteBackend(self.serving_url, self.model_name, self.api_key)
            cif = None
        else:
            single = load_graph(model_dir, "model.onnx", meta)
            cif = load_graph(model_dir, "model.cif.onnx", meta) if has_cif else None
        with self._lock:
            self.model_dir, self.meta, self.single, self.cif = Path(model_dir), meta, single, cif

    def upload_limits(self, multiscale: bool) -> tuple[int, int]:
        """(bytes, pixels) one Predict upload may have: `scaleseg serve`'s default budget in pixels of work,
        so a CIF graph (which runs every one of its scales) takes proportionally smaller images."""
        limits = RequestLimits()
        scales = self.meta.get("graphs", {}).get("model.cif.onnx", {}).get("scales", [1.0]) if multiscale else [1.0]
        return limits.max_upload_bytes, int(limits.max_work_pixels / scale_cost(scales))

    def snapshot(self) -> tuple[Path, Backend, Backend | None]:
        """(package, single-scale backend, CIF backend) as one consistent set, even while a promotion swaps them."""
        with self._lock:
            return self.model_dir, self.single, self.cif

    @property
    def classes(self) -> list[dict]:
        return self.meta["classes"]

    def predict(self, rgb: np.ndarray, multiscale: bool = False) -> dict[str, np.ndarray]:
        """Outputs for one RGB uint8 [H, W, 3] image, without the batch dimension."""
        with self._lock:
            backend = self.cif if multiscale and self.cif is not None else self.single
        return {k: v[0] for k, v in backend.infer(rgb.transpose(2, 0, 1)[None].copy()).items()}
