#!/usr/bin/env bash
# Starts RabbitMQ and Redis on localhost if they are not answering (the integration tests talk to
# the real services). Idempotent.
set -euo pipefail
up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if ! up 6379; then
  command -v redis-server >/dev/null || { echo "services: redis-server is not installed (apt-get install redis-server)" >&2; exit 1; }
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
fi
if ! up 5672; then
  command -v rabbitmq-server >/dev/null || { echo "services: rabbitmq-server is not installed (apt-get install rabbitmq-server)" >&2; exit 1; }
  rabbitmq-server -detached >/dev/null 2>&1 || true
fi
for i in $(seq 1 60); do
  if up 6379 && up 5672; then echo "services: redis 127.0.0.1:6379 and rabbitmq 127.0.0.1:5672 are up"; exit 0; fi
  sleep 1
done
echo "services: redis or rabbitmq did not come up within 60 s" >&2
exit 1
