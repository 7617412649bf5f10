# databroker sidecar image.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/databroker databroker \
    && mkdir -p /var/lib/databroker/outbox && chown -R databroker /var/lib/databroker
COPY --from=build /install /usr/local
USER databroker
WORKDIR /var/lib/databroker
ENV DATABROKER_OUTBOX_DIR=/var/lib/databroker/outbox \
    PYTHONUNBUFFERED=1
EXPOSE 8787
# Bind to all interfaces inside the pod only; the pod's network policy keeps it local.
CMD ["databroker", "serve", "--host", "0.0.0.0", "--port", "8787"]
