# Curia Node image: the node (listener, watcher, API) or, with `curia-node worker`, a
# pipeline worker. Built on a CUDA runtime by default so one image serves GPU workers;
# PyTorch's Linux wheels bring their own CUDA libraries, so the same image also runs on a
# machine without a GPU (inference falls back to the CPU). For a smaller CPU-only image:
#   docker build --build-arg BASE=python:3.11-slim-bookworm -t curia-node:cpu .
ARG BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# Stage 1: build the node's wheel on the runtime's own base and Python: the wheel carries five
# compiled modules (node.dimse._receive, the listener's data set receiver, node.store._flush,
# its journal's writer and group commit, node.store._scan, its header walk,
# node.store._filing, its spool files' batch writer, and node.catalogue._uid_lookup, its
# SQLite catalogue lookup), built for the Python that runs
# them, and the migrations, SR templates and dashboard as package data, so the image needs
# no sources. Without a compiler the wheel still builds, doing the same in Python.
FROM ${BASE} AS wheel
ENV DEBIAN_FRONTEND=noninteractive PATH=/opt/build/bin:$PATH
RUN apt-get update \
 && if ! command -v python3 >/dev/null 2>&1 || ! python3 -c "import venv" 2>/dev/null; then \
      apt-get install -y --no-install-recommends python3 python3-venv python3-dev; \
    fi \
 && apt-get install -y --no-install-recommends gcc libc6-dev libsqlite3-dev \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/build \
 && pip install --no-cache-dir --upgrade pip setuptools wheel
WORKDIR /src
COPY setup.py setup.cfg pyproject.toml README.md ./
COPY node ./node
COPY pipelines ./pipelines
COPY sr_templates ./sr_templates
COPY migrations ./migrations
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# Stage 2: the runtime, with the wheel installed (not an editable checkout).
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH \
    CURIA_DATA_DIR=/data \
    CURIA_API__HOST=0.0.0.0

# The CUDA base has no Python; the python base has it (and needs nothing here).
RUN if ! command -v python3 >/dev/null 2>&1 || ! python3 -c "import venv" 2>/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3 -m venv /opt/venv \
 && useradd --system --create-home --uid 10001 curia \
 && mkdir -p /data && chown curia /data

# PyTorch first, pinned, so that installing the node pulls no other (multi-GB) build.
COPY --from=wheel /dist /tmp/dist
RUN pip install "torch==2.14.1" "torchvision==0.29.1" \
 && pip install "$(ls /tmp/dist/curia_node-*.whl)[gpu]" flower \
 && rm -rf /tmp/dist

USER curia
WORKDIR /home/curia
VOLUME ["/data"]
EXPOSE 11112 8080
HEALTHCHECK --interval=30s --timeout=5s CMD python3 -c "import urllib.request,os; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('CURIA_API__PORT', '8080') + '/readyz')" || exit 1
ENTRYPOINT ["curia-node"]
CMD ["run"]
