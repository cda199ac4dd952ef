#!/usr/bin/env bash
# RabbitMQ (with its Erlang) and Redis for the GPU machine, which has neither and no package
# registry: this host's installed copies, packed into one piece (≈ 36 MB) to carry, and started
# there from /opt/svc (never unpacked into /). The service tests and the CUDA IPC transport
# of the ControlNet service need real brokers on the GPU host.
#
#   here:  bash tools/device/services-pack.sh          → .gpu-carry/svc/svc.tar.xz
#   there: bash tools/device/services-pack.sh start    (carry .gpu-carry/svc): RabbitMQ on 5672
#          (guest/guest), Redis on 6379, both on 127.0.0.1; `stop` ends them; `unpack` only
#          unpacks into /opt/svc (a call that carries the piece; a later call starts them: the
#          brokers end with the call that started them)
#
# Checked here (Debian 12, Erlang 25, RabbitMQ 3.10, Redis 7.0): the relocated tree starts and
# listens. Erlang's scripts hard-code their root; `start` rewrites it to /opt/svc.
set -euo pipefail
root=$(git rev-parse --show-toplevel 2>/dev/null || pwd)
R=${SVC_ROOT:-/opt/svc}
AMQP_PORT=${AMQP_PORT:-5672} REDIS_PORT=${REDIS_PORT:-6379} NODE=${SVC_NODE:-katz@localhost}

pack() {
  local out=$root/.gpu-carry/svc
  mkdir -p "$out"
  local libs
  libs=$(ldd /usr/bin/redis-server | awk '/jemalloc|lzf/ {print $3}' | sed 's|^/||')
  tar -C / -chf - usr/lib/erlang usr/lib/rabbitmq usr/bin/redis-server $libs | xz -T0 -6 > "$out/svc.tar.xz"
  ls -la "$out"
}

unpack() {  # into $R, once (a later call need not carry the piece again)
  mkdir -p "$R"
  [[ -d $R/usr/lib/erlang ]] || xz -dc "$root/.gpu-carry/svc/svc.tar.xz" | tar -x -C "$R"
}

start() {
  unpack
  for f in "$R"/usr/lib/erlang/bin/{erl,start} "$R"/usr/lib/erlang/erts-*/bin/{erl,start}; do
    sed -i "s|\"/usr/lib/erlang|\"$R/usr/lib/erlang|g; s|=/usr/lib/erlang|=$R/usr/lib/erlang|g" "$f"
  done
  mkdir -p "$R/var/lib" "$R/log" "$R/etc" "$R/home"
  echo "[]." > "$R/etc/enabled_plugins"
  # redis: its two libraries travel along
  LD_LIBRARY_PATH=$R/usr/lib/x86_64-linux-gnu:$R/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-} \
    "$R/usr/bin/redis-server" --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    --logfile "$R/log/redis.log"
  env PATH="$R/usr/lib/erlang/bin:$PATH" HOME="$R/home" \
    RABBITMQ_HOME="$(ls -d "$R"/usr/lib/rabbitmq/lib/rabbitmq_server-*)" \
    RABBITMQ_NODENAME="$NODE" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$AMQP_PORT" \
    RABBITMQ_DIST_PORT=$((AMQP_PORT + 20000)) \
    RABBITMQ_MNESIA_BASE="$R/var/lib" RABBITMQ_LOG_BASE="$R/log" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$R/etc/enabled_plugins" RABBITMQ_CONFIG_FILE="$R/etc/rabbitmq" \
    RABBITMQ_CONF_ENV_FILE="$R/etc/rabbitmq-env.conf" \
    "$(ls -d "$R"/usr/lib/rabbitmq/lib/rabbitmq_server-*)/sbin/rabbitmq-server" -detached
  for _ in $(seq 60); do
    (exec 3<>/dev/tcp/127.0.0.1/"$AMQP_PORT") 2>/dev/null && { echo "RabbitMQ up on $AMQP_PORT, Redis on $REDIS_PORT"; return 0; }
    sleep 1
  done
  echo "RabbitMQ did not come up; log:"; tail -20 "$R"/log/*.log
  return 1
}

stop() {
  env PATH="$R/usr/lib/erlang/bin:$PATH" HOME="$R/home" \
    "$(ls -d "$R"/usr/lib/rabbitmq/lib/rabbitmq_server-*)/sbin/rabbitmqctl" -n "$NODE" stop || true
  redis-cli -p "$REDIS_PORT" shutdown 2>/dev/null || pkill -x redis-server || true
}

case ${1:-pack} in
  pack) pack ;;
  unpack) unpack ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 pack|unpack|start|stop"; exit 2 ;;
esac
