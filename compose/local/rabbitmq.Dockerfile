# Stand-in for rabbitmq:3.13-management where Docker Hub cannot be reached (tools/compose-images.sh
# builds it): Debian's rabbitmq-server with the management plugin, run in the foreground. It
# takes the official image's RABBITMQ_DEFAULT_USER / RABBITMQ_DEFAULT_PASS (read by the server
# on its first start) and keeps its data in /var/lib/rabbitmq.
ARG BASE_IMAGE=katz-local/debian:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends rabbitmq-server \
 && rm -rf /var/lib/apt/lists/* \
 && rabbitmq-plugins enable --offline rabbitmq_management

EXPOSE 5672 15672
USER rabbitmq
ENV HOME=/var/lib/rabbitmq
CMD ["rabbitmq-server"]
