# The training image of morer1: the checkout at one commit in /opt/morer1 (with its git metadata: the stage flow
# refuses a checkout at another commit than the pipeline's) and its .venv built by `make cluster-install` (the stack
# plus the `cluster` extra: its own CUDA torch/torchvision wheels from PyPI, vllm, deepspeed, dvc-s3). It runs
# the flow runs of the deployment morer1-stage/gpu-k8s (prefect.yaml; infra/k8s/README.md). Build it from the
# repository root at the commit the pipeline runs, and tag it with that commit:
#
#   docker build -f infra/docker/train.Dockerfile -t REGISTRY/morer1-train:$(git rev-parse --short HEAD) .
#   docker push REGISTRY/morer1-train:$(git rev-parse --short HEAD)
#
# Only the context's .git is used (the root .dockerignore keeps the rest out): the image holds a
# fresh clone of HEAD, so uncommitted changes, untracked files, the workspace's data and the build machine's git
# remotes and credentials stay out; commit first. The build needs PyPI and Debian's mirrors. No credential is
# baked in: MLflow, the DVC remote and the Prefect API get theirs from env variables at run time (the Kubernetes
# Secret of infra/k8s/gpu-pool-template.json). A worktree checkout (.git is a file) cannot be built from; clone.
# python:3.11 (the project wants 3.11) rather than a CUDA base: torch's wheels bring the CUDA libraries, the node's
# driver comes through the NVIDIA container runtime. build-essential: Triton (torch.compile, vLLM) compiles small
# C launchers at run time. Not built or run here (no image registry from the machine this was written on).

FROM python:3.11-slim-bookworm AS source
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends git \
 && rm -rf /var/lib/apt/lists/*
COPY .git /src/.git
RUN git clone --quiet --no-checkout /src/.git /opt/morer1 \
 && git -C /opt/morer1 -c advice.detachedHead=false checkout --quiet --detach "$(git -C /src rev-parse HEAD)" \
 && git -C /opt/morer1 remote remove origin

FROM python:3.11-slim-bookworm
# Debian's packages unpinned (DL3008): the base image's release fixes their versions, security updates go in.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends git make build-essential \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 1000 morer1 \
 && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash morer1 \
 && git config --system --add safe.directory /opt/morer1 \
 && install -d -o 1000 -g 1000 /opt/morer1
COPY --from=source --chown=1000:1000 /opt/morer1 /opt/morer1
USER 1000:1000
WORKDIR /opt/morer1
# The same install as on a GPU node; the package caches are not kept.
RUN make cluster-install \
 && rm -rf /home/morer1/.cache \
 && mkdir -p .state/checkpoints \
 && test -z "$(git status --porcelain --untracked-files=no)"
# The Makefile's defaults, for processes started without make (the worker runs `prefect flow-run execute`).
ENV PATH=/opt/morer1/.venv/bin:$PATH \
    MORER1_STATE_DIR=/opt/morer1/.state \
    PREFECT_HOME=/opt/morer1/.state/prefect \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    GX_ANALYTICS_ENABLED=false \
    HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1
