#!/usr/bin/env bash
# Where a broker's CPU goes under one load scenario: `perf record` of the broker process while
# `raftmq-bench` drives it, then a flat profile grouped three ways (by thread, by library with
# the kernel as one, top symbols).
#
#   benches/profile.sh [--broker raftmq|mosquitto] [--seconds N] [--out DIR] -- SCENARIO ARGS...
#   benches/profile.sh -- p2p --clients 10 --qos 1 --rate 10000
#   benches/profile.sh --broker mosquitto -- fanin --clients 50 --qos 0
#
# Starts the broker (release raftmq with a fresh data dir, or Mosquitto with the settings of
# benches/compare.sh) on a free port of 127.0.0.1, runs the scenario (its --duration defaults to
# --seconds, 10), samples the broker with `perf record -F 1999 -g` for the measured part, and
# prints the report. Needs `perf` (linux-perf) and perf_event_paranoid <= 1 (or root). Every
# process it starts is stopped by PID on exit; the perf data stays in --out (default: a
# temporary directory, removed at exit).
set -euo pipefail

broker=raftmq seconds=10 out=""
usage() {
    echo "usage: $0 [--broker raftmq|mosquitto] [--seconds N] [--out DIR] -- SCENARIO ARGS..." >&2
    exit 2
}
while (($#)); do
    case "$1" in
        --broker) broker=$2; shift 2 ;;
        --seconds) seconds=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --) shift; break ;;
        *) usage ;;
    esac
done
(($#)) || usage
[[ $broker == raftmq || $broker == mosquitto ]] || usage
command -v perf >/dev/null || { echo "perf is not installed (apt-get install linux-perf)" >&2; exit 1; }

root=$(cd "$(dirname "$0")/.." && pwd)
target="${CARGO_TARGET_DIR:-$root/target}/release"
mosquitto=${MOSQUITTO:-$(command -v mosquitto || echo /usr/sbin/mosquitto)}
work=$(mktemp -d "${TMPDIR:-/tmp}/raftmq-profile.XXXXXX")
keep=0
[[ -n $out ]] && keep=1 || out=$work
mkdir -p "$out"
# shellcheck source=benches/common.sh
source "$root/benches/common.sh"
cleanup() {
    stop_all 5
    ((keep)) || rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[[ -x $target/raftmq-bench && ($broker == mosquitto || -x $target/raftmq) ]] ||
    (cd "$root" && cargo build --release --locked -p raftmq -p raftmq-bench)

free_port
cluster_port=$port
free_port
if [[ $broker == raftmq ]]; then
    "$target/raftmq" serve --mqtt-addr "127.0.0.1:$port" --http-addr none \
        --cluster-addr "127.0.0.1:$cluster_port" --data-dir "$work/data" --log-level warn \
        >"$work/broker.log" 2>&1 &
else
    write_mosquitto_conf "$work/mosquitto.conf" "$port"
    "$mosquitto" -c "$work/mosquitto.conf" >"$work/broker.log" 2>&1 &
fi
pid=$!
pids+=("$pid")
wait_listening "$pid" "$port" "$work/broker.log"

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
scenario=("$@")
[[ " ${scenario[*]} " == *" --duration "* ]] || scenario+=(--duration "${seconds}s")
[[ " ${scenario[*]} " == *" --warmup "* || ${scenario[0]} == conn || ${scenario[0]} == churn ||
    ${scenario[0]} == retained ]] || scenario+=(--warmup 1s)
"$target/raftmq-bench" "${scenario[@]}" --port "$port" --broker-pid "$pid" --label "$broker" \
    >"$out/summary.txt" &
bench=$!
pids+=("$bench")
# Skip connection set-up and warm-up, then sample the measured part.
sleep 2
perf record -F 1999 -g -p "$pid" -o "$out/perf.data" -- sleep "$((seconds - 2))" \
    >/dev/null 2>"$out/perf-record.log" || { cat "$out/perf-record.log" >&2; exit 1; }
wait "$bench" || true

echo "== $broker: ${scenario[*]}"
cat "$out/summary.txt"
echo
report() {
    perf report -i "$out/perf.data" --no-children -g none --stdio "$@" 2>/dev/null |
        grep -E '^ +[0-9]'
}
echo "== share of samples by thread"
report --sort comm | head -8
echo
echo "== share of samples by library (kernel.kallsyms: the kernel, for the process)"
report --sort dso | head -8
echo
echo "== top symbols (self time)"
report --sort dso,sym | head -40
((keep)) && echo "perf data: $out/perf.data (perf report -i $out/perf.data)"
exit 0
