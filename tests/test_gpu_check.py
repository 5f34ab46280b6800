"""bench/gpu_check.py: its decisions (steps, budgets, skip reasons, arguments, report) on this CPU machine, and
that it exits at once without a GPU."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.gpu_check import (NO_GPU, Check, Settings, early_exit, export_args, plan, report, result_name,
                             speedups, tensorrt_skip, throughput_backends, throughput_row, train_args)
from export.cli import export_parser
from serving.environment import INSTALL, Environment
from training.cli import parse_train_args

REPO = Path(__file__).resolve().parents[1]
CPU_ONLY = Environment(ort_providers=("CPUExecutionProvider",), gpus=("NVIDIA H200",), cuda_available=True)
FULL = Environment(distributions={"onnxruntime-gpu": "1.23.2"}, tensorrt="10.13.3", cuda_available=True,
                   ort_providers=("CUDAExecutionProvider", "CPUExecutionProvider"), gpus=("NVIDIA H200", "NVIDIA H200"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU machine's behaviour")
@pytest.mark.parametrize("flags, code", [([], 0), (["--require-gpu"], 1)])
def test_exits_at_once_without_a_gpu(flags, code, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--results", str(tmp_path), *flags],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == code, done.stderr
    assert NO_GPU in done.stdout
    assert not any(tmp_path.iterdir())  # nothing written


def test_early_exit_only_without_cuda():
    assert early_exit(True, True) is None
    assert early_exit(False, False) == (0, NO_GPU)
    assert early_exit(False, True)[0] == 1


def test_plan_skips_what_is_not_installed_with_the_install_line():
    steps = {s.name: s for s in plan(CPU_ONLY)}
    assert [n for n, s in steps.items() if s.skip] == ["parity onnxruntime cuda"]
    assert INSTALL["gpu"] in steps["parity onnxruntime cuda"].skip
    assert "ONNX only" in steps["export"].note and INSTALL["tensorrt"] in steps["export"].note
    assert "not exercised" in steps["torchrun"].note  # one GPU: say that SyncBatchNorm did not run
    skips = dict(throughput_backends(CPU_ONLY))
    assert skips["pytorch cuda fp32"] is None and skips["onnxruntime cuda"] and skips["tensorrt"]
    assert "--tensorrt" not in export_args(Path("ckpt.pt"), Path("pkg"), CPU_ONLY, Settings())


def test_plan_runs_everything_where_installed():
    steps = plan(FULL)
    assert not any(s.skip for s in steps)
    assert [s.name for s in steps] == ["synth", "train supervised", "train unimatch", "train scalematch",
                                       "amp channels-last", "torchrun", "export", "parity onnxruntime cuda", "throughput"]
    assert "SyncBatchNorm" in steps[5].note and "not exercised" not in steps[5].note
    assert 7 * 60 <= sum(s.budget_s for s in steps) <= 9 * 60  # caps: the whole check fits a 10-minute command
    assert all(reason is None for _, reason in throughput_backends(FULL))


def test_tensorrt_that_does_not_import_says_why():
    env = Environment(tensorrt_error="OSError: libnvinfer.so.10: cannot open shared object file")
    assert "libnvinfer" in tensorrt_skip(env) and INSTALL["tensorrt"] in tensorrt_skip(env)


def test_train_arguments_are_a_cuda_amp_run_of_the_small_data_recipe(tmp_path):
    cfg = parse_train_args(train_args("scalematch", tmp_path, tmp_path / "run", 200, Settings()))
    assert (cfg.method, cfg.run.device, cfg.optim.amp, cfg.run.max_iters) == ("scalematch", "cuda", True, 200)
    assert (cfg.model.backbone, cfg.model.pretrained) == ("efficientnet_lite0", "imagenet")
    assert (cfg.data.crop_size, cfg.data.batch_size, cfg.run.eval_every) == (96, 4, 200)


def test_export_arguments_parse_with_a_small_engine_profile():
    ns = export_parser().parse_args(export_args(Path("best.pt"), Path("pkg"), FULL, Settings())[1:])
    assert ns.tensorrt and ns.cif_scales == (0.5, 2.0)
    assert (ns.engine_min_side, ns.engine_max_side, ns.engine_max_batch) == (64, 512, 8)


def test_result_name_names_the_gpu():
    assert result_name("NVIDIA H200") == "gpu_check-nvidia-h200"
    assert result_name("NVIDIA GeForce RTX 4090 (24 GB)") == "gpu_check-nvidia-geforce-rtx-4090-24-gb"


def test_report_tables():
    timing = speedups([{"method": "unimatch", "setting": "fp32", "sec_per_iter": 0.2},
                       {"method": "unimatch", "setting": "fp16 channels-last", "sec_per_iter": 0.1}])
    assert [t["speedup"] for t in timing] == [1.0, 2.0]
    steps = [{"name": "train unimatch", "status": "ok", "seconds": 61.5, "budget_s": 100, "detail": "train-unimatch.log"},
             {"name": "parity onnxruntime cuda", "status": "skipped", "budget_s": 20, "detail": "no CUDA provider"}]
    rows = [{"engine": "pytorch cuda fp32", "batch": 8, "p50_ms": 12.5, "images_per_sec": 640.0}]
    text = report(steps, timing, rows, [{"engine": "tensorrt", "skip": "TensorRT is not installed"}])
    assert "| train unimatch | ok | 61.500 | 100 | train-unimatch.log |" in text
    assert "| unimatch | fp16 channels-last | 0.100 | 2.000 |" in text
    assert "| pytorch cuda fp32 | 8 | 12.500 | 640.0 | - |" in text
    assert "| tensorrt | - | - | - | TensorRT is not installed |" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks how failures are recorded, on a machine without CUDA")
def test_a_failing_step_is_recorded_and_the_rest_still_run(tmp_path):
    result = Check(CPU_ONLY, Settings(), tmp_path).run()
    status = {s["name"]: s["status"] for s in result["steps"]}
    assert status["synth"] == "ok" and (tmp_path / "data" / "classes.json").is_file()
    assert status["parity onnxruntime cuda"] == "skipped"
    failed = [s for s in result["steps"] if s["name"] not in ("synth", "parity onnxruntime cuda")]
    assert all(s["status"] == "failed" and s["detail"] for s in failed), failed
    assert "cuda" in next(s for s in failed if s["name"] == "train unimatch")["detail"].lower()
    assert (tmp_path / "train-unimatch.log").is_file()


def test_throughput_rows_carry_the_measured_model():
    # The check's first GPU run stopped here: bench/inference.py's row takes the model as a dict of columns.
    from training.config import TrainConfig
    cfg = TrainConfig()
    cfg.model.backbone, cfg.model.decoder = "efficientnet_lite0", "light"
    r = throughput_row("pytorch cuda fp32", cfg, 8, [0.5, 0.4, 0.6])
    assert (r["backbone"], r["decoder"], r["graph"], r["batch"], r["images_per_sec"]) == \
        ("efficientnet_lite0", "light", "single", 8, 16.0)
