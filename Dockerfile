# One image for every service; compose.yaml picks the service with the command.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY domain domain
COPY projections projections
COPY infra infra
COPY services services
RUN pip install --no-cache-dir . \
 && useradd --system --create-home pipelines \
 && mkdir -p /data && chown pipelines /data
USER pipelines
ENV PIPELINES_DATA_DIR=/data \
    PIPELINES_API_HOST=0.0.0.0 \
    PIPELINES_GATEWAY_HOST=0.0.0.0
CMD ["python", "-m", "services.api"]
