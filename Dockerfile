# Fleet image for x86 boxes: CPU by default; `--build-arg FLAVOR=cuda` builds on the CUDA runtime image
# with onnxruntime-gpu (TensorRT EP needs TensorRT libraries in the base: use a TensorRT base for that).
ARG FLAVOR=cpu
ARG CPU_BASE=python:3.11-slim-bookworm
ARG CUDA_BASE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04

FROM ${CPU_BASE} AS base-cpu
ENV EXTRAS="" \
    BUILD_PKGS="gcc libc6-dev"

FROM ${CUDA_BASE} AS base-cuda
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV EXTRAS="[gpu]" \
    BUILD_PKGS="gcc libc6-dev python3-dev"

# hadolint ignore=DL3006
FROM base-${FLAVOR} AS build
# A C compiler for the Rank path's loops and the sequence encoder (setup.py); only this stage has it.
# hadolint ignore=DL3008,SC2086
RUN apt-get update && apt-get install -y --no-install-recommends ${BUILD_PKGS} \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/appliance/src
COPY pyproject.toml setup.py README.md ./
COPY proto ./proto
COPY appliance ./appliance
COPY models ./models
COPY pipelines ./pipelines
COPY firmware_configs ./firmware_configs
RUN python3 -m venv /opt/appliance/venv \
    && /opt/appliance/venv/bin/pip install --no-cache-dir -e ".${EXTRAS}" "grpcio-tools>=1.78,<1.79" \
    && /opt/appliance/venv/bin/python -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. \
         proto/appliance/v1/*.proto \
    && /opt/appliance/venv/bin/pip uninstall -y grpcio-tools \
    && /opt/appliance/venv/bin/python -c "import appliance.ranking._rankcore, appliance.ranking._seqcore" \
    && /opt/appliance/venv/bin/appliance models verify

# hadolint ignore=DL3006
FROM base-${FLAVOR}
RUN apt-get update && apt-get install -y --no-install-recommends \
        gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --groups video --create-home appliance \
    && install -d -o appliance -g appliance /var/lib/appliance /run/appliance
COPY --from=build /opt/appliance /opt/appliance
ENV PATH=/opt/appliance/venv/bin:$PATH \
    APPLIANCE_DATA_DIR=/var/lib/appliance \
    APPLIANCE_RUN_DIR=/run/appliance \
    APPLIANCE_CONFIG=/opt/appliance/src/firmware_configs/cpu-only.yaml
VOLUME ["/var/lib/appliance", "/run/appliance"]
USER 10001
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["appliance", "health"]
ENTRYPOINT ["appliance", "run"]
