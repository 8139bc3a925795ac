#!/bin/bash
# Instructions the server executes per 1:1 message, counted by callgrind: deterministic to a few
# percent, unlike msgs/s on a shared VM, so two builds can be compared with a handful of runs.
#
#   bench/scripts/instructions.sh TIM_BINARY LABEL [SECONDS]
#   METRICS=false bench/scripts/instructions.sh ...     # with admin.metrics off
#
# Runs TIM_BINARY (memory store, 2 shards, epoll: valgrind does not know io_uring) under callgrind,
# drives it with the release tim-loadgen (1:1, 50 connections, 64-byte bodies) for SECONDS (10),
# and prints messages, instructions and instructions per message. The profile stays in
# $OUT/LABEL.callgrind for callgrind_annotate.
set -euo pipefail
BIN=$1; LABEL=$2; SECS=${3:-10}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LOADGEN=${LOADGEN:-$ROOT/target/release/tim-loadgen}
OUT=${OUT:-/tmp/tim-instructions}
mkdir -p "$OUT"
cat > "$OUT/mem2.toml" <<TOML
[server]
listen = "127.0.0.1:0"
shards = 2
pin_cores = false
driver = "epoll"
[gateway]
ws_listen = ""
[admin]
listen = ""
metrics = ${METRICS:-true}
[store]
backend = "memory"
[security]
argon2_m_kib = 64
argon2_t = 1
TOML
rm -f "$OUT/$LABEL".*
valgrind --tool=callgrind --callgrind-out-file="$OUT/$LABEL.callgrind" "$BIN" serve --config "$OUT/mem2.toml" \
  > "$OUT/$LABEL.server" 2> "$OUT/$LABEL.valgrind" &
PID=$!
ADDR=""
for _ in $(seq 1 150); do
  ADDR=$(grep -o '127.0.0.1:[0-9]*' "$OUT/$LABEL.server" | head -1 || true)
  [ -n "$ADDR" ] && break
  sleep 0.2
done
[ -n "$ADDR" ] || { echo "server did not start: $OUT/$LABEL.valgrind" >&2; kill $PID; exit 1; }
"$LOADGEN" --addr "$ADDR" --scenario one-to-one --body-bytes 64 --duration "$SECS" --connections 50 --json \
  > "$OUT/$LABEL.json" 2> /dev/null
kill -INT $PID
wait $PID || true
python3 - "$OUT" "$LABEL" "$SECS" <<'PY'
import json, re, sys
out, label, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
d = json.loads(open(f"{out}/{label}.json").read().strip().splitlines()[-1])
msgs = d["msgs_per_s"] * secs
ir = int(re.search(r"^(?:summary|totals): (\d+)", open(f"{out}/{label}.callgrind").read(), re.M).group(1))
print(f"{label}: {msgs:.0f} messages, {ir} instructions, {ir / msgs:.0f} per message")
PY
