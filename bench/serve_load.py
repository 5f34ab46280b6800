"""Serving under concurrent load vs calling the same ONNX Runtime session in-process, in one run.

A ResNet-18 DeepLabV3+ package is exported, `scaleseg serve` starts on a loopback port, and C clients
(threads, each with its own tritonclient.http connection, binary tensors) send single images for a fixed
number of requests each. Reported: throughput (images/s) and p50 / p99 latency; the in-process baseline
runs the package's model.onnx directly with the same thread count, batch 1 and batch max-batch. Last, a
mix where one client sends maximum-size images (the largest square the server's default pixels-of-work
budget admits) while the others send the usual ones, with the server process's peak RSS (VmHWM)."""
from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import child_env, machine, markdown_table, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def build_package(work: Path) -> Path:
    from export.package import export_package
    from training.cli import parse_train_args
    from training.data.synth import synthesize
    from training.engine import Trainer

    data = synthesize(work / "data", n_labeled=4, n_unlabeled=0, n_val=2, size=64, progress=False)
    cfg = parse_train_args([str(data), "--backbone", "resnet18", "--pretrained", "none", "--crop-size", "64", "--max-iters", "1",
                            "--num-workers", "0", "--device", "cpu", "--out", str(work / "run")])
    Trainer(cfg, progress=False).fit()
    export_package(work / "run" / "last.pt", work / "model", data=data, progress=lambda m: None)
    return work / "model"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set size so far (Linux VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load(url: str, image: np.ndarray, clients: int, per_client: int, large: np.ndarray | None = None) -> dict:
    """``clients`` threads; with ``large``, the first of them sends that image instead."""
    import tritonclient.http as triton

    latencies, errors, lock = [], [], threading.Lock()

    def worker(mine: np.ndarray):
        client = triton.InferenceServerClient(url, network_timeout=300)
        inp = triton.InferInput("image", list(mine.shape), "UINT8")
        inp.set_data_from_numpy(mine)
        outs = [triton.InferRequestedOutput("labels"), triton.InferRequestedOutput("confidence")]
        for _ in range(per_client):
            tic = time.perf_counter()
            try:
                client.infer("seg", [inp], outputs=outs)
            except Exception as err:  # counted, not raised: the benchmark reports errors
                with lock:
                    errors.append(repr(err))
                continue
            with lock:
                latencies.append(time.perf_counter() - tic)

    threads = [threading.Thread(target=worker, args=(large if k == 0 and large is not None else image,))
               for k in range(clients)]
    tic = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - tic
    return {"images_per_sec": len(latencies) / wall, "p50_ms": 1000 * percentile(latencies, 50),
            "p99_ms": 1000 * percentile(latencies, 99), "errors": len(errors), "requests": clients * per_client}


def measure(args: argparse.Namespace, package: Path) -> tuple[list[dict], str]:
    """The in-process rows, then the served ones; and the server's /metrics text at the end."""
    from serving.backends import OnnxRuntimeBackend
    from serving.limits import RequestLimits

    image = np.random.default_rng(0).integers(0, 256, (1, 3, args.size, args.size), dtype=np.uint8)
    total = args.clients * args.per_client

    backend = OnnxRuntimeBackend(package / "model.onnx", providers=["CPUExecutionProvider"], threads=args.threads)
    backend.infer(image)
    rows = []
    for batch in (1, args.max_batch):
        x = np.repeat(image, batch, axis=0)
        times = []
        for _ in range(max(1, total // batch // 4)):
            tic = time.perf_counter()
            backend.infer(x)
            times.append(time.perf_counter() - tic)
        rows.append({"setup": f"in-process ONNX Runtime, batch {batch}", "images_per_sec": batch / statistics.mean(times),
                     "p50_ms": 1000 * percentile(times, 50), "p99_ms": 1000 * percentile(times, 99), "errors": 0})
    del backend

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "serving.cli", str(package), "--name", "seg", "--port", str(port),
                               "--max-batch", str(args.max_batch), "--max-delay-ms", str(args.max_delay_ms),
                               "--max-queue", str(4 * args.clients)], env=child_env(args.threads),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import httpx
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        load(f"127.0.0.1:{port}", image, 2, 3)  # warm-up
        for clients in (1, args.clients):
            per_client = args.per_client if clients > 1 else max(args.per_client, 50)
            result = load(f"127.0.0.1:{port}", image, clients, per_client)
            rows.append({"setup": f"scaleseg serve, {clients} concurrent client(s)", **result,
                         "peak_rss_mb": peak_rss_mb(server.pid)})
            print(rows[-1], flush=True)
        side = math.isqrt(RequestLimits.max_work_pixels)
        large = np.random.default_rng(1).integers(0, 256, (1, 3, side, side), dtype=np.uint8)
        result = load(f"127.0.0.1:{port}", image, args.mix_clients, args.mix_per_client, large)
        rows.append({"setup": f"scaleseg serve, mix: 1 client at {side}x{side} (max size) + {args.mix_clients - 1} at "
                              f"{args.size}x{args.size}", **result, "peak_rss_mb": peak_rss_mb(server.pid)})
        print(rows[-1], flush=True)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:  # never leave it running on a package about to be deleted
            server.kill()
            server.wait()
    return rows, metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", type=int, default=256, help="image side")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--per-client", type=int, default=25)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-delay-ms", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--mix-clients", type=int, default=4)
    p.add_argument("--mix-per-client", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="scaleseg-serve-") as tmp:
        rows, metrics = measure(args, build_package(Path(tmp)))
    batches = [line for line in metrics.splitlines() if line.startswith("scaleseg_batch_size_")]
    count = float(next(line.split()[-1] for line in batches if line.startswith("scaleseg_batch_size_count")))
    images_total = float(next(line.split()[-1] for line in batches if line.startswith("scaleseg_batch_size_sum")))
    served = rows[-2]
    best_in_process = max(r["images_per_sec"] for r in rows if r["setup"].startswith("in-process"))
    summary = {"server_over_in_process_batch1": served["images_per_sec"] / rows[0]["images_per_sec"],
               "server_over_best_in_process": served["images_per_sec"] / best_in_process,
               "p99_over_p50": served["p99_ms"] / served["p50_ms"], "mean_batch": images_total / count,
               "peak_rss_mb": rows[-1]["peak_rss_mb"]}
    table = markdown_table(rows, [("setup", "setup"), ("images_per_sec", "images / s"), ("p50_ms", "p50 ms"),
                                  ("p99_ms", "p99 ms"), ("errors", "errors"), ("peak_rss_mb", "server peak RSS MB")])
    table += ("\n\n" + f"At {args.clients} clients the server delivers {100 * summary['server_over_in_process_batch1']:.0f} % of "
              f"in-process batch-1 throughput ({100 * summary['server_over_best_in_process']:.0f} % of the best in-process "
              f"setting); p99 / p50 = {summary['p99_over_p50']:.2f}; mean executed batch {summary['mean_batch']:.2f} images. "
              f"Server peak RSS with maximum-size requests in the mix: {summary['peak_rss_mb']:.0f} MB.")
    write_results("serve_load", {"machine": machine(), "args": vars(args), "rows": rows, "summary": summary}, table,
                  f"ResNet-18 DeepLabV3+ package, {args.size}x{args.size} uint8 images, one image per request, "
                  f"--max-batch {args.max_batch} --max-delay-ms {args.max_delay_ms}; clients and server share this machine's cores.")


if __name__ == "__main__":
    main()
