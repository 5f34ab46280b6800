# syntax=docker/dockerfile:1
# scaleseg images, one target each (build with --target):
#   serve-cpu   Open Inference Protocol endpoint on ONNX Runtime (CPU); no torch, no training code paths
#   serve-gpu   the same on an NVIDIA GPU: TensorRT engines, or ONNX Runtime with CUDA/TensorRT providers
#   train       the full CLI (train, eval, export, app, label, doctor) with the [tensorrt] extra, so it exports
#               every format (TensorRT engines with --gpus all); the pinned torch wheel is the CUDA 13 build,
#               which needs an NVIDIA driver of branch 580 or newer (`scaleseg doctor` says when it is older)
# The GPU images install from constraints-tensorrt.txt (TensorRT, ModelOpt and onnxruntime-gpu that work
# together), so an engine built in `train` loads in `serve-gpu`. tests/test_docker.py lints this file with
# hadolint and checks that each image installs what its code imports.
# Serving images read a model package mounted at /models/model, e.g.
#   docker build --target serve-cpu -t scaleseg:serve-cpu .
#   docker run -p 8000:8000 -v $PWD/model:/models/model:ro scaleseg:serve-cpu

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG SCALESEG_VERSION=0.1.0

# --- the scaleseg wheel, built once -------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY training ./training
COPY export ./export
COPY serving ./serving
COPY app ./app
RUN pip install --no-cache-dir build==1.3.0 && python -m build --wheel --outdir /wheels

# --- CPU serving ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS serve-cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY constraints.txt /tmp/constraints.txt
COPY --from=wheel /wheels /wheels
RUN pip install -c /tmp/constraints.txt numpy pillow onnxruntime fastapi uvicorn prometheus-client python-multipart \
        grpcio protobuf "tritonclient[grpc]" tqdm \
    && pip install --no-deps /wheels/*.whl \
    && useradd --create-home --uid 10001 scaleseg
USER 10001
EXPOSE 8000 8001
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2)"]
ENTRYPOINT ["python", "-m", "serving.cli", "/models/model", "--host", "0.0.0.0", "--port", "8000"]

# --- GPU serving -----------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS serve-gpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3=3.12.* python3-pip=24.* \
    && rm -rf /var/lib/apt/lists/*
COPY constraints-tensorrt.txt /tmp/constraints-tensorrt.txt
COPY --from=wheel /wheels /wheels
# TensorRT's Python runner keeps its buffers in torch CUDA tensors, hence torch in this image. TensorRT's
# library packages fetch their wheels from NVIDIA's index while they install (docs/deployment.md).
RUN pip install -c /tmp/constraints-tensorrt.txt \
        numpy pillow fastapi uvicorn prometheus-client python-multipart torch grpcio protobuf "tritonclient[grpc]" \
        tqdm opencv-python-headless onnxruntime-gpu tensorrt-cu13 \
    && pip install --no-deps /wheels/*.whl \
    && useradd --create-home --uid 10001 scaleseg
USER 10001
EXPOSE 8000 8001
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2)"]
ENTRYPOINT ["python3", "-m", "serving.cli", "/models/model", "--host", "0.0.0.0", "--port", "8000"]

# --- training / full CLI -------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS train
ARG SCALESEG_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY constraints-tensorrt.txt /tmp/constraints-tensorrt.txt
COPY --from=wheel /wheels /wheels
RUN pip install -c /tmp/constraints-tensorrt.txt \
        "/wheels/scaleseg-${SCALESEG_VERSION}-py3-none-any.whl[tensorrt]" \
    && useradd --create-home --uid 10001 scaleseg
USER 10001
WORKDIR /home/scaleseg
ENTRYPOINT ["scaleseg"]
CMD ["--help"]
