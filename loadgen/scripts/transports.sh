#!/usr/bin/env bash
# One-to-one over the three client transports, alternated: tcp (protocol v1), ws-binary (v1
# frames in WebSocket binary messages) and ws-json (JSON texts over WebSocket). Each run gets a
# fresh `tim serve` (memory store, default settings but for its ports) and one tim-loadgen run
# with --server-pid; the JSON lines go to $OUT, and a summary of medians and per-round ratios
# to stdout (docs/BENCHMARKS.md, "WebSocket and JSON").
#
#   loadgen/scripts/transports.sh                       # closed loop, 5 rounds of 8 s
#   ROUNDS=3 LOAD="--rate 100000" loadgen/scripts/transports.sh   # an open-loop point
#
# Medians over the rounds; the ratios are of each round's rates (the runs of a round are
# neighbours in time, so a busy moment of the machine weighs on all three).
#
# Environment: BIN (target/release), ROUNDS (5), DURATION (8), LOAD ("--window 16"),
# CONNECTIONS (100), THREADS (loadgen threads, 1), TRANSPORTS ("tcp ws-binary ws-json"),
# OUT (a new temporary directory).
set -euo pipefail
BIN=${BIN:-target/release}
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-8}
LOAD=${LOAD:---window 16}
CONNECTIONS=${CONNECTIONS:-100}
THREADS=${THREADS:-1}
TRANSPORTS=${TRANSPORTS:-tcp ws-binary ws-json}
OUT=${OUT:-$(mktemp -d /tmp/tim-transports.XXXXXX)}
mkdir -p "$OUT"
cat > "$OUT/tim.toml" <<TOML
[server]
listen = "127.0.0.1:0"

[gateway]
ws_listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[store]
backend = "memory"
TOML

for round in $(seq 1 "$ROUNDS"); do
  for t in $TRANSPORTS; do
    log="$OUT/server-$round-$t"
    "$BIN/tim" serve --config "$OUT/tim.toml" > "$log.out" 2> "$log.err" &
    pid=$!
    for _ in $(seq 1 300); do grep -qs '^tim listening on' "$log.out" && break; sleep 0.1; done
    if [ "$t" = tcp ]; then
      addr=$(awk '/^tim listening on/ {print $4}' "$log.out")
    else
      addr=$(awk '/^tim websocket listening on/ {print $5}' "$log.out")
    fi
    if [ -z "$addr" ]; then
      echo "the server did not start: see $log.err" >&2
      kill "$pid" 2> /dev/null || true
      exit 1
    fi
    # shellcheck disable=SC2086 # LOAD is a list of flags
    "$BIN/tim-loadgen" --addr "$addr" --transport "$t" --scenario one-to-one \
      --connections "$CONNECTIONS" $LOAD --body-bytes 64 --duration "$DURATION" \
      --threads "$THREADS" --server-pid "$pid" --json --quiet > "$OUT/run-$round-$t.txt" || true
    # Envelopes the server dropped (a shard's mesh overflow full): deliveries it will never make.
    admin=$(awk '/^tim admin listening on/ {print $5}' "$log.out")
    dropped=$(curl -s "http://$admin/metrics" | awk '/^tim_dropped_envelopes_total/ {print $2}' || true)
    echo "${dropped:-?}" > "$OUT/dropped-$round-$t.txt"
    kill "$pid"
    wait "$pid" 2> /dev/null || true
    tail -n 1 "$OUT/run-$round-$t.txt" | python3 -c 'import json,sys; v=json.load(sys.stdin); print(v["transport"], "%.0f msgs/s" % v["msgs_per_s"], "server %.2f µs/msg" % v["server_cpu_us_per_msg"], "loadgen %.2f µs/msg" % v["loadgen_cpu_us_per_msg"], "lost", v["lost"], "dup", v["duplicated"], "errors", v["errors"], "dropped", sys.argv[1])' "${dropped:-?}" >&2
  done
done

python3 - "$OUT" "$ROUNDS" "$TRANSPORTS" <<'PY'
import json, statistics, sys
out, rounds, transports = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
runs = {t: [] for t in transports}
for r in range(1, rounds + 1):
    for t in transports:
        with open(f"{out}/run-{r}-{t}.txt") as f:
            runs[t].append(json.loads(f.read().strip().splitlines()[-1]))
med = lambda xs: statistics.median(xs)
print(f"results in {out}")
dropped = {t: [open(f"{out}/dropped-{r}-{t}.txt").read().strip() for r in range(1, rounds + 1)] for t in transports}
print("| transport | msgs/s, median (range) | server CPU µs/msg | loadgen CPU µs/msg | ack p50 / p99 ms | deliver p50 / p99 / p999 ms | lost / dup / errors | server dropped |")
print("|---|---|---|---|---|---|---|---|")
for t in transports:
    v = runs[t]
    rate = [x["msgs_per_s"] for x in v]
    ms = lambda k: med([x[k] for x in v]) / 1000
    print(f"| {t} | {med(rate):,.0f} ({min(rate):,.0f}–{max(rate):,.0f}) | {med([x['server_cpu_us_per_msg'] for x in v]):.2f} "
          f"| {med([x['loadgen_cpu_us_per_msg'] for x in v]):.2f} | {ms('ack_p50_us'):.2f} / {ms('ack_p99_us'):.2f} "
          f"| {ms('deliver_p50_us'):.2f} / {ms('deliver_p99_us'):.2f} / {ms('deliver_p999_us'):.2f} "
          f"| {sum(x['lost'] for x in v)} / {sum(x['duplicated'] for x in v)} / {sum(x['errors'] for x in v)} "
          f"| {' '.join(dropped[t])} |")
if "tcp" in runs:
    for t in transports:
        if t != "tcp":
            ratios = [a["msgs_per_s"] / b["msgs_per_s"] for a, b in zip(runs[t], runs["tcp"])]
            print(f"{t}/tcp per round: " + " ".join(f"{r:.3f}" for r in ratios) + f"; median {med(ratios):.3f}")
PY
