#!/bin/bash
# Cluster figures of docs/BENCHMARKS.md ("Cluster"), on one machine.
#
#   bench/scripts/cluster.sh converge          # kill -9 of node 3 of 3 (memory store): time until
#                                              # both survivors route without it
#   bench/scripts/cluster.sh rate NODES SHARDS # 1:1 closed loop over NODES nodes of SHARDS shards
#   bench/scripts/cluster.sh kill              # 1:1 open loop over 3 nodes, node 3 killed 3 s in
#
# rate and kill need PostgreSQL: TIM_PG_URL_LOW and TIM_PG_URL_HIGH, two empty databases (the
# two halves of the partitions; they are reused, so drop and create them between runs).
# Release builds of tim and tim-loadgen are used (cargo build --release -p tim -p tim-loadgen).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
B=$ROOT/target/release
W=${OUT:-/tmp/tim-cluster}
mkdir -p "$W"
SECRET="benchmark cluster secret"
KEY=00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff
cleanup() { pkill -f "tim serve --config $W/" 2>/dev/null || true; }
trap cleanup EXIT

config() { # config N SHARDS STORE_BODY -> file
  local f=$W/n$1.toml
  printf '[server]\nlisten = "127.0.0.1:0"\nshards = %s\npin_cores = false\n[security]\nargon2_m_kib = 64\nargon2_t = 1\nname_key = "%s"\n[store]\n%b\n[gateway]\nws_listen = ""\n[admin]\nlisten = ""\n[cluster]\nnode_id = %s\nlisten = "127.0.0.1:0"\nsecret = "%s"\n' \
    "$2" "$KEY" "$3" "$1" "$SECRET" > "$f"
  echo "$f"
}

start() { # start NODES SHARDS STORE_BODY: prints the client addresses
  local first=""
  for n in $(seq 1 "$1"); do
    local f; f=$(config "$n" "$2" "$3")
    if [ -z "$first" ]; then "$B/tim" serve --config "$f" > "$W/n$n.out" 2> "$W/n$n.err" &
    else "$B/tim" serve --config "$f" --join "$first" > "$W/n$n.out" 2> "$W/n$n.err" &
    fi
    sleep 0.7
    [ -z "$first" ] && first=$(grep -o "cluster listening on [0-9.:]*" "$W/n1.out" | awk '{print $4}')
  done
  sleep 2
  for n in $(seq 1 "$1"); do grep -o "tim listening on [0-9.:]*" "$W/n$n.out" | awk '{print "--addr " $4}'; done | tr '\n' ' '
}

pg_store() {
  printf 'backend = "postgres"\n[[store.postgres.partition]]\nslots = "0-2047"\nurl = "%s"\n[[store.postgres.partition]]\nslots = "2048-4095"\nurl = "%s"' \
    "${TIM_PG_URL_LOW:?}" "${TIM_PG_URL_HIGH:?}"
}

case "${1:-}" in
converge)
  start 3 2 'backend = "memory"' > /dev/null
  C1=$(grep -o "cluster listening on [0-9.:]*" "$W/n1.out" | awk '{print $4}')
  C2=$(grep -o "cluster listening on [0-9.:]*" "$W/n2.out" | awk '{print $4}')
  TIM_CLUSTER_SECRET="$SECRET" python3 - "$B/tim" "$W/n3.toml" "$C1" "$C2" <<'PY'
import json, subprocess, sys, time
tim, n3, *addrs = sys.argv[1:]
def owning(a):
    d = json.loads(subprocess.run([tim, "cluster", "status", "--addr", a], capture_output=True, text=True).stdout)
    return sorted(m["node"] for m in d["members"] if m["partitions"] > 0 and m["state"] in ("self", "alive"))
assert owning(addrs[0]) == [1, 2, 3]
subprocess.run(["pkill", "-9", "-f", "tim serve --config " + n3])
t0 = time.time(); done = {}
while len(done) < 2 and time.time() - t0 < 10:
    for a in addrs:
        if a not in done and owning(a) == [1, 2]:
            done[a] = time.time() - t0
    time.sleep(0.01)
print("converged after %.3f s (slower survivor)" % max(done.values()))
PY
  ;;
rate)
  ADDRS=$(start "${2:-3}" "${3:-1}" "$(pg_store)")
  # shellcheck disable=SC2086
  "$B/tim-loadgen" $ADDRS --scenario one-to-one --connections 60 --duration 5 --body-bytes 64 --json | tail -1
  ;;
kill)
  ADDRS=$(start 3 2 "$(pg_store)")
  (sleep 3; pkill -9 -f "tim serve --config $W/n3.toml") &
  # shellcheck disable=SC2086
  "$B/tim-loadgen" $ADDRS --scenario one-to-one --connections 30 --users 15 --duration 7 --rate 3000 \
    --drain 30 --reconnect-give-up 20 --json | tail -1
  ;;
*)
  sed -n 2,12p "$0"; exit 2 ;;
esac
