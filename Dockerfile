# The tlserve server image.
#   docker build -t tlserve .
#   docker run -p 50051:50051 -p 9464:9464 -v tlserve-home:/var/lib/tlserve tlserve
# The torch wheel pinned in constraints.txt is a CUDA build: the same image runs
# on CPU nodes and, with the NVIDIA container runtime, on GPU nodes.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TLSERVE_HOME=/var/lib/tlserve \
    TLSERVE_GRPC_ADDRESS=0.0.0.0:50051 \
    TLSERVE_METRICS_ADDRESS=0.0.0.0:9464

WORKDIR /opt/tlserve
# Dependencies first, so code changes don't reinstall torch.
COPY pyproject.toml constraints.txt README.md ./
COPY client/ client/
COPY service/ service/
RUN pip install -c constraints.txt ".[server]" \
    && useradd --system --uid 10001 --home-dir "$TLSERVE_HOME" --create-home tlserve

USER 10001
VOLUME ["/var/lib/tlserve"]
EXPOSE 50051 9464
# SIGTERM drains: health goes NOT_SERVING, in-flight calls get TLSERVE_GRACE_SECONDS.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "service"]
