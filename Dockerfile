# syntax=docker/dockerfile:1
# Training / CLI image: `docker build -t scaleseg . && docker run --rm -v $PWD/data:/data scaleseg data check /data`.
# For GPUs the pinned torch wheel is the CUDA build; run with `--gpus all`.
FROM python:3.11-slim AS runtime

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/scaleseg
COPY pyproject.toml constraints.txt README.md ./
COPY training ./training
COPY export ./export
COPY serving ./serving
COPY app ./app
RUN pip install --no-compile -c constraints.txt . \
    && useradd --create-home --uid 10001 scaleseg

USER scaleseg
WORKDIR /home/scaleseg
ENTRYPOINT ["scaleseg"]
CMD ["--help"]
