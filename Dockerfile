# Curia Node image: the node (listener, watcher, API, embedded worker) or, with
# `curia-node worker`, a pipeline worker. PyTorch's default Linux wheels include CUDA, so the
# same image uses a GPU when run with one (docker run --gpus all ...).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    CURIA_DATA_DIR=/data \
    CURIA_API__HOST=0.0.0.0

RUN useradd --system --create-home --uid 10001 curia \
 && mkdir -p /data && chown curia /data

WORKDIR /opt/curia-node
COPY setup.cfg pyproject.toml README.md ./
COPY node ./node
COPY pipelines ./pipelines
COPY sr_templates ./sr_templates
COPY migrations ./migrations
RUN pip install "torch==2.14.1" "torchvision==0.29.1" && pip install -e .

USER curia
VOLUME ["/data"]
EXPOSE 11112 8080
ENTRYPOINT ["curia-node"]
CMD ["run"]
