# BGE-M3 embeddings on an NVIDIA GPU (ONNX fp16, CUDA execution provider), served by uvicorn on
# $PORT: Cloud Run with an L4, or any Docker host with the NVIDIA container runtime. Build from
# the repository root (Cloud Run is x86_64 only):
#
#   docker buildx build -f infra/gpu.Dockerfile --platform linux/amd64 -t bge-m3-gpu .
#   docker run --gpus all -p 8080:8080 bge-m3-gpu
#
# Versions, and why (Cloud Run's L4 runs driver 535, i.e. CUDA 12.2):
#   - onnxruntime-gpu 1.26.0: the newest release on PyPI built for CUDA 12 (+ cuDNN 9). From 1.27.0
#     PyPI's onnxruntime-gpu is built for CUDA 13, which needs driver >= 580 and does not load on
#     535 at all; the service would fall back to CPU.
#   - nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04: CUDA 12 runtime libraries (cudart, cuBLAS,
#     cuFFT, cuRAND) and cuDNN 9, the libraries that build of onnxruntime links, and Ubuntu 24.04 for
#     Python 3.12 (22.04 only has 3.10, or a 3.11 release candidate). CUDA 12.x libraries run on
#     any driver >= 525.60.13 through CUDA minor-version compatibility, which onnxruntime documents
#     for its CUDA 12 builds ("compatible with any CUDA 12.x"); 12.2-era images carry cuDNN 8 only,
#     which onnxruntime >= 1.19 cannot use. Minor-version compatibility excludes JIT-compiling
#     newer PTX; the L4 (sm_89, Ada) runs the compiled Ampere/Ada code in onnxruntime's wheels.
#     If the NVIDIA container runtime of a 535 host refuses the image ("unsatisfied condition:
#     cuda>=12.6"), run it with -e NVIDIA_DISABLE_REQUIRE=1: the libraries themselves run there.
#
# Build arguments: BASE_IMAGE (the CUDA base; CI passes a Debian stand-in), ORT_PACKAGE (CI swaps
# in onnxruntime==1.26.0, the CPU build of the same version: no CUDA here, and the service then
# falls back to CPU with a logged warning), and MODEL_* / MODEL_BUILD_ARGS / MODEL_STAGE /
# MODEL_DIR / WHEELS_DIR / TORCH_INDEX_URL as in infra/lambda.Dockerfile (precision fp16 here).

ARG BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
ARG MODEL_STAGE=model-build

FROM ${BASE_IMAGE} AS python-base
COPY infra/scripts/ensure_python.sh /usr/local/bin/
RUN ensure_python.sh

# ---- model, option 1: export it here (fp16 needs no GPU to build) ----
FROM python-base AS model-build
ARG WHEELS_DIR=infra/wheels
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /build
COPY requirements.txt requirements-build.txt ./
COPY infra/scripts/install_deps.sh infra/scripts/
COPY ${WHEELS_DIR}/ /wheels/
RUN infra/scripts/install_deps.sh build --target /build/site --requirements requirements-build.txt \
        --wheels /wheels --torch-index "${TORCH_INDEX_URL}" \
    && rm -rf /wheels
ARG MODEL_ID=BAAI/bge-m3
ARG MODEL_REVISION=5617a9f61b028005a4858fdac845db406aefb181
ARG MODEL_RECIPE=bge-m3
ARG MODEL_PRECISION=fp16
ARG MODEL_BUILD_ARGS=""
COPY infra/scripts/build_model.sh infra/scripts/fix_permissions.sh infra/scripts/
COPY handler/ handler/
COPY model_build/ model_build/
ENV PYTHONPATH=/build/site HF_HUB_DISABLE_TELEMETRY=1
RUN MODEL_BUILD_ROOT=/build infra/scripts/build_model.sh --out /model \
        --source "${MODEL_ID}" --revision "${MODEL_REVISION}" \
        --recipe "${MODEL_RECIPE}" --precision "${MODEL_PRECISION}"

# ---- model, option 2: a directory built beforehand, from the build context ----
FROM python-base AS model-prebuilt
ARG MODEL_DIR=models/bge-m3-fp16
COPY ${MODEL_DIR}/ /model/
COPY infra/scripts/fix_permissions.sh /usr/local/bin/
RUN fix_permissions.sh /model

FROM ${MODEL_STAGE} AS model

# ---- runtime dependencies: requirements.txt with onnxruntime swapped for ORT_PACKAGE ----
FROM python-base AS deps
ARG WHEELS_DIR=infra/wheels
ARG ORT_PACKAGE=onnxruntime-gpu==1.26.0
COPY requirements.txt /deps/
COPY infra/scripts/install_deps.sh infra/scripts/check_arch.sh infra/scripts/check_no_torch.sh /deps/scripts/
COPY ${WHEELS_DIR}/ /deps/wheels/
RUN /deps/scripts/check_arch.sh x86_64 \
    && /deps/scripts/install_deps.sh runtime --target /deps/site --ort "${ORT_PACKAGE}" \
        --requirements /deps/requirements.txt --wheels /deps/wheels \
    && /deps/scripts/check_no_torch.sh /deps/site

FROM python-base AS code
COPY handler/ /code/handler/
COPY infra/scripts/fix_permissions.sh /usr/local/bin/
RUN python3 -m compileall -q --invalidation-mode checked-hash /code \
    && fix_permissions.sh /code

# ---- runtime: base -> dependencies -> model -> code ----
FROM python-base AS runtime
WORKDIR /app
# PORT: Cloud Run sets it (8080); elsewhere this default applies. DEVICE=cuda selects the CUDA
# execution provider, with a logged fallback to CPU when no usable GPU is there. MODEL_VERIFY and
# HF_HUB_OFFLINE: as in infra/lambda.Dockerfile. HOME: the non-root user has no home directory.
# HOST: every interface of the container (handler.main alone listens on loopback only).
ENV HOST=0.0.0.0 \
    PORT=8080 \
    DEVICE=cuda \
    MODEL_PATH=/opt/model \
    MODEL_VERIFY=size \
    HF_HUB_OFFLINE=1 \
    PYTHONPATH=/app \
    HOME=/tmp
COPY --from=deps /deps/site/ /app/
COPY --from=model /model/ /opt/model/
COPY --from=code /code/ /app/
# The one full check of every baked file against its manifest sha256 (the runtime checks sizes).
RUN PYTHONDONTWRITEBYTECODE=1 python3 -m handler.engine.verify /opt/model --mode sha256
USER 1000:1000
EXPOSE 8080
CMD ["python3", "-m", "handler.main"]
