# The tlserve server image.
#   docker build -t tlserve .
#   tlserve token deployer admin         # prints a token and its tokens-file line; put the line in ./tokens
#   docker run -p 50051:50051 -p 9464:9464 -v tlserve-home:/var/lib/tlserve \
#     -v "$PWD/tokens:/etc/tlserve/auth/tokens:ro" -e TLSERVE_AUTH_TOKENS_FILE=/etc/tlserve/auth/tokens tlserve
# It listens on 0.0.0.0, so it refuses to start without a tokens file (or an
# explicit TLSERVE_INSECURE=1). TLS: TLSERVE_TLS_CERT_FILE / TLSERVE_TLS_KEY_FILE.
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
COPY tlserve/ tlserve/
COPY client/ client/
COPY service/ service/
RUN pip install -c constraints.txt ".[server]" \
    && useradd --system --uid 10001 --home-dir "$TLSERVE_HOME" --create-home tlserve

USER 10001
VOLUME ["/var/lib/tlserve"]
EXPOSE 50051 9464
# SIGTERM drains: health goes NOT_SERVING, in-flight calls get TLSERVE_GRACE_SECONDS.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "tlserve.service"]
