#!/usr/bin/env bash
# Runs the same load scenarios against raftmq and Mosquitto on this machine and writes a
# Markdown comparison to docs/benchmarks-latest.md.
#
#   benches/compare.sh [--quick]
#
# --quick: shorter runs and smaller counts (a smoke test of the whole pipeline).
#
# Both brokers listen on 127.0.0.1 with equivalent limits (in-flight window, queue length,
# packet size, no persistence, warnings-only logging). Every process this script starts is
# stopped on exit, and every load run is bounded in time. Environment: CARGO_TARGET_DIR is
# honoured; MOSQUITTO overrides the Mosquitto binary (default: mosquitto in PATH, then
# /usr/sbin/mosquitto).
set -euo pipefail

quick=0
case "${1:-}" in
    --quick) quick=1 ;;
    "") ;;
    *) echo "usage: $0 [--quick]" >&2; exit 2 ;;
esac

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}/release"
mosquitto=${MOSQUITTO:-$(command -v mosquitto || echo /usr/sbin/mosquitto)}
out="$root/docs/benchmarks-latest.md"

if ((quick)); then
    duration=3s warmup=1s hold=3s retained_topics=1000 connections=1000
else
    duration=10s warmup=2s hold=5s retained_topics=5000 connections=5000
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/raftmq-compare.XXXXXX")
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || continue
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A TCP port on 127.0.0.1 that nothing listens on.
free_port() {
    local port
    while :; do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
}

# Waits until process $1 accepts connections on port $2 (at most 30 s).
wait_listening() {
    local pid=$1 port=$2 log=$3
    for _ in $(seq 300); do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "broker (pid $pid) exited; last lines of $log:" >&2
            tail -n 20 "$log" >&2
            exit 1
        fi
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return
        fi
        sleep 0.1
    done
    echo "nothing listens on port $port after 30 s" >&2
    exit 1
}

echo "== building (release)"
cargo build --release -p raftmq -p raftmq-bench
bench="$target/raftmq-bench"

# Both brokers and the load generator need a descriptor per connection.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# Stops one broker process started here (by PID) and forgets it.
stop_broker() {
    local pid=$1 kept=() p
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for p in "${pids[@]}"; do [[ $p == "$pid" ]] || kept+=("$p"); done
    pids=("${kept[@]}")
}

start_raftmq() {
    echo "== starting raftmq"
    raftmq_port=$(free_port)
    raftmq_http=$(free_port)
    rm -rf "$work/raftmq-data"
    "$target/raftmq" serve --mqtt-addr "127.0.0.1:$raftmq_port" \
        --http-addr "127.0.0.1:$raftmq_http" --data-dir "$work/raftmq-data" --log-level warn \
        >"$work/raftmq.log" 2>&1 &
    raftmq_pid=$!
    pids+=("$raftmq_pid")
    wait_listening "$raftmq_pid" "$raftmq_port" "$work/raftmq.log"
}

start_mosquitto() {
    echo "== starting Mosquitto"
    mosquitto_port=$(free_port)
    # Equivalent to raftmq's defaults: max_inflight 128, max_queued_messages 10000,
    # max_packet_size 1 MiB, no QoS 0 queueing for offline sessions.
    cat >"$work/mosquitto.conf" <<EOF
listener $mosquitto_port 127.0.0.1
allow_anonymous true
persistence false
max_inflight_messages 128
max_queued_messages 10000
max_packet_size 1048576
queue_qos0_messages false
max_keepalive 65535
set_tcp_nodelay true
sys_interval 0
log_dest stderr
log_type error
log_type warning
EOF
    "$mosquitto" -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
    mosquitto_pid=$!
    pids+=("$mosquitto_pid")
    wait_listening "$mosquitto_pid" "$mosquitto_port" "$work/mosquitto.log"
}

start_raftmq
start_mosquitto

load="--duration $duration --warmup $warmup"
# NAME|ARGUMENTS; NAME orders the report.
scenarios=(
    "01-p2p-qos0|p2p --clients 10 --qos 0 $load"
    "02-p2p-qos1|p2p --clients 10 --qos 1 --inflight 64 $load"
    "03-fanout-qos0|fanout --clients 100 --qos 0 $load"
    "04-fanin-qos0|fanin --clients 50 --qos 0 $load"
    "05-shared-qos1|shared --clients 10 --publishers 2 --qos 1 $load"
    "06-latency-qos1-10k|p2p --clients 10 --qos 1 --rate 10000 $load"
    "07-retained|retained --topics $retained_topics"
    "08-conn|conn --clients $connections --rate 2000 --duration $hold"
    "09-churn|churn --clients 50 --duration $duration"
)

failures=()
for entry in "${scenarios[@]}"; do
    name=${entry%%|*}
    read -r -a args <<<"${entry#*|}"
    if [[ $name == *-conn ]]; then
        # RSS per connection needs fresh processes: memory freed by the message scenarios
        # stays in the allocator and would be reused by the new connections unseen.
        stop_broker "$raftmq_pid"
        stop_broker "$mosquitto_pid"
        start_raftmq
        start_mosquitto
    fi
    for broker in raftmq mosquitto; do
        if [[ $broker == raftmq ]]; then
            port=$raftmq_port pid=$raftmq_pid
        else
            port=$mosquitto_port pid=$mosquitto_pid
        fi
        mkdir -p "$work/$broker"
        echo "== $name on $broker"
        if ! "$bench" "${args[@]}" --port "$port" --broker-pid "$pid" --label "$broker" \
            --json "$work/$broker/$name.json"; then
            failures+=("$name on $broker")
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "$broker died during $name; last lines of its log:" >&2
            tail -n 20 "$work/$broker.log" >&2
            exit 1
        fi
        sleep 1
    done
done

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)
# `mosquitto -h` exits non-zero; its first line is the version.
mosquitto_version=$({ "$mosquitto" -h 2>&1 || true; } | head -n1)
mode=full
((quick)) && mode=quick
mkdir -p "$(dirname "$out")"
"$bench" report "raftmq=$work/raftmq" "mosquitto=$work/mosquitto" --out "$out" \
    --note "Generated by \`benches/compare.sh\` ($mode) on $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)." \
    --note "Machine: ${cpu:-unknown CPU}, $(nproc) cores, $(uname -sr); $mosquitto_version." \
    --note "Brokers and load generator share the machine, over loopback. Limits: in-flight 128, queue 10,000 messages per session, max packet 1 MiB, no persistence, warning-level logs." \
    --note "Message scenarios: $duration measured after $warmup warm-up, 64 B payloads, MQTT 3.1.1; see benches/README.md for each scenario."
echo "== wrote $out"
if ((${#failures[@]})); then
    printf 'failed: %s\n' "${failures[@]}" >&2
    exit 1
fi
