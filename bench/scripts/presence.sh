#!/usr/bin/env bash
# One-to-one with and without presence churn (docs/BENCHMARKS.md, "Presence churn beside 1:1"),
# alternated over rounds: each run gets a fresh `tim serve` (the default embedded store in a new
# data directory, default settings but for its ports) and one tim-loadgen run with
# --server-pid; the JSON lines go to $OUT, medians and per-round ratios to stdout.
#
#   bench/scripts/presence.sh                        # 3 rounds: base, churn
#   ROUNDS=5 VARIANTS="plain base churn" bench/scripts/presence.sh
#
# Variants (all: --connections 100 --users 100 $LOAD, one session per user):
#   plain  no friends, messages only
#   base   --friends 50, messages only
#   churn  --friends 50 --presence-share 0.1: 10 % of each connection's operations are presence
#          changes (each pushed to the 50 friends' sessions), 90 % messages
#   typing --friends 50 --presence-share 0.1 --typing-share $TYPING
# Ratios are of each round's msgs/s against base (the runs of a round are neighbours in time).
#
# Environment: BIN (target/release), ROUNDS (3), DURATION (8), LOAD ("--window 16"),
# CONNECTIONS (100), FRIENDS (50), SHARE (0.1), TYPING (0.001), THREADS (loadgen threads, 1),
# STORE ("embedded"; or "memory"), VARIANTS ("base churn"), OUT (a new temporary directory).
set -euo pipefail
BIN=${BIN:-target/release}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
LOAD=${LOAD:---window 16}
CONNECTIONS=${CONNECTIONS:-100}
FRIENDS=${FRIENDS:-50}
SHARE=${SHARE:-0.1}
TYPING=${TYPING:-0.001}
THREADS=${THREADS:-1}
STORE=${STORE:-embedded}
VARIANTS=${VARIANTS:-base churn}
OUT=${OUT:-$(mktemp -d /tmp/tim-presence.XXXXXX)}
mkdir -p "$OUT"

for round in $(seq 1 "$ROUNDS"); do
  for v in $VARIANTS; do
    case $v in
      plain) extra="" ;;
      base) extra="--friends $FRIENDS" ;;
      churn) extra="--friends $FRIENDS --presence-share $SHARE" ;;
      typing) extra="--friends $FRIENDS --presence-share $SHARE --typing-share $TYPING" ;;
      *) echo "unknown variant $v" >&2; exit 2 ;;
    esac
    data="$OUT/data-$round-$v"
    if [ "$STORE" = memory ]; then store='backend = "memory"'; else store="backend = \"embedded\"
data_dir = \"$data\""; fi
    cat > "$OUT/tim-$round-$v.toml" <<TOML
[server]
listen = "127.0.0.1:0"

[admin]
listen = ""

[store]
$store
TOML
    log="$OUT/server-$round-$v"
    "$BIN/tim" serve --config "$OUT/tim-$round-$v.toml" > "$log.out" 2> "$log.err" &
    pid=$!
    for _ in $(seq 1 300); do grep -qs '^tim listening on' "$log.out" && break; sleep 0.1; done
    addr=$(awk '/^tim listening on/ {print $4}' "$log.out")
    if [ -z "$addr" ]; then
      echo "the server did not start: see $log.err" >&2
      kill "$pid" 2> /dev/null || true
      exit 1
    fi
    # shellcheck disable=SC2086 # LOAD and extra are lists of flags
    "$BIN/tim-loadgen" --addr "$addr" --scenario one-to-one --connections "$CONNECTIONS" \
      --users "$CONNECTIONS" $LOAD $extra --body-bytes 64 --duration "$DURATION" \
      --threads "$THREADS" --server-pid "$pid" --json --quiet > "$OUT/run-$round-$v.txt" || true
    kill "$pid"
    wait "$pid" 2> /dev/null || true
    rm -rf "$data"
    tail -n 1 "$OUT/run-$round-$v.txt" | python3 -c 'import json,sys; v=json.load(sys.stdin); print(sys.argv[1], "%.0f msgs/s" % v["msgs_per_s"], "server %.2f µs/msg" % v["server_cpu_us_per_msg"], "presence %.0f/s" % v.get("presence_per_s", 0), "notices %d of %d" % (v.get("presence_notices", 0), v.get("presence_notices_expected", 0)), "lost", v["lost"], "dup", v["duplicated"], "errors", v["errors"])' "$v" >&2
  done
done

python3 - "$OUT" "$ROUNDS" "$VARIANTS" <<'PY'
import json, statistics, sys
out, rounds, variants = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
runs = {v: [] for v in variants}
for r in range(1, rounds + 1):
    for v in variants:
        with open(f"{out}/run-{r}-{v}.txt") as f:
            runs[v].append(json.loads(f.read().strip().splitlines()[-1]))
med = statistics.median
print(f"results in {out}")
print("| variant | msgs/s per round | median | presence changes/s | notices/s (received of owed) | server cores | server CPU µs/msg | ack p50 / p99 ms | lost / dup / errors |")
print("|---|---|---|---|---|---|---|---|---|")
for v in variants:
    x = runs[v]
    rate = [a["msgs_per_s"] for a in x]
    owed = sum(a.get("presence_notices_expected", 0) for a in x)
    got = sum(a.get("presence_notices", 0) for a in x)
    cpu = [a["server_cpu_us_per_msg"] for a in x]
    print(f"| {v} | {' / '.join(f'{r:,.0f}' for r in rate)} | {med(rate):,.0f} "
          f"| {med([a.get('presence_per_s', 0) for a in x]):,.0f} "
          f"| {med([a.get('presence_notices_per_s', 0) for a in x]):,.0f} ({got} of {owed}) "
          f"| {med([a['server_cpu_util'] for a in x]):.2f} "
          f"| {' / '.join('%.2f' % c for c in cpu)} (median {med(cpu):.2f}) "
          f"| {med([a['ack_p50_us'] for a in x]) / 1000:.2f} / {med([a['ack_p99_us'] for a in x]) / 1000:.2f} "
          f"| {sum(a['lost'] for a in x)} / {sum(a['duplicated'] for a in x)} / {sum(a['errors'] for a in x)} |")
if "base" in runs:
    for v in variants:
        if v != "base":
            ratios = [a["msgs_per_s"] / b["msgs_per_s"] for a, b in zip(runs[v], runs["base"])]
            print(f"{v}/base per round: " + " ".join(f"{r:.3f}" for r in ratios)
                  + f"; median {med(ratios):.3f}; ratio of medians "
                  + f"{med([a['msgs_per_s'] for a in runs[v]]) / med([b['msgs_per_s'] for b in runs['base']]):.3f}")
PY
