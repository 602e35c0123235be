# syntax=docker/dockerfile:1
# keybroker images, multi-stage:
#   build        wheels of keybroker and of exactly the pinned, hashed dependencies (deploy/requirements.lock)
#   runtime      the broker (default target): no compiler, no pip cache, runs as uid 10001
#   kms-standin  the KMS stand-in of docker-compose.yml (moto, pinned); never for production
# Pinned: the base image by exact version (mirror it and pin its @sha256 digest in your
# registry), Debian packages by version, Python packages by the lock files with their SHA-256
# hashes (pip --require-hashes; regenerate with deploy/lock_hashes.py).
# Not built on the development machines (no container engine there): README "Production deployment".

ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
# Every lock is installed in pip's hash-checking mode (--require-hashes): each file pip fetches
# must match a SHA-256 the lock lists (deploy/lock_hashes.py writes them from PyPI), and pip
# refuses any dependency the lock does not pin.
COPY deploy/requirements-build.lock deploy/requirements.lock deploy/
RUN pip install --no-cache-dir --require-hashes -r deploy/requirements-build.lock
# Binary wheels only: nothing is compiled, so the build stage needs no toolchain. pip keeps a
# downloaded wheel byte for byte, so the runtime stage checks the same hashes again.
RUN pip wheel --no-cache-dir --require-hashes --only-binary=:all: --wheel-dir /wheels \
    -r deploy/requirements.lock
COPY pyproject.toml README.md ./
COPY broker broker
# keybroker itself is built here from this source (no hash exists for it); its dependencies are
# not fetched (--no-deps): they are exactly the lock's wheels above.
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /dist .

FROM ${PYTHON_IMAGE} AS runtime
# The PKCS#11 module the broker loads. The default is SoftHSM2 from Debian (installed below);
# for AWS CloudHSM build FROM this image, install its client and pass
#   --build-arg PKCS11_LIBRARY=/opt/cloudhsm/lib/libcloudhsm_pkcs11.so
ARG PKCS11_LIBRARY=/usr/lib/softhsm/libsofthsm2.so
ARG SOFTHSM2_VERSION=2.6.1-2
RUN apt-get update \
    && apt-get install -y --no-install-recommends "softhsm2=${SOFTHSM2_VERSION}" \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 keybroker \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin keybroker \
    && install -d -o 10001 -g 10001 -m 0700 \
       /var/lib/keybroker /var/lib/keybroker/audit /var/lib/keybroker/approle \
       /var/lib/keybroker/vault-init /var/lib/softhsm/tokens
COPY --from=build /wheels /tmp/wheels
COPY --from=build /dist /tmp/dist
COPY deploy/requirements.lock /tmp/requirements.lock
# No index: only the build stage's wheels, checked against the lock's hashes; then keybroker's
# own wheel without dependencies (all of them came from the lock).
RUN pip install --no-cache-dir --no-index --find-links /tmp/wheels --require-hashes \
       -r /tmp/requirements.lock \
    && pip install --no-cache-dir --no-index --no-deps /tmp/dist/keybroker-0.1.0-py3-none-any.whl \
    && pip check \
    && rm -rf /tmp/wheels /tmp/dist /tmp/requirements.lock
ENV KEYBROKER__HSM__LIBRARY=${PKCS11_LIBRARY} \
    SOFTHSM2_CONF=/etc/keybroker/softhsm2.conf \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8443
ENTRYPOINT ["keybroker"]
CMD ["serve", "--config", "/etc/keybroker/broker.toml"]

FROM runtime AS kms-standin
USER 0:0
COPY deploy/requirements-kms-standin.lock /tmp/requirements-kms-standin.lock
RUN pip install --no-cache-dir --require-hashes --only-binary=:all: -r /tmp/requirements-kms-standin.lock \
    && rm /tmp/requirements-kms-standin.lock \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/kms
USER 10001:10001
EXPOSE 4566
ENTRYPOINT ["python", "-m", "broker.devstack.kms_server"]
CMD ["--host", "0.0.0.0", "--port", "4566", "--state", "/var/lib/kms/state.pickle"]
