#!/usr/bin/env bash
# Cluster CPU per durable message, by cluster size and shard count (RFC 0002, section 14).
#
#   benches/sharded.sh                                   # 3 nodes, 1 and 4 shards, 3,000 msg/s
#   benches/sharded.sh --nodes 3,5 --shards 1,4,16 --rate 2000 --repeat 2
#   benches/sharded.sh --shards 64 --quiesce false            # idle shards keep their heartbeats
#
# For every combination (and --repeat times) it starts a new cluster of --nodes `raftmq serve`
# processes on loopback with `cluster.shards` = --shards (node 1 bootstraps, the others join
# through --seeds; benches/cluster.sh), waits until every shard has a leader and every node as a
# voter, and then:
#
#   1. idle: reads every node's CPU time (utime + stime, /proc/PID/stat) over --idle (default
#      10 s) with no client connected;
#   2. load: runs one `raftmq-bench p2p --qos 1 --sub-session-expiry 300` per node, at the same
#      time, each with --pairs / N pairs and --rate / N msg/s: the publishers of the k-th load
#      tool connect to node k and its (persistent) subscribers to node k + 1, so every QoS 1
#      message takes the durable path (committed through the shards' Raft logs before PUBACK)
#      and crosses nodes. Every node's CPU time is read at the start and the end of the
#      measured window (after --warmup).
#
# It prints, and writes to results.md in --out DIR (default: a new temporary directory, kept),
# one row per run: delivered msg/s, the whole cluster's CPU time per message, the busiest and
# the least busy node's share of it, the idle CPU of a node, and the load tools' loss and p99.
# On one machine the throughput cannot grow with N (every process shares its cores): the figure
# that transfers is CPU per message, for the cluster and per node. The rate is fixed so that no
# configuration is saturated (compare CPU at equal work, not throughput).
#
# Binaries: as benches/failover.sh (benches/cluster.sh, find_binaries): $RAFTMQ, else the release
# build in $HOME/.cache/raftmq-target, else the debug one; raftmq-bench from $RAFTMQ_BENCH, else
# built here. Every wait is bounded, and every process the script starts is stopped by PID on
# exit, including on error or Ctrl-C.
set -euo pipefail

nodes_list="3" shards_list="1,4" rate=3000 pairs=12 duration=20s warmup=3s idle=10 repeat=1
out="" wait_binary=2400 quiesce=true
usage() {
    echo "usage: $0 [--nodes N[,N...]] [--shards S[,S...]] [--rate MSG/S] [--pairs P]" >&2
    echo "          [--duration D] [--warmup D] [--idle SECONDS] [--repeat K] [--out DIR]" >&2
    echo "          [--wait-binary SECONDS] [--quiesce true|false]" >&2
    exit 2
}
while (($#)); do
    case "$1" in
        --nodes) nodes_list=$2; shift 2 ;;
        --shards) shards_list=$2; shift 2 ;;
        --rate) rate=$2; shift 2 ;;
        --pairs) pairs=$2; shift 2 ;;
        --duration) duration=$2; shift 2 ;;
        --warmup) warmup=$2; shift 2 ;;
        --idle) idle=$2; shift 2 ;;
        --repeat) repeat=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --wait-binary) wait_binary=$2; shift 2 ;;
        --quiesce) quiesce=$2; shift 2 ;;
        *) usage ;;
    esac
done
[[ $nodes_list =~ ^[0-9]+(,[0-9]+)*$ && $shards_list =~ ^[0-9]+(,[0-9]+)*$ ]] || usage
[[ $rate =~ ^[0-9]+$ && $pairs =~ ^[0-9]+$ && $idle =~ ^[0-9]+$ && $repeat =~ ^[0-9]+$ ]] || usage
[[ $duration =~ ^[0-9]+s$ && $warmup =~ ^[0-9]+s$ ]] || usage
[[ $quiesce == true || $quiesce == false ]] || usage
((repeat >= 1 && repeat <= 20 && rate >= 1)) || usage
for n in ${nodes_list//,/ }; do ((n >= 2 && n <= 9 && pairs >= n)) || usage; done
for s in ${shards_list//,/ }; do ((s >= 1 && s <= 1024)) || usage; done

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# shellcheck source=benches/common.sh
source "$root/benches/common.sh"
# shellcheck source=benches/cluster.sh
source "$root/benches/cluster.sh"
start_run sharded 5 "$wait_binary"

ticks=$(getconf CLK_TCK)
# CPU time of process $1 in clock ticks (utime + stime; fields 14 and 15 of /proc/PID/stat,
# counted after the command name, which may hold spaces).
cpu_ticks() {
    local stat
    stat=$(<"/proc/$1/stat")
    stat=${stat##*) }
    # shellcheck disable=SC2086 # split into fields on purpose
    set -- $stat
    echo $((${12} + ${13}))
}
# Every node's CPU ticks, space-separated, in node order.
cluster_ticks() {
    local id all=""
    for id in $(seq "$cluster_size"); do all+="$(cpu_ticks "${node_pid[id]}") "; done
    echo "$all"
}

rows=()
failures=()
run=0
for ((round = 1; round <= repeat; round++)); do
    for cluster_size in ${nodes_list//,/ }; do
        for shards in ${shards_list//,/ }; do
            run=$((run + 1))
            name=$(printf '%02d-n%s-s%s' "$run" "$cluster_size" "$shards")
            dir=$out/$name
            mkdir -p "$dir"
            echo "== $name: $cluster_size nodes, $shards shards"
            node_env=("RAFTMQ_CLUSTER__SHARDS=$shards" "RAFTMQ_CLUSTER__QUIESCE_IDLE_SHARDS=$quiesce")
            start_cluster "$dir"
            if ! wait_converged "$dir"; then
                failures+=("$name: the cluster did not converge")
                stop_all 5
                continue
            fi
            # Idle: no client.
            before=($(cluster_ticks))
            sleep "$idle"
            after=($(cluster_ticks))
            idle_max=0
            for i in "${!before[@]}"; do
                d=$((after[i] - before[i]))
                ((d > idle_max)) && idle_max=$d
            done
            # Load: one tool per node, all at once.
            tools=()
            per_rate=$((rate / cluster_size)) per_pairs=$((pairs / cluster_size))
            for id in $(seq "$cluster_size"); do
                next=$((id % cluster_size + 1))
                timeout 300 "$bench" p2p --mqtt-version 5 --qos 1 --sub-session-expiry 300 \
                    --clients "$per_pairs" --rate "$per_rate" --duration "$duration" \
                    --warmup "$warmup" --pub-addr "127.0.0.1:${mqtt[id]}" \
                    --sub-addr "127.0.0.1:${mqtt[next]}" --label "$name-$id" \
                    --json "$dir/load-$id.json" >"$dir/load-$id.txt" 2>"$dir/load-$id.log" &
                tools+=("$!")
                pids+=("$!")
            done
            # The measured window of every tool starts after its warm-up (their connects take
            # well under a second, and the window is read from /proc the same way for all).
            sleep "${warmup%s}"
            before=($(cluster_ticks))
            t0=$(date +%s.%N)
            sleep "${duration%s}"
            after=($(cluster_ticks))
            t1=$(date +%s.%N)
            status=0
            for p in "${tools[@]}"; do wait "$p" || status=$?; done
            if ((status != 0)); then
                failures+=("$name: a load tool exited with $status (see $dir/load-*.log)")
            fi
            delivered=$(cat "$dir"/load-*.json | jq -s '[.[].messages.delivered_per_s] | add')
            loss=$(cat "$dir"/load-*.json | jq -s '[.[].messages.loss_ratio] | max')
            p99=$(cat "$dir"/load-*.json | jq -s '[.[].latency_us.p99 // 0] | max / 1000')
            total=0 busiest=0 least=-1
            for i in "${!before[@]}"; do
                d=$((after[i] - before[i]))
                total=$((total + d))
                ((d > busiest)) && busiest=$d
                ((least < 0 || d < least)) && least=$d
            done
            row=$(awk -v total="$total" -v busiest="$busiest" -v least="$least" \
                -v ticks="$ticks" -v t0="$t0" -v t1="$t1" -v rate="$delivered" \
                -v idle="$idle_max" -v idle_s="$idle" -v loss="$loss" -v p99="$p99" \
                -v n="$cluster_size" -v s="$shards" -v name="$name" 'BEGIN {
                    secs = t1 - t0; msgs = rate * secs
                    us = total / ticks * 1e6 / msgs
                    printf "| %s | %d | %d | %.0f | %.1f | %.0f %% | %.0f %% | %.1f %% | %.4f | %.1f ms |",
                        name, n, s, rate, us, 100 * busiest / total, 100 * least / total,
                        100 * idle / ticks / idle_s, loss, p99
                }')
            echo "$row"
            rows+=("$row")
            stop_all 5
            rm -rf "${dir:?}"/n[0-9]*/
        done
    done
done

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)
{
    echo "Generated by \`benches/sharded.sh --nodes $nodes_list --shards $shards_list --rate $rate --pairs $pairs --duration $duration --warmup $warmup --idle $idle --repeat $repeat --quiesce $quiesce\` on $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)."
    echo "Machine: ${cpu:-unknown CPU}, $(nproc) cores, $(uname -sr); raftmq $profile build; every node and load tool on loopback."
    echo
    echo "| run | nodes | shards | delivered msg/s | cluster CPU µs per message | busiest node's share | least busy node's share | idle CPU of the busiest node | loss (worst tool) | p99 (worst tool) |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    printf '%s\n' "${rows[@]}"
} >"$out/results.md"
echo
cat "$out/results.md"
echo
echo "results, summaries and node logs in $out"
if ((${#failures[@]})); then
    printf 'failed: %s\n' "${failures[@]}" >&2
    exit 1
fi
