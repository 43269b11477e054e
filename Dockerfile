# The IMAP/SMTP gateway in a container (README "Running as a service"):
#   docker build -t gateway .
#   docker run -d --name gateway --hostname gateway.example.com --stop-timeout 30 \
#       -p 2993:2993 -p 2587:2587 -v gateway-state:/var/lib/gateway gateway
#   docker exec gateway gateway token create --scope api --description admin
#
# Configuration: /etc/gateway/gateway.yaml (contrib/gateway.yaml; bind-mount a
# directory with your own on /etc/gateway). State: the SQLite store, the secret
# key and the generated CA and certificate are created by the gateway on first
# start in the /var/lib/gateway volume; no key is ever part of the image.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed uid/gid: a host directory mounted on /var/lib/gateway must be owned by 10001.
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --home-dir /var/lib/gateway --no-create-home \
        --shell /usr/sbin/nologin gateway

WORKDIR /src
COPY setup.py setup.cfg pyproject.toml README.md ./
COPY gateway/ gateway/
COPY twisted/plugins/gateway_plugin.py twisted/plugins/
# Listing twistd's plugins as root writes Twisted's plugin cache (the gateway's user
# cannot write site-packages) and fails the build when the installed package lacks
# the gateway plugin (-I: not the copy in /src, the current directory).
RUN pip install --no-cache-dir . \
 && python3 -I -c "from twisted.application.service import IServiceMaker; from twisted.plugin import getPlugins; assert 'gateway' in [p.tapname for p in getPlugins(IServiceMaker)]" \
 && rm -rf /src

COPY contrib/gateway.yaml /etc/gateway/gateway.yaml
RUN install -d -o gateway -g gateway -m 0700 /var/lib/gateway

# The server and the CLI (docker exec ... gateway ...) both read $GATEWAY_CONFIG.
ENV GATEWAY_CONFIG=/etc/gateway/gateway.yaml \
    GATEWAY_HEALTH_URL=http://127.0.0.1:3000/health
VOLUME ["/etc/gateway", "/var/lib/gateway"]
WORKDIR /var/lib/gateway
USER gateway:gateway

# IMAP (implicit TLS), SMTP submission (STARTTLS), admin API. The API listens on
# the container's loopback (api.listen in gateway.yaml): publishing 3000 does
# nothing until api.listen is "tcp:3000:interface=0.0.0.0" (README).
EXPOSE 2993 2587 3000

# GET /health of the admin API (no curl in the slim image); set GATEWAY_HEALTH_URL
# when api.listen is changed.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-I", "-c", "import json, os, urllib.request as r; s = json.load(r.urlopen(os.environ['GATEWAY_HEALTH_URL'], timeout=4)); raise SystemExit(0 if s.get('status') == 'ok' else 1)"]

# SIGTERM: clients get BYE / 421 after up to shutdown_grace (10 s) for commands in
# flight; give `docker stop` more than that (docker run --stop-timeout 30).
STOPSIGNAL SIGTERM
CMD ["twistd", "--nodaemon", "--pidfile=", "gateway"]
