# syntax=docker/dockerfile:1
# ddk controller: `ddk controller serve` (CPU only, small). Build from the repository root:
#   docker build -f deploy/docker/controller.Dockerfile -t ddk/controller:0.1.0 .
# State: the SQLite file under /var/lib/ddk (mount a volume there). Token: a mounted file.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/ddk
COPY pyproject.toml README.md ./
COPY services ./services
COPY deploy/docker/constraints.txt /opt/ddk/build/
# The core package plus the HTTP stack; no torch, Ray or vLLM (the controller is arithmetic + SQLite).
RUN pip install --no-cache-dir -c build/constraints.txt . fastapi uvicorn httpx prometheus-client \
 && useradd --create-home --uid 10001 --shell /usr/sbin/nologin ddk \
 && mkdir -p /var/lib/ddk \
 && chown ddk:ddk /var/lib/ddk

USER ddk
VOLUME ["/var/lib/ddk"]
EXPOSE 8200
HEALTHCHECK --interval=10s --timeout=4s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8200/healthz', timeout=3)"]
ENTRYPOINT ["ddk"]
# 0.0.0.0: the trainer reaches the controller from other containers and pods.
CMD ["controller", "serve", "--db", "/var/lib/ddk/controller.sqlite", "--host", "0.0.0.0", "--port", "8200"]
