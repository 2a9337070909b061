# syntax=docker/dockerfile:1
# ddk teacher: `ddk teacher serve` on vLLM (GPU). Build from the repository root:
#   docker build -f deploy/docker/teacher.Dockerfile -t ddk/teacher:0.1.0 .
# No weights inside: mount the model directory (default /models/teacher) or a Hugging Face cache.
# The tag moves with constraints.txt (vllm==...) and pyproject's `gpu` extra; the test suite checks.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    HOME=/home/ddk \
    HF_HOME=/home/ddk/.cache/huggingface

WORKDIR /opt/ddk
COPY pyproject.toml README.md ./
COPY services ./services
COPY deploy/docker/constraints.txt deploy/docker/pins.py /opt/ddk/build/
# Keep the image's vLLM / torch / CUDA stack exactly as shipped (pins.py --keep-installed) and add
# only what ddk needs on top; pip fails the build rather than replace any of them.
RUN python3 build/pins.py build/constraints.txt --keep-installed > /tmp/pins.txt \
 && python3 -m pip install --no-cache-dir -c /tmp/pins.txt ".[gpu]" \
 && rm -f /tmp/pins.txt \
 && useradd --create-home --home-dir /home/ddk --uid 10001 --shell /usr/sbin/nologin ddk \
 && mkdir -p /models /home/ddk/.cache/huggingface \
 && chown -R ddk:ddk /home/ddk

USER ddk
EXPOSE 8100
# vLLM takes minutes to load and compile a large model: a long start period before failures count.
HEALTHCHECK --interval=15s --timeout=5s --start-period=900s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8100/healthz', timeout=4)"]
ENTRYPOINT ["ddk"]
# 0.0.0.0: other containers and pods reach the teacher over the network, not loopback.
CMD ["teacher", "serve", "--model", "/models/teacher", "--backend", "vllm", "--host", "0.0.0.0", "--port", "8100"]
