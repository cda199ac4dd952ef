#!/usr/bin/env bash
# OpenAPI fuzz of `katz gateway` (make test-gateway-fuzz): schemathesis generates requests from the
# gateway's own /openapi.json and fails on any 5xx. A gateway runs against the real RabbitMQ and
# Redis (tools/services.sh); no worker is needed (jobs for models no worker serves are 422).
#   EXAMPLES=N   examples per operation (default 100)
set -euo pipefail
cd "$(dirname "$0")/.."
KATZ=${KATZ_BIN:-./target/release/katz}
VENV=.katz/fuzz
if [ ! -x "$VENV/bin/schemathesis" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "schemathesis==${SCHEMATHESIS_VERSION:-4.32.5}"
fi
PORT=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
KEY=fuzz-key-0123456789
LOG=$(mktemp /tmp/katz-gateway-fuzz.XXXXXX.log)
# a generous bucket and quota: the fuzz checks answers, not limits
CFG=$(mktemp /tmp/katz-gateway-fuzz.XXXXXX.toml)
cat > "$CFG" <<TOML
[tenants.fuzz]
keys = ["$KEY"]
rate_per_s = 1000
burst = 1000
max_active = 1000
webhook_secret = "fuzz-secret"
TOML
"$KATZ" gateway --config "$CFG" --listen "127.0.0.1:$PORT" >"$LOG" 2>&1 &
GW=$!
trap 'kill $GW 2>/dev/null || true; rm -f "$CFG"' EXIT
for _ in $(seq 1 50); do
  curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break
  sleep 0.2
done
set +e
"$VENV/bin/schemathesis" run "http://127.0.0.1:$PORT/openapi.json" \
  --header "Authorization: Bearer $KEY" \
  --checks not_a_server_error \
  --max-examples "${EXAMPLES:-100}" \
  --workers 2
status=$?
if grep -q "panicked" "$LOG"; then
  echo "gateway-fuzz: the gateway panicked (log $LOG)" >&2
  exit 1
fi
echo "gateway-fuzz: no 5xx, no panic (gateway log $LOG)"
exit $status
