# databroker sidecar image. tests/test_image.py runs these same steps without a Docker
# daemon: wheel from the build context, dependencies from the lock by hash, then
# `databroker --version`, `migrate` and `serve` from the resulting environment.

# python:3.11.14-slim-bookworm, pinned by digest: the tag is for people, the digest is what
# is pulled. Move both together, and regenerate the locks (`make lock`) for a new Python.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
# Every file pip installs is checked against a hash in a lock, the build backend included;
# wheels only: no sdist is built, so nothing unhashed is fetched to build one.
COPY requirements-build.lock requirements.lock ./
RUN python -m venv --without-pip /opt/build \
    && python -m venv --without-pip /opt/databroker \
    && pip --python /opt/build/bin/python install --no-cache-dir --require-hashes \
        --only-binary :all: --no-deps -r requirements-build.lock \
    && pip --python /opt/databroker/bin/python install --no-cache-dir --require-hashes \
        --only-binary :all: --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip --python /opt/build/bin/python wheel --no-cache-dir --no-build-isolation --no-deps \
        --wheel-dir /dist . \
    && pip --python /opt/databroker/bin/python install --no-cache-dir --no-deps /dist/*.whl \
    && pip --python /opt/databroker/bin/python check

FROM ${PYTHON_IMAGE}
# Numeric ids: Kubernetes' runAsNonRoot can only verify a number, never a name.
RUN groupadd --system --gid 10001 databroker \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /var/lib/databroker --shell /usr/sbin/nologin databroker \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/databroker /var/lib/databroker/outbox
COPY --from=build /opt/databroker /opt/databroker
ENV PATH=/opt/databroker/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DATABROKER_OUTBOX_DIR=/var/lib/databroker/outbox
WORKDIR /var/lib/databroker
USER 10001:10001
EXPOSE 8787
ENTRYPOINT ["databroker"]
# All interfaces of the container: in a pod, prefer `serve --uds` on a shared emptyDir
# (deploy/kubernetes), which no other pod can reach.
CMD ["serve", "--host", "0.0.0.0", "--port", "8787"]
