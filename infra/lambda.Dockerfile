# BGE-M3 embeddings on AWS Lambda (CPU, ONNX int8). Build from the repository root:
#
#   docker buildx build -f infra/lambda.Dockerfile --platform linux/amd64 \
#       --provenance=false --sbom=false -t bge-m3-lambda .          (linux/arm64 for Graviton)
#
# Lambda rejects images pushed with attestations, hence --provenance=false --sbom=false.
# `sam build --use-buildkit` runs the same build from template.yaml.
#
# Build arguments (all optional):
#   BASE_IMAGE       runtime base; default the AWS Lambda Python 3.12 base (Amazon Linux 2023:
#                    the python3.11 base is Amazon Linux 2, glibc 2.26, too old for the
#                    onnxruntime and numpy wheels, which need glibc 2.28). CI passes a local
#                    Debian stand-in, which has no Lambda runtime interface client.
#                    SnapStart (template.yaml): this base's runtime runs the hooks that
#                    handler/snapstart.py registers with its bundled snapshot_restore_py. Another
#                    base needs, as ENTRYPOINT, a runtime interface client that implements
#                    SnapStart's restore API (awslambdaric does, and depends on
#                    snapshot_restore_py). No `com.amazonaws.lambda.feature.snapstart` label
#                    here: it would let Lambda snapshot an image whose restore hooks never run.
#   BUILD_BASE_IMAGE where the model is exported (torch CPU); default BASE_IMAGE.
#   ARCH             x86_64 | arm64: asserted against the build platform (TARGETARCH, set by
#                    BuildKit from --platform, is used when ARCH is empty).
#   MODEL_ID, MODEL_REVISION, MODEL_RECIPE, MODEL_PRECISION
#                    what the build stage exports: BAAI/bge-m3 at a pinned revision, recipe
#                    bge-m3, int8. MODEL_BUILD_ARGS: more `python -m model_build` options.
#   MODEL_STAGE      model-build (default: export in the build stage) or model-prebuilt (copy
#                    MODEL_DIR, a directory made beforehand by `python -m model_build --out DIR`,
#                    from the build context: build once, bake into many images).
#   MODEL_DIR        with MODEL_STAGE=model-prebuilt: the model directory, relative to the context.
#   WHEELS_DIR       a directory of wheels in the context; when it holds any, every pip install
#                    is offline from it (air-gapped builds, and CI). Default infra/wheels (empty).
#   TORCH_INDEX_URL  where the build stage gets torch: the CPU-only index (no CUDA downloads).
#
# BuildKit builds only the stages the result needs, so MODEL_STAGE=model-prebuilt never runs
# the torch stage. The classic builder (DOCKER_BUILDKIT=0, `sam build` without --use-buildkit)
# runs every stage and needs the hub even then.
#
# Layers, in the order Lambda's lazy loading wants them (each a single COPY into the runtime):
# base -> dependencies (~0.2 GB) -> model (~0.6 GB int8) -> code (kilobytes). A code change
# re-pushes only the last layer.

ARG BASE_IMAGE=public.ecr.aws/lambda/python:3.12
ARG BUILD_BASE_IMAGE=${BASE_IMAGE}
ARG MODEL_STAGE=model-build

# ---- model, option 1: export it here (torch CPU + transformers; none of it reaches runtime) ----
FROM ${BUILD_BASE_IMAGE} AS model-build
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
ARG MODEL_PRECISION=int8
ARG MODEL_BUILD_ARGS=""
COPY infra/scripts/build_model.sh infra/scripts/fix_permissions.sh infra/scripts/
COPY handler/ handler/
COPY model_build/ model_build/
ENV PYTHONPATH=/build/site HF_HUB_DISABLE_TELEMETRY=1
RUN MODEL_BUILD_ROOT=/build infra/scripts/build_model.sh --out /model \
        --source "${MODEL_ID}" --revision "${MODEL_REVISION}" \
        --recipe "${MODEL_RECIPE}" --precision "${MODEL_PRECISION}"

# ---- model, option 2: a directory built beforehand, from the build context ----
# A shell base (not scratch) so that the files can be made world-readable here, in a stage of
# their own: a chmod in the runtime stage would copy the whole model into a second layer.
FROM ${BASE_IMAGE} AS model-prebuilt
ARG MODEL_DIR=models/bge-m3-int8
COPY ${MODEL_DIR}/ /model/
COPY infra/scripts/fix_permissions.sh /usr/local/bin/
RUN fix_permissions.sh /model

FROM ${MODEL_STAGE} AS model

# ---- runtime dependencies: requirements.txt only, installed into one directory ----
FROM ${BASE_IMAGE} AS deps
ARG WHEELS_DIR=infra/wheels
ARG TARGETARCH
ARG ARCH
COPY requirements.txt /deps/
COPY infra/scripts/install_deps.sh infra/scripts/check_arch.sh infra/scripts/check_no_torch.sh /deps/scripts/
COPY ${WHEELS_DIR}/ /deps/wheels/
RUN /deps/scripts/check_arch.sh "${ARCH:-$TARGETARCH}" \
    && /deps/scripts/install_deps.sh runtime --target /deps/site \
        --requirements /deps/requirements.txt --wheels /deps/wheels \
    && /deps/scripts/check_no_torch.sh /deps/site

# ---- code, compiled once: Lambda's file system is read-only, so without .pyc files every cold
# start would compile the package again. checked-hash stays valid whatever the file times are.
FROM ${BASE_IMAGE} AS code
COPY handler/ /code/handler/
COPY infra/scripts/fix_permissions.sh /usr/local/bin/
RUN python3 -m compileall -q --invalidation-mode checked-hash /code \
    && fix_permissions.sh /code

# ---- runtime ----
FROM ${BASE_IMAGE} AS runtime
ENV LAMBDA_TASK_ROOT=/var/task
WORKDIR /var/task
# MODEL_PATH: the baked model. MODEL_VERIFY=size: the manifest's sha256s were computed from
# these very files when the model was built, and image layers are content-addressed (checked on
# every pull), so hashing ~0.6 GB again at each cold start would only spend seconds of the 10 s
# init budget. HF_HUB_OFFLINE: the runtime never downloads anything. HOST: run as a web server
# (`python3 -m handler.main`: compose, Cloud Run) it must listen on the container's own interfaces,
# not only its loopback, which is handler.main's default; the Lambda entry point ignores it.
ENV MODEL_PATH=/opt/model \
    MODEL_VERIFY=size \
    DEVICE=cpu \
    HOST=0.0.0.0 \
    HF_HUB_OFFLINE=1 \
    PYTHONPATH=/var/task
COPY --from=deps /deps/site/ /var/task/
COPY --from=model /model/ /opt/model/
COPY --from=code /code/ /var/task/
# The one full check of every baked file against its manifest sha256 (the runtime checks sizes).
RUN PYTHONDONTWRITEBYTECODE=1 python3 -m handler.engine.verify /opt/model --mode sha256
CMD ["handler.lambda_function.handler"]
