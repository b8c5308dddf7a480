# The load balancer of deploy/compose.yaml: Debian's nginx on the same Debian base as the
# service image (python:3.11-slim-bookworm, built locally by deploy/build-base.sh where no
# registry answers), so compose needs no image from a registry. Config: deploy/nginx.conf,
# mounted at /etc/nginx/nginx.conf.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends nginx-light \
    && rm -rf /var/lib/apt/lists/* \
    && ln -sf /dev/stdout /var/log/nginx/access.log && ln -sf /dev/stderr /var/log/nginx/error.log
EXPOSE 8080
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
