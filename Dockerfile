# Meterline server image: `meterline serve` (and every other `meterline` command).
#
#   docker build -t meterline .
#   docker run -p 8080:8080 -v meterline-var:/app/var meterline      # embedded: one process
#
# The default command is the embedded single-machine server (ingest -> local log -> raw
# and rollup stages -> chDB -> usage API and /usage page), its state in /app/var. In
# docker-compose.yml the same image runs the Kafka deployment's processes instead
# (`serve --kafka`, `worker`, `load-rollups`, `load-raw`, and `migrate` / `topics create`
# as init steps). tests/test_docker.py checks that every command here and there is one
# the CLI accepts.

# The compiled column builder of the rollup fold (native/, Rust via PyO3): built into a
# wheel here, so the image itself carries no compiler.
FROM python:3.11-slim AS native
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates gcc libc6-dev \
    && curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
ENV PATH=/root/.cargo/bin:$PATH
COPY native /native
RUN pip wheel --no-deps -w /wheels /native

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY --from=native /wheels /wheels

# The packages pyproject.toml maps into the meterline namespace ([tool.setuptools]).
COPY pyproject.toml README.md ./
COPY meterline ./meterline
COPY sdk ./sdk
COPY ingest ./ingest
COPY sinks ./sinks
COPY aggregators ./aggregators
RUN pip install ".[server]" /wheels/*.whl \
    && useradd --system --uid 10001 --home-dir /app meterline \
    && mkdir -p /app/var && chown meterline /app/var

# Not root: the server needs only its state directory.
USER meterline
VOLUME ["/app/var"]
# Inside a container the server must listen on every interface to be reachable at all;
# publish the port to choose who can reach it.
EXPOSE 8080
ENTRYPOINT ["meterline"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
