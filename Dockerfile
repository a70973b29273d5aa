# sentinel-proxy: JSON-RPC gateway in front of Aztec nodes. Configure with environment variables
# (see docs/configuration.md), e.g. docker run -e SENTINEL_BACKENDS=http://node:8080 -p 8080:8080 …
FROM python:3.11-slim AS build
WORKDIR /src
COPY setup.py README.md ./
COPY sentinel_proxy ./sentinel_proxy
COPY twisted ./twisted
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 sentinel
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER sentinel
WORKDIR /home/sentinel
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:${PROXY_PORT:-8080}/ready', timeout=2).status == 200 else 1)"
ENTRYPOINT ["twistd", "-n", "--pidfile=", "sentinel-proxy"]
