# syntax=docker/dockerfile:1
# ddk trainer: Ray (head, workers and the `ddk train` driver) with torch on CUDA. Build from the root:
#   docker build -f deploy/docker/trainer.Dockerfile -t ddk/trainer:0.1.0 .
# The same image runs `ray start --head`, `ray start --address=...` and `ray job submit -- ddk train`,
# and is the image of the KubeRay RayJob. No vLLM here: the teacher is a separate service.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

# The Ray image already runs as its non-root user `ray` (uid 1000) with a user-owned Python env.
USER ray
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/home/ray/.cache/huggingface

WORKDIR /home/ray/ddk
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users services ./services
COPY --chown=ray:users deploy/docker/constraints.txt ./build/
# torch from PyPI is the CUDA build on Linux x86_64; ray stays at the image's version (pinned).
RUN pip install --no-cache-dir -c build/constraints.txt torch ".[base]" \
 && mkdir -p /home/ray/.cache/huggingface
# Mount points owned by `ray`, so that a fresh named volume there is writable for it.
USER root
RUN mkdir -p /outputs /workspace && chown ray:users /outputs /workspace
USER ray

EXPOSE 6379 8265 10001
# Healthy once this container's Ray node has joined a cluster whose GCS answers.
HEALTHCHECK --interval=10s --timeout=8s --start-period=60s --retries=3 CMD ["ray", "health-check"]
CMD ["ray", "start", "--head", "--port=6379", "--dashboard-host=0.0.0.0", "--dashboard-port=8265", "--block"]
