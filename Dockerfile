# One image for every service; compose.yaml picks the service with the command.
# It carries git (Git-backed pipelines clone and push) and no embedded PostgreSQL or NATS: those are
# the `embedded` extra of development (`make up`); compose.yaml runs the stock images.
FROM python:3.11-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends git \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# Every dependency pinned (`make lock`), in a layer of its own that code changes do not rebuild.
COPY requirements.lock ./
RUN pip install --no-cache-dir -r requirements.lock
COPY pyproject.toml README.md ./
COPY domain domain
COPY projections projections
COPY infra infra
COPY services services
RUN pip install --no-cache-dir --no-deps . \
 && useradd --system --create-home pipelines \
 && mkdir -p /data && chown pipelines /data
USER pipelines
ENV PIPELINES_DATA_DIR=/data \
    PIPELINES_API_HOST=0.0.0.0 \
    PIPELINES_GATEWAY_HOST=0.0.0.0
CMD ["python", "-m", "services.api"]
