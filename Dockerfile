# syntax=docker/dockerfile:1
# EBCA Serve API image: FastAPI under uvicorn, no torch (the API never imports it).
# Build: docker build -t ebca-serve-api .      Run: see docker-compose.yml and docs/DEPLOY.md.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 ebca \
    && useradd --system --uid 10001 --gid ebca --create-home --home-dir /home/ebca ebca

WORKDIR /app

# Dependencies first (their layer is reused until pyproject.toml changes): the `api` extra only, read
# from pyproject.toml, so torch/diffusers never enter this image.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['api']))" > /tmp/api-requirements.txt \
    && pip install --requirement /tmp/api-requirements.txt \
    && rm /tmp/api-requirements.txt

# The project itself (the API's two packages only) without its torch-bearing core dependencies.
COPY api ./api
COPY ebca_common ./ebca_common
RUN pip install --no-deps . \
    && python -c "import api.main" \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"

USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]
CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers", "--forwarded-allow-ips", "*"]
