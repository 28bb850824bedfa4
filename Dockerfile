# syntax=docker/dockerfile:1
# One image for every studyq process: workers, the coordinator, migrations and Flower.
#
#   docker build -t studyq:latest .
#   docker run --rm studyq:latest --help
#
# Agent code of your own goes into an image built on this one:
#
#   FROM studyq:latest
#   USER root
#   RUN pip install --no-cache-dir lab-agents==1.2.0
#   USER studyq

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY orchestrator ./orchestrator
COPY workers ./workers
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[postgres,flower]"

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 studyq \
    && useradd --system --uid 10001 --gid studyq --create-home --home-dir /home/studyq studyq
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-index --find-links=/tmp/wheels "studyq[postgres,flower]" \
    && rm -rf /tmp/wheels
# /data: Flower's persistent state; /artifacts: what `studyq run --out /artifacts` writes.
RUN mkdir -p /data /artifacts /study && chown studyq:studyq /data /artifacts
WORKDIR /home/studyq
USER studyq:studyq
# Exit 0 healthy, 2 schema not current (`studyq db upgrade`), 3 database or broker unreachable.
HEALTHCHECK --interval=30s --timeout=15s --start-period=30s --retries=3 CMD ["studyq", "check"]
ENTRYPOINT ["studyq"]
CMD ["--help"]
