"""Per-model inference statistics in the form of Triton's statistics extension
(``GET /v2/models/{name}/stats``, what ``tritonclient`` ``get_inference_statistics`` reads):
https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_statistics.md"""
from __future__ import annotations

import threading
import time
from collections import defaultdict


def _duration() -> dict:
    return {"count": 0, "ns": 0}


class ModelStats:
    """Counters updated by the batcher (executions) and the request path (successes, failures)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.inference_count = 0          # images inferred
        self.execution_count = 0          # batches executed
        self.last_inference_ms = 0
        self.success, self.fail, self.queue, self.compute = _duration(), _duration(), _duration(), _duration()
        self.batches: dict[int, dict] = defaultdict(_duration)

    def record_execution(self, batch_size: int, queue_ns: list[int], compute_ns: int) -> None:
        with self._lock:
            self.execution_count += 1
            self.inference_count += batch_size
            self.last_inference_ms = int(time.time() * 1000)
            self.queue["count"] += len(queue_ns)
            self.queue["ns"] += sum(queue_ns)
            self.compute["count"] += 1
            self.compute["ns"] += compute_ns
            self.batches[batch_size]["count"] += 1
            self.batches[batch_size]["ns"] += compute_ns

    def record_request(self, ok: bool, total_ns: int) -> None:
        with self._lock:
            target = self.success if ok else self.fail
            target["count"] += 1
            target["ns"] += total_ns

    def triton(self, name: str, version: str) -> dict:
        with self._lock:
            zero = _duration()
            return {
                "name": name, "version": version, "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count, "execution_count": self.execution_count,
                "inference_stats": {"success": dict(self.success), "fail": dict(self.fail), "queue": dict(self.queue),
                                    "compute_input": zero, "compute_infer": dict(self.compute), "compute_output": zero,
                                    "cache_hit": zero, "cache_miss": zero},
                "batch_stats": [{"batch_size": size, "compute_input": zero, "compute_infer": dict(d), "compute_output": zero}
                                for size, d in sorted(self.batches.items())],
            }
