# The image the cluster templates run (anchorless/cluster/templates): Ray's own image
# with this project installed, so head, workers and job drivers share one environment.
#   docker build -t anchorless:0.1.0 .
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311-gpu

WORKDIR /opt/anchorless
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users anchorless ./anchorless
COPY --chown=ray:users configs ./configs
RUN pip install --no-cache-dir . && anchorless --help > /dev/null

ENV RAY_AUTH_MODE=token
