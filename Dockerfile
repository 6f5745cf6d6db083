# syntax=docker/dockerfile:1
# Two images from one Dockerfile:
#
#   surgery (default target): the gRPC service (`surgeon serve`) that ranks, prunes, validates and exports;
#            torch + open_clip + onnxruntime
#   serving: `surgeon infer` over ONNX exports; onnxruntime, numpy and pillow only, no torch (about 0.19 of
#            the surgery image's Python environment: benchmarks/bench_install_size.py)
#   oip:     `surgeon serve-model`: the serving image's packages plus MLServer (the oip extra, still no torch),
#            an export over the Open Inference Protocol (KServe v2) on 8080 (REST), 8081 (gRPC), 8082 (metrics)
#
#   docker build -t surgeon .                                   # surgery, CPU torch + onnxruntime
#   docker build --build-arg VARIANT=cuda -t surgeon:cuda .     # surgery, CUDA torch + onnxruntime-gpu;
#                                                               # run it with `docker run --gpus all ...`
#   docker build --target serving -t surgeon:serving .          # serving, CPU onnxruntime
#
#   docker run -d -p 50051:50051 -v surgeon-exports:/exports \
#       -v $HOME/models:/models:ro -v $HOME/data:/data:ro --stop-timeout 40 surgeon [--max-jobs 2 ...]
#   docker run --rm -v $PWD/exports/RUN:/model:ro -v $PWD/photos:/images:ro surgeon:serving /model /images
#   docker build --target oip -t surgeon:oip .
#   docker run -d -p 8080-8082:8080-8082 -v $PWD/exports/RUN:/model:ro surgeon:oip /model [--name NAME ...]
#
# Surgery: requests name models under /models (local-dir:NAME) and data under /data; everything the service
# writes lands in the /exports volume. Extra arguments after the image name are appended to `surgeon serve`;
# change the port with -e SURGEON_PORT=N (the health check follows it). Serving: arguments are those of
# `surgeon infer` (EXPORT IMAGE... --labels FILE --json).
#
# Reproducible builds: the base image is pinned by digest (refresh both together with
# `docker buildx imagetools inspect python:3.11-slim`) and every Python package by docker/constraints.txt.

ARG PYTHON_IMAGE=python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7

# ---- python: the pinned base of every stage ----
FROM ${PYTHON_IMAGE} AS python
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# ---- build-serving: surgeon's plain install (torch-free) ----
FROM python AS build-serving
COPY docker/constraints.txt /tmp/constraints.txt
WORKDIR /src
COPY . .
RUN pip install -c /tmp/constraints.txt /src

# ---- build-oip: the plain install + MLServer (the oip extra), still torch-free ----
FROM build-serving AS build-oip
RUN pip install -c /tmp/constraints.txt "/src[oip]"

# ---- build-surgery: torch first, then surgeon[surgery,serve] ----
FROM python AS build-surgery
# cpu: CPU wheels of torch; cuda: PyPI's x86_64 torch wheels, which are the CUDA builds and bring their own
# CUDA libraries (nvidia-* wheels, which onnxruntime-gpu preloads too): the host needs only the NVIDIA driver
# and the container toolkit. onnxruntime (CPU) comes with the plain install; the cuda variant swaps it for
# onnxruntime-gpu (the two cannot be installed together). TORCH_INDEX_URL picks another torch build.
ARG VARIANT=cpu
ARG TORCH_INDEX_URL=""
COPY docker/constraints.txt /tmp/constraints.txt
RUN set -eu; \
    case "$VARIANT" in \
      cpu)  index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
      cuda) index="${TORCH_INDEX_URL:-https://pypi.org/simple}" ;; \
      *) echo "VARIANT must be cpu or cuda, not $VARIANT" >&2; exit 1 ;; \
    esac; \
    pip install -c /tmp/constraints.txt --index-url "$index" torch torchvision
WORKDIR /src
COPY . .
RUN set -eu; \
    pip install -c /tmp/constraints.txt "/src[surgery,serve]"; \
    if [ "$VARIANT" = cuda ]; then pip uninstall -y onnxruntime && pip install onnxruntime-gpu; fi

# ---- runtime: the user and folders both images share ----
FROM python AS runtime
RUN useradd --create-home --uid 10001 --user-group surgeon \
    && mkdir -p /exports /models /data \
    && chown 10001:10001 /exports
ENV SURGEON_EXPORTS_DIR=/exports \
    SURGEON_CACHE_DIR=/home/surgeon/.cache/surgeon
# numeric, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd
USER 10001:10001
WORKDIR /home/surgeon

# ---- serving: `surgeon infer` on ONNX exports, no torch ----
FROM runtime AS serving
COPY --from=build-serving /opt/venv /opt/venv
# a one-shot command, not a server: nothing to health-check
HEALTHCHECK NONE
ENTRYPOINT ["surgeon", "infer"]
CMD ["--help"]

# ---- oip: `surgeon serve-model` over the Open Inference Protocol, no torch ----
FROM runtime AS oip
COPY --from=build-oip /opt/venv /opt/venv
EXPOSE 8080 8081 8082
# /v2/health/ready: every model of the export verified and loaded
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/v2/health/ready', timeout=5).status == 200 else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["surgeon", "serve-model", "--host", "0.0.0.0"]
CMD ["--help"]

# ---- surgery (the default target: last): the gRPC service ----
FROM runtime AS surgery
COPY --from=build-surgery /opt/venv /opt/venv
ENV SURGEON_PORT=50051
EXPOSE 50051
VOLUME ["/exports"]
# grpc.health.v1 on the service's port (no token needed for health checks). With --tls-cert, replace this
# check (docker run --health-cmd ...) by one that opens a TLS channel.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; ch = grpc.insecure_channel('127.0.0.1:' + os.environ['SURGEON_PORT']); r = g.HealthStub(ch).Check(h.HealthCheckRequest(service='surgeon.v1.Surgeon'), timeout=5); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"]
# SIGTERM drains: running jobs get --grace seconds (default 20) to finish, then are cancelled and their
# partial outputs removed; give `docker stop` a longer timeout than that (--stop-timeout 40 above).
STOPSIGNAL SIGTERM
# the port comes from $SURGEON_PORT (surgeon serve reads it), so the health check and the server agree
ENTRYPOINT ["surgeon", "serve", "--host", "0.0.0.0", "--exports-root", "/exports", "--models-root", "/models", "--data-root", "/data"]
CMD []
