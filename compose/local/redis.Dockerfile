# Stand-in for redis:7.2 where Docker Hub cannot be reached (tools/compose-images.sh builds it):
# Debian's redis-server, run as the redis user with its data in /data like the official image.
ARG BASE_IMAGE=katz-local/debian:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data && chown redis:redis /data
WORKDIR /data
EXPOSE 6379
USER redis
CMD ["redis-server", "--protected-mode", "no"]
