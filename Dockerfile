# swarmagent image: `twistd -n swarmagent` on a Python base.
#
#   docker build -t swarmagent .
#
# Behind a TLS-inspecting proxy, hand the build your CA bundle (BuildKit):
#   DOCKER_BUILDKIT=1 docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt -t swarmagent .
# The bundle is mounted for the one pip step only; it is not in any layer.
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY setup.cfg pyproject.toml README.md ./
COPY swarmagent swarmagent
COPY twisted twisted
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${BASE_IMAGE}
ARG VERSION=dev
LABEL org.opencontainers.image.title="swarmagent" \
      org.opencontainers.image.description="Docker Swarm cluster agent, wire-compatible with the Portainer agent" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="${VERSION}"
# Only wheels cross over: no compiler, no source, no pip cache in the image.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels swarmagent \
    # twistd looks plugins up through dropin.cache: write it now, as the
    # container's root filesystem may be read-only.
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
ENV PYTHONUNBUFFERED=1
EXPOSE 9001
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-m", "swarmagent.healthcheck"]
# -n: stay in the foreground and log to stdout; no pid file to go stale.
ENTRYPOINT ["twistd", "-n", "--pidfile=", "swarmagent"]
