#!/bin/bash
# Cluster figures of docs/BENCHMARKS.md ("Cluster"), on one machine.
#
#   bench/scripts/cluster.sh converge          # kill -9 of node 3 of 3 (memory store): time until
#                                              # both survivors route without it
#   bench/scripts/cluster.sh rate NODES SHARDS # 1:1 closed loop over NODES nodes of SHARDS shards
#   bench/scripts/cluster.sh single SHARDS     # the same against one node without [cluster]
#   bench/scripts/cluster.sh cpu [ROUNDS]      # ROUNDS (3) alternated rounds of rate 3 1 and
#                                              # single 2, then the medians and their ratio
#   bench/scripts/cluster.sh kill              # 1:1 open loop over 3 nodes, node 3 killed 3 s in
#
# rate, single and cpu print one line per run: msgs/s, ack p99 and the server CPU per delivered
# message (user + system time of every tim process, from /proc/PID/stat, read when the loadgen
# starts its measured window and when it ends it, over the messages delivered; the single node's
# figure from the loadgen's own --server-pid too, which reads the same at the same instants).
# rate, single, cpu and kill need PostgreSQL: TIM_PG_URL_LOW and TIM_PG_URL_HIGH, two empty
# databases (the two halves of the partitions; they are reused, so drop and create them between
# runs: cpu runs TIM_PG_RESET, a shell command, before each run when it is set).
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

config() { # config N SHARDS STORE_BODY [single] -> file
  local f=$W/n$1.toml
  printf '[server]\nlisten = "127.0.0.1:0"\nshards = %s\npin_cores = false\n[security]\nargon2_m_kib = 64\nargon2_t = 1\nname_key = "%s"\n[store]\n%b\n[gateway]\nws_listen = ""\n[admin]\nlisten = ""\n' \
    "$2" "$KEY" "$3" > "$f"
  [ "${4:-}" = single ] || printf '[cluster]\nnode_id = %s\nlisten = "127.0.0.1:0"\nsecret = "%s"\n' "$1" "$SECRET" >> "$f"
  echo "$f"
}

start() { # start NODES SHARDS STORE_BODY [single]: prints the client addresses; pids in $W/n*.pid
  local first=""
  rm -f "$W"/n*.pid
  for n in $(seq 1 "$1"); do
    local f; f=$(config "$n" "$2" "$3" "${4:-}")
    if [ -z "$first" ]; then "$B/tim" serve --config "$f" > "$W/n$n.out" 2> "$W/n$n.err" &
    else "$B/tim" serve --config "$f" --join "$first" > "$W/n$n.out" 2> "$W/n$n.err" &
    fi
    echo $! > "$W/n$n.pid"
    sleep 0.7
    [ -z "$first" ] && first=$(grep -o "cluster listening on [0-9.:]*" "$W/n1.out" | awk '{print $4}')
  done
  sleep 2
  for n in $(seq 1 "$1"); do grep -o "tim listening on [0-9.:]*" "$W/n$n.out" | awk '{print "--addr " $4}'; done | tr '\n' ' '
}

stop() { # stop the nodes started last (SIGTERM, by their pids)
  local p
  for p in $(cat "$W"/n*.pid 2>/dev/null); do kill "$p" 2>/dev/null || true; done
  for p in $(cat "$W"/n*.pid 2>/dev/null); do while kill -0 "$p" 2>/dev/null; do sleep 0.1; done; done
  rm -f "$W"/n*.pid
}

# measure LABEL LOADGEN_ARGS...: run tim-loadgen 1:1 closed loop (60 connections, 5 s, 64-byte
# bodies) against the nodes of $W/n*.pid; one line of figures, the loadgen's JSON in $W/LABEL.json.
measure() {
  local label=$1; shift
  python3 - "$label" "$W" "$B/tim-loadgen" "$@" --scenario one-to-one --connections 60 --duration 5 \
    --body-bytes 64 --json <<'PY'
import glob, json, os, subprocess, sys
label, w, loadgen, *args = sys.argv[1:]
pids = [int(open(p).read()) for p in sorted(glob.glob(w + "/n*.pid"))]
tick = os.sysconf("SC_CLK_TCK")
def cpu():  # user + system seconds of every node, all threads
    t = 0
    for p in pids:
        f = open("/proc/%d/stat" % p).read().rsplit(")", 1)[1].split()
        t += int(f[11]) + int(f[12])  # fields 14 and 15 (utime, stime)
    return t / tick
duration = float(args[args.index("--duration") + 1])
lg = subprocess.Popen([loadgen] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
c0 = c1 = None
for line in lg.stderr:
    if line.startswith("[setup]"):
        c0 = cpu()
    elif c0 is not None and c1 is None and line.startswith("[") and line[1:line.index("s]")].strip().replace(".", "", 1).isdigit():
        if float(line[1:line.index("s]")]) >= duration - 0.05:
            c1 = cpu()
out = lg.stdout.read()
lg.wait()
v = json.loads(out.strip().splitlines()[-1])
open("%s/%s.json" % (w, label), "w").write(json.dumps(v) + "\n")
us = (c1 - c0) * 1e6 / v["delivered"]
own = v.get("server_cpu_us_per_msg")
print("%-8s msgs/s %8.0f  ack p99 %6.1f ms  server CPU %5.2f s = %5.2f µs/msg%s  lost %d errors %d" % (
    label, v["msgs_per_s"], v["ack_p99_us"] / 1000, c1 - c0, us,
    "" if own is None else " (loadgen --server-pid: %.2f)" % own, v["lost"], v["errors"]))
PY
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
  measure "rate-${2:-3}x${3:-1}" $ADDRS
  ;;
single)
  ADDRS=$(start 1 "${2:-2}" "$(pg_store)" single)
  # shellcheck disable=SC2086
  measure "single-${2:-2}" $ADDRS --server-pid "$(cat "$W/n1.pid")"
  ;;
cpu)
  ROUNDS=${2:-3}
  : > "$W/cpu.txt"
  for r in $(seq 1 "$ROUNDS"); do
    for setup in 3x1 1x2; do
      if [ -n "${TIM_PG_RESET:-}" ]; then eval "$TIM_PG_RESET"; fi
      if [ "$setup" = 3x1 ]; then
        ADDRS=$(start 3 1 "$(pg_store)")
        # shellcheck disable=SC2086
        measure "3x1-r$r" $ADDRS | tee -a "$W/cpu.txt"
      else
        ADDRS=$(start 1 2 "$(pg_store)" single)
        # shellcheck disable=SC2086
        measure "1x2-r$r" $ADDRS --server-pid "$(cat "$W/n1.pid")" | tee -a "$W/cpu.txt"
      fi
      stop
    done
  done
  python3 - "$W" "$ROUNDS" <<'PY'
import json, statistics, sys
w, rounds = sys.argv[1], int(sys.argv[2])
def runs(kind):
    out = []
    for r in range(1, rounds + 1):
        v = json.load(open("%s/%s-r%d.json" % (w, kind, r)))
        out.append(v)
    return out
three, one = runs("3x1"), runs("1x2")
lines = [l.split() for l in open(w + "/cpu.txt")]
def us(kind):
    return [float(l[l.index("=") + 1]) for l in lines if l[0].startswith(kind)]
m3, m1 = statistics.median(v["msgs_per_s"] for v in three), statistics.median(v["msgs_per_s"] for v in one)
ratios = [a["msgs_per_s"] / b["msgs_per_s"] for a, b in zip(three, one)]
print("3 nodes x 1 shard: msgs/s %s, median %.0f; server CPU µs/msg %s, median %.2f" % (
    [round(v["msgs_per_s"]) for v in three], m3, us("3x1"), statistics.median(us("3x1"))))
print("1 node x 2 shards: msgs/s %s, median %.0f; server CPU µs/msg %s, median %.2f" % (
    [round(v["msgs_per_s"]) for v in one], m1, us("1x2"), statistics.median(us("1x2"))))
print("ratio of medians 3/1: %.2f; median of the round ratios: %.2f" % (m3 / m1, statistics.median(ratios)))
PY
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
