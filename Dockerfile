# syntax=docker/dockerfile:1
# surgeon's gRPC service (`surgeon serve`) in a container.
#
#   docker build -t surgeon .                                  # CPU torch + onnxruntime (default)
#   docker build --build-arg VARIANT=cuda -t surgeon:cuda .    # CUDA torch + onnxruntime-gpu (the gpu extra);
#                                                              # run it with `docker run --gpus all ...`
#   docker run -d -p 50051:50051 -v surgeon-exports:/exports \
#       -v $HOME/models:/models:ro -v $HOME/data:/data:ro --stop-timeout 40 surgeon [--max-jobs 2 ...]
#
# Requests name models under /models (local-dir:NAME) and data under /data; everything the service writes
# lands in the /exports volume. Extra arguments after the image name are appended to `surgeon serve`.

ARG PYTHON_VERSION=3.11

# ---- build: a virtual environment with torch and surgeon[serve] ----
FROM python:${PYTHON_VERSION}-slim AS build
# cpu: CPU wheels of torch and the onnx extra (onnxruntime); cuda: CUDA wheels of torch and the gpu extra
# (onnxruntime-gpu; the two onnxruntimes cannot be installed together). PyPI's x86_64 torch wheels are the
# CUDA builds and bring their own CUDA libraries (nvidia-* wheels, which onnxruntime-gpu preloads too): the
# host needs only the NVIDIA driver and the container toolkit. TORCH_INDEX_URL picks another build.
ARG VARIANT=cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN set -eu; \
    case "$VARIANT" in \
      cpu)  index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
      cuda) index="${TORCH_INDEX_URL:-https://pypi.org/simple}" ;; \
      *) echo "VARIANT must be cpu or cuda, not $VARIANT" >&2; exit 1 ;; \
    esac; \
    pip install --index-url "$index" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
WORKDIR /src
COPY . .
RUN set -eu; \
    extras="onnx,serve"; [ "$VARIANT" = cuda ] && extras="gpu,serve"; \
    pip install "/src[${extras}]"

# ---- runtime: the environment only, as a non-root user ----
FROM python:${PYTHON_VERSION}-slim AS runtime
RUN useradd --create-home --uid 10001 surgeon \
    && mkdir -p /exports /models /data \
    && chown surgeon:surgeon /exports
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SURGEON_EXPORTS_DIR=/exports \
    SURGEON_CACHE_DIR=/home/surgeon/.cache/surgeon
USER surgeon
WORKDIR /home/surgeon
EXPOSE 50051
VOLUME ["/exports"]
# grpc.health.v1 on the service (no token needed for health checks). With --tls-cert, replace this check
# (docker run --health-cmd ...) by one that opens a TLS channel.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; ch = grpc.insecure_channel('127.0.0.1:50051'); r = g.HealthStub(ch).Check(h.HealthCheckRequest(service='surgeon.v1.Surgeon'), timeout=5); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"]
# SIGTERM drains: running jobs get --grace seconds (default 20) to finish, then are cancelled and their
# partial outputs removed; give `docker stop` a longer timeout than that (--stop-timeout 40 above).
STOPSIGNAL SIGTERM
ENTRYPOINT ["surgeon", "serve", "--host", "0.0.0.0", "--port", "50051", "--exports-root", "/exports", "--models-root", "/models", "--data-root", "/data"]
CMD []
