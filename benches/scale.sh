#!/usr/bin/env bash
# Many idle connections spread over several broker processes on this machine.
#
#   benches/scale.sh                          # 6 processes × 17,000 connections (102,000), raftmq
#                                             # then Mosquitto
#   benches/scale.sh --brokers 1 --per-broker 19000   # what one process holds
#   benches/scale.sh --brokers 3 --per-broker 1000 --only raftmq   # a smoke run
#
# Starts --brokers single-node raftmq processes (and then as many Mosquitto processes, unless
# --only says otherwise) on free ports of 127.0.0.1, each with its own data directory under a
# temporary directory. For each broker process it runs one `raftmq-bench conn` process (a process
# may hold at most `ulimit -Hn` files, so one load generator cannot open 100k connections) that
# connects from its own source address 127.0.0.(k+2) and reports that broker's RSS growth per
# connection. While all connections are held it counts the established connections of every
# broker (ss) and reads every broker's RSS, then prints the totals and writes every summary to
# --out DIR (default: the temporary directory, removed at exit). Everything it starts is stopped
# by PID when it exits, including on error or Ctrl-C.
set -euo pipefail

brokers=6 per_broker=17000 rate=500 hold=20s only=both out="" build=1
usage() {
    echo "usage: $0 [--brokers K] [--per-broker N] [--rate CONN/S per process] [--hold DURATION]" >&2
    echo "          [--only raftmq|mosquitto] [--out DIR] [--no-build]" >&2
    exit 2
}
while (($#)); do
    case "$1" in
        --brokers) brokers=$2; shift 2 ;;
        --per-broker) per_broker=$2; shift 2 ;;
        --rate) rate=$2; shift 2 ;;
        --hold) hold=$2; shift 2 ;;
        --only) only=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --no-build) build=0; shift ;;
        *) usage ;;
    esac
done
[[ $only == both || $only == raftmq || $only == mosquitto ]] || usage
((brokers >= 1 && brokers <= 200 && per_broker >= 1)) || usage

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}/release"
mosquitto=${MOSQUITTO:-$(command -v mosquitto || echo /usr/sbin/mosquitto)}

work=$(mktemp -d "${TMPDIR:-/tmp}/raftmq-scale.XXXXXX")
[[ -n $out ]] || out=$work
mkdir -p "$out"
# shellcheck source=benches/common.sh
source "$root/benches/common.sh"
cleanup() {
    stop_all 10
    [[ $out == "$work" ]] || rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

if ((build)); then
    echo "== building (release)"
    cargo build --release -p raftmq -p raftmq-bench
fi
bench="$target/raftmq-bench"
ulimit -n "$(ulimit -Hn)"
files=$(ulimit -n)
if ((per_broker + 64 > files)); then
    echo "--per-broker $per_broker needs more than the $files open files a process may hold" >&2
    exit 1
fi

# Starts one broker process; sets $pid and $port.
start_broker() {
    local kind=$1 k=$2 log cluster
    free_port
    cluster=$port
    free_port
    log="$work/$kind-$k.log"
    if [[ $kind == raftmq ]]; then
        "$target/raftmq" serve --mqtt-addr "127.0.0.1:$port" --http-addr none \
            --cluster-addr "127.0.0.1:$cluster" --data-dir "$work/raftmq-data-$k" \
            --log-level warn >"$log" 2>&1 &
    else
        write_mosquitto_conf "$work/mosquitto-$k.conf" "$port"
        "$mosquitto" -c "$work/mosquitto-$k.conf" >"$log" 2>&1 &
    fi
    pid=$!
}

run() {
    local kind=$1 k
    local -a bpids=() bports=() loads=()
    echo "== $kind: $brokers processes × $per_broker connections at $rate conn/s each, held $hold"
    for ((k = 0; k < brokers; k++)); do
        start_broker "$kind" "$k"
        pids+=("$pid")
        bpids+=("$pid")
        bports+=("$port")
    done
    for ((k = 0; k < brokers; k++)); do
        wait_listening "${bpids[k]}" "${bports[k]}" "$work/$kind-$k.log"
    done
    sleep 1
    local -a before=()
    for ((k = 0; k < brokers; k++)); do
        before+=("$(rss_kib "${bpids[k]}")")
    done
    mkdir -p "$out/$kind"
    for ((k = 0; k < brokers; k++)); do
        "$bench" conn --port "${bports[k]}" --clients "$per_broker" --rate "$rate" \
            --duration "$hold" --connect-timeout 30s --bind "127.0.0.$((k + 2))" \
            --broker-pid "${bpids[k]}" --label "$kind" --json "$out/$kind/conn-$k.json" \
            >"$out/$kind/conn-$k.txt" 2>"$work/$kind-bench-$k.err" &
        pids+=("$!")
        loads+=("$!")
    done
    # Sample once every connection is established, or at the latest shortly before the first
    # load generator can stop holding (it holds --hold after its last handshake).
    local connecting=$(((per_broker + rate - 1) / rate))
    local held=${hold%s}
    [[ $held =~ ^[0-9]+$ ]] || held=10
    local waited=0 open=0 total_open=0 total_rss=0 grown=0
    while ((waited < connecting + held - 2)); do
        sleep 1
        waited=$((waited + 1))
        open=$(ss -Htn state established | awk -v ports=" ${bports[*]} " \
            '{ n = split($3, a, ":"); if (index(ports, " " a[n] " ")) c++ } END { print c + 0 }')
        echo "[${waited}s] $open connections established to the $kind processes"
        ((open >= brokers * per_broker)) && break
    done
    local report="$out/$kind/scale.txt"
    {
        echo "$kind: $brokers processes, $per_broker connections each, sampled after ${waited}s"
        printf '%-8s %-6s %12s %12s %12s %14s\n' process port established "RSS before" "RSS loaded" "bytes/conn"
        # One listing for all processes, counted per local port.
        local listing
        listing=$(ss -Htn state established | awk '{ n = split($3, a, ":"); c[a[n]]++ }
            END { for (p in c) print p, c[p] }')
        for ((k = 0; k < brokers; k++)); do
            local est rss delta per
            est=$(awk -v p="${bports[k]}" '$1 == p { print $2; found = 1 } END { if (!found) print 0 }' <<<"$listing")
            rss=$(rss_kib "${bpids[k]}")
            delta=$((rss - before[k]))
            per=$(awk -v d="$delta" -v n="$est" 'BEGIN { if (n > 0) printf "%.0f", d * 1024 / n; else print "-" }')
            printf '%-8s %-6s %12d %9d KiB %9d KiB %14s\n' "${bpids[k]}" "${bports[k]}" "$est" "${before[k]}" "$rss" "$per"
            total_open=$((total_open + est))
            total_rss=$((total_rss + rss))
            grown=$((grown + delta))
        done
        awk -v n="$total_open" -v r="$total_rss" -v g="$grown" -v b="$brokers" 'BEGIN {
            printf "total: %d connections held at once by %d processes; RSS %.1f MiB in all, ", n, b, r / 1024
            printf "grown by %.1f MiB = %.0f bytes per connection\n", g / 1024, (n > 0 ? g * 1024 / n : 0)
        }'
    } | tee "$report"
    local failed=0
    for pid in "${loads[@]}"; do
        wait "$pid" || failed=1
    done
    for ((k = 0; k < brokers; k++)); do
        if ! kill -0 "${bpids[k]}" 2>/dev/null; then
            echo "$kind process ${bpids[k]} died; last lines of its log:" >&2
            tail -n 20 "$work/$kind-$k.log" >&2
            failed=1
        fi
    done
    echo "per-process summaries (raftmq-bench conn):"
    grep -h -E 'connect|broker|errors' "$out/$kind"/conn-*.txt | sed 's/^/  /' || true
    if ((failed)); then
        echo "a load generator failed; its stderr:" >&2
        tail -n 5 "$work/$kind"-bench-*.err >&2
    fi
    stop_all 10
    return "$failed"
}

status=0
if [[ $only != mosquitto ]]; then run raftmq || status=1; fi
if [[ $only != raftmq ]]; then run mosquitto || status=1; fi
echo "summaries in $out"
exit "$status"
