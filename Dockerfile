# syntax=docker/dockerfile:1
# The radloop image. Every radloop process of a deployment runs from it — the gateway
# (`radloop listen`), the workers (`radloop worker --queue annotate|train`), the review service
# (`radloop review serve`) — and so does the MLflow server (entrypoint `mlflow`), so all of
# them run the same code: Prefect task keys hash the function source, submitters and workers
# must match. See docs/operations.md, "From one host to a cluster".
#
#   docker build -t radloop:0.1.0 .        # torch from PyPI: the CUDA build, for GPU hosts
#   docker build -t radloop:0.1.0-cpu \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .   # smaller, no GPU
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- the OHIF viewer the review service hosts: the release scripts/bootstrap pins, with the
# same integrity (tests/test_deploy.py keeps the three in step with radloop.settings).
FROM ${PYTHON_IMAGE} AS ohif
ARG OHIF_VERSION=3.13.2
ARG OHIF_INTEGRITY=sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA==
ARG NPM_REGISTRY=https://registry.npmjs.org
COPY deploy/docker/fetch_ohif.py /tmp/fetch_ohif.py
RUN python /tmp/fetch_ohif.py --version "${OHIF_VERSION}" --integrity "${OHIF_INTEGRITY}" \
      --registry "${NPM_REGISTRY}" --to /ohif

# --- radloop
FROM ${PYTHON_IMAGE}
ARG TORCH_VERSION=2.13.0
# Empty: PyPI (CUDA build on x86-64 Linux). https://download.pytorch.org/whl/cpu: CPU only.
ARG TORCH_INDEX_URL=
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TCP_NODELAY=1

# dcmtk: `/usr/bin/echoscu` and `/usr/bin/storescu` to check a DICOM path from inside the
# gateway (pynetdicom's scripts of the same names come first on PATH). tini: PID 1 that
# passes SIGTERM on and reaps children (Prefect runs flows in child processes).
RUN apt-get update \
 && apt-get install -y --no-install-recommends dcmtk tini \
 && rm -rf /var/lib/apt/lists/*

# torch first and pinned: anything pulling an unpinned torch later would fetch another build;
# `pip install .` then finds torch==2.13.0 satisfied. (hadolint cannot see the pin in the ARG.)
# hadolint ignore=DL3013
RUN pip install "torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "${TORCH_INDEX_URL}"}

WORKDIR /src
COPY pyproject.toml README.md ./
COPY radloop ./radloop
COPY dicom_listener ./dicom_listener
COPY agents ./agents
COPY flows ./flows
COPY model_registry ./model_registry
RUN pip install . \
 && rm -rf /src/build /src/*.egg-info

# Not part of the wheel: the settings file (every key documented) and the model specs.
COPY configs /opt/radloop/configs
COPY --from=ohif /ohif /opt/radloop/ohif
COPY --chmod=755 deploy/docker/healthcheck.py /usr/local/bin/radloop-healthcheck

# The shared directory (RADLOOP_DATA_DIR) and the model repository (RADLOOP_TRITON__REPOSITORY)
# exist in the image, owned by the radloop user, so a new Docker volume starts with them.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/radloop radloop \
 && mkdir -p /srv/radloop/model-repository /srv/radloop/prefect-results \
      /srv/radloop/mlflow-artifacts /models \
 && chown -R radloop:radloop /srv/radloop /models
ENV RADLOOP_CONFIG=/opt/radloop/configs/radloop.yaml \
    RADLOOP_MODELS_DIR=/opt/radloop/configs/models \
    RADLOOP_REVIEW__OHIF_DIR=/opt/radloop/ohif \
    RADLOOP_DATA_DIR=/srv/radloop \
    RADLOOP_TRITON__REPOSITORY=/models

# Numeric, so Kubernetes can check runAsNonRoot.
USER 10001:10001
WORKDIR /home/radloop
# DICOM SCP (gateway), review service, MLflow.
EXPOSE 11112 8080 5000
ENTRYPOINT ["/usr/bin/tini", "--", "radloop"]
CMD ["--help"]
