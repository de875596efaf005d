# The nbexchange service (API and workers: one image, the command chooses).
# The nbgrader plugin is not in it: it belongs in the notebook image (pip install ./plugin).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NBEX_BASE_STORE=/srv/nbexchange/store

# A fixed uid, so a bind-mounted users file can be chown'd to it (it holds tokens: mode 0600).
RUN useradd --system --uid 10001 --user-group --home-dir /srv/nbexchange --shell /usr/sbin/nologin nbexchange \
    && mkdir -p /srv/nbexchange/store \
    && chown -R nbexchange:nbexchange /srv/nbexchange

WORKDIR /usr/src/nbexchange
# Only what the server's distribution is built from; plugin/, tests/ and bench/ stay out.
COPY pyproject.toml README.md ./
COPY nbexchange/ ./nbexchange/
RUN pip install . && rm -rf /usr/src/nbexchange

USER nbexchange
WORKDIR /srv/nbexchange
# A named volume mounted here starts out owned by the service's user (Docker copies the image's folder).
VOLUME ["/srv/nbexchange/store"]
EXPOSE 9000

# Liveness only (the process answers); /ready also checks the database and the broker.
# No curl in the slim image: Python's own client. Workers (no HTTP) disable this in compose.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9000/services/nbexchange/health', timeout=4)"]

CMD ["nbexchange", "--ip=0.0.0.0"]
