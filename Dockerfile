# sentinel-proxy: JSON-RPC gateway in front of Aztec nodes.
#
#   docker build -t sentinel-proxy .
#   docker run --rm -p 8080:8080 -e SENTINEL_BACKENDS=http://node-1:8080,http://node-2:8080 \
#       -e EXPECTED_VALIDATORS=48 sentinel-proxy
#   docker run --rm -p 8080:8080 sentinel-proxy --demo        # a quick look, no nodes needed
#
# Configuration comes from the environment (every variable of docs/configuration.md), or from a
# .env file mounted at /app/.env (then SIGHUP reloads it: see docs/runbook.md); the environment
# wins, so the image's PROXY_PORT=8080 is changed with -e PROXY_PORT=..., not in .env. Arguments
# after the image name are options of `twistd sentinel-proxy` (--demo, --backends ...); to check a
# configuration without starting: docker run --rm --entrypoint sentinel-proxy IMAGE check-config.
# Nothing secret is in the image. Needs BuildKit (the default builder since Docker Engine 23) for
# RUN --mount.

# Build stage: wheels of the gateway and of every dependency (the ones without a binary wheel are
# compiled here, so the final image needs no compiler and no network), at the versions pinned in
# constraints.txt, the ones the tests ran with: the same sources build the same image any day.
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY setup.py constraints.txt ./
COPY sentinel_proxy ./sentinel_proxy
COPY sentinel_simnode ./sentinel_simnode
COPY twisted/plugins/sentinel_proxy_plugin.py ./twisted/plugins/
RUN pip wheel --wheel-dir /wheels --constraint constraints.txt .

# Final stage: only the installed wheels, run by an unprivileged user.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PROXY_PORT=8080
# The wheels are mounted for the install only, so they are in no layer of the image. The last
# command writes Twisted's plugin cache while the site-packages are still writable (the gateway's
# user cannot write there, and would otherwise try at every start).
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index /wheels/*.whl \
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && groupadd --system --gid 10001 sentinel \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /app --shell /usr/sbin/nologin sentinel
# The working directory is where a .env file is read from; the gateway writes nothing to disk
# (logs go to stdout), so the container also runs with a read-only root file system.
WORKDIR /app
USER 10001:10001
EXPOSE 8080
# /ready answers 200 when at least one node is healthy. The port is read from PROXY_PORT at each
# check (set PROXY_PORT to the port too when PROXY_LISTEN moves the listener).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:%s/ready' % (os.environ.get('PROXY_PORT') or '8080'), timeout=2).status == 200 else 1)"]
# -n: stay in the foreground and log to stdout; --pidfile=: no pid file. SIGTERM drains requests in
# flight for SHUTDOWN_GRACE_MS (10 s): give `docker stop` a longer timeout (docker stop -t 15).
ENTRYPOINT ["twistd", "-n", "--pidfile=", "sentinel-proxy"]
CMD []
