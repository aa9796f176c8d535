# One image for every rdbroker service: `rdbroker broker|migrate|apply|proxy|health ...`.
# Build:  docker build -t rdbroker:0.1.0 .
# Run:    docker run --rm rdbroker:0.1.0 proxy --help

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: build the wheel and install it with its dependencies into a virtualenv -------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/build \
 && /opt/build/bin/pip install build
# Only what the wheel is made of (see .dockerignore): the generated gRPC code is committed.
COPY pyproject.toml README.md ./
COPY cli ./cli
COPY libs ./libs
COPY services ./services
# The root filesystem is read-only at run time, so everything is byte-compiled here.
RUN /opt/build/bin/python -m build --wheel --outdir /wheels . \
 && python -m venv /opt/rdbroker \
 && /opt/rdbroker/bin/pip install /wheels/rdbroker-*.whl \
 && /opt/rdbroker/bin/python -m compileall -q /opt/rdbroker/lib

# --- runtime: the same Python base, the virtualenv, nothing to build with -----------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 rdbroker \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin rdbroker
COPY --from=builder /opt/rdbroker /opt/rdbroker
ENV PATH=/opt/rdbroker/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /tmp
# Numeric, so Kubernetes can check runAsNonRoot without reading /etc/passwd.
USER 10001:10001
# RDP (proxy), broker gRPC, health gRPC, proxy probe gRPC, broker REST.
EXPOSE 3389 50051 50052 50053 8080
ENTRYPOINT ["rdbroker"]
CMD ["--help"]
