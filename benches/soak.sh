#!/usr/bin/env bash
# Soak of a 3-node raftmq cluster on loopback: a steady durable QoS 1 load for --minutes, then
# whether the cluster stayed quiet: no election or term change after the initial one, no node
# declared down, no self-fence.
#
#   benches/soak.sh                         # 10 minutes at the default rate
#   benches/soak.sh --minutes 3 --rate 1000 # shorter, lighter
#
# The script starts a new cluster (three `raftmq serve` processes with their own data
# directories; node 1 bootstraps, the others join through --seeds, as failover.sh does), waits
# until the nodes agree on a leader, and reads every node's /metrics (the baseline). It then runs
# three `raftmq-bench p2p` loads at once, in a ring: publishers on node 1 with persistent
# subscribers (MQTT 5, session expiry 300 s) on node 2, 2 → 3 and 3 → 1, --pairs pairs each,
# QoS 1, --rate msg/s in all (a third each), 64 B payloads, at most --inflight (default 256)
# unacknowledged per publisher. A QoS 1 publish to a persistent session takes the durable path:
# it is committed through Raft before its PUBACK.
#
# Every 10 s it samples the Raft and failure metrics of every node and the CPU time of the nodes
# and of the load processes (metrics.csv). At the end it reads /metrics again and prints a table
# per node (start → end) of:
#   raftmq_raft_term, raftmq_raft_leader_changes_total, raftmq_raft_dead_leader_elections_total,
#   raftmq_cluster_nodes_declared_down_total, raftmq_cluster_self_fences_total,
#   raftmq_raft_commit_failures_total
# (a metric a node does not export counts as 0: counters appear once they have counted, and
# older binaries have no raftmq_raft_dead_leader_elections_total), with the CPU used and the
# load's delivery. It exits non-zero if, on any node, the term or the leader changes counter
# moved after the baseline, or any node-down declaration, self-fence or dead-leader election
# happened; or if a node exited, a load process failed, or an acknowledged message was lost.
# Commit failures are reported but do not fail the run.
#
# Output, in --out DIR (default: a new temporary directory, kept): results.md (the table and the
# command), metrics.csv, each node's /metrics at the start and the end, node logs, and each load
# process's output and JSON summary. The nodes' data directories are removed at the end.
#
# Binaries: as failover.sh (benches/cluster.sh, find_binaries).
#
# Every wait is bounded: the loads end by themselves after --minutes (plus a 5 s warm-up and a
# 10 s drain) and are stopped by PID 60 s after that at the latest. Every process the script
# starts is stopped by PID on exit, including on error or Ctrl-C.
set -euo pipefail

minutes=10 rate=2000 pairs=5 inflight=256 out="" wait_binary=2400
usage() {
    echo "usage: $0 [--minutes N] [--rate MSG/S] [--pairs N] [--inflight N] [--out DIR]" >&2
    echo "          [--wait-binary SECONDS]" >&2
    exit 2
}
while (($#)); do
    case "$1" in
        --minutes) minutes=$2; shift 2 ;;
        --rate) rate=$2; shift 2 ;;
        --pairs) pairs=$2; shift 2 ;;
        --inflight) inflight=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --wait-binary) wait_binary=$2; shift 2 ;;
        *) usage ;;
    esac
done
# True if $1 is a whole number from $2 to $3.
in_range() { [[ $1 =~ ^[0-9]+$ ]] && (($1 >= $2 && $1 <= $3)); }
in_range "$minutes" 1 240 || usage
in_range "$rate" 3 1000000 || usage
in_range "$pairs" 1 1000 || usage
in_range "$inflight" 1 65535 || usage
[[ $wait_binary =~ ^[0-9]+$ ]] || usage
for tool in curl jq awk; do
    command -v "$tool" >/dev/null || { echo "$tool is required" >&2; exit 1; }
done

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
work=$(mktemp -d "${TMPDIR:-/tmp}/raftmq-soak.XXXXXX")
[[ -n $out ]] || out=$work
mkdir -p "$out"
# The nodes' data directories ($out/n1..n3, removed at the end) and logs ($out/n1.log..).
data=$out

# shellcheck source=benches/common.sh
source "$root/benches/common.sh"
# shellcheck source=benches/cluster.sh
source "$root/benches/cluster.sh"
cleanup() {
    stop_all 5
    rm -rf "$data/n1" "$data/n2" "$data/n3" "$work/raftmq"
    [[ $out == "$work" ]] || rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

find_binaries "$work" "$wait_binary"

# --- measurements -----------------------------------------------------------------------------
metric_names=(
    raftmq_raft_term
    raftmq_raft_leader_changes_total
    raftmq_raft_dead_leader_elections_total
    raftmq_cluster_nodes_declared_down_total
    raftmq_cluster_self_fences_total
    raftmq_raft_commit_failures_total
)
# Short names, same order, for the CSV and the table.
metric_short=(term leader_changes dead_leader_elections declared_down self_fences commit_failures)

# Prints the values of the metrics in $metric_names, space-separated, from the exposition in
# file $1: each summed over its label sets; 0 when absent.
metric_values() {
    awk -v names="${metric_names[*]}" '
        BEGIN { n = split(names, name, " "); for (i = 1; i <= n; i++) sum[name[i]] = 0 }
        /^#/ { next }
        {
            key = $1
            sub(/\{.*/, "", key)
            if (key in sum) sum[key] += $2
        }
        END {
            line = ""
            for (i = 1; i <= n; i++) line = line (i > 1 ? " " : "") sprintf("%.0f", sum[name[i]])
            print line
        }' "$1"
}

# Saves node $1's /metrics to file $2; fails if the node does not answer.
scrape() { http_get "${http[$1]}" /metrics >"$2.tmp" && mv "$2.tmp" "$2"; }

# CPU time of process $1 in clock ticks (user + system); nothing once it is gone.
proc_ticks() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    # Fields after the command name (which is in parentheses): state is field 3, utime 14.
    awk '{ print $12 + $13 }' <<<"${stat##*) }"
}

# CPU ticks of each process of ours, as last seen (kept once a process is gone), by PID.
declare -A seen_ticks
# Sets $ticks to the sum of the CPU ticks of processes $@ (the last value seen for those gone).
sum_ticks() {
    local pid t
    ticks=0
    for pid in "$@"; do
        t=$(proc_ticks "$pid")
        if [[ -n $t ]] && ((t > ${seen_ticks[$pid]:-0})); then
            seen_ticks[$pid]=$t
        fi
        ticks=$((ticks + ${seen_ticks[$pid]:-0}))
    done
}

# Busy and total clock ticks of the whole machine (all cores), from /proc/stat.
machine_ticks() {
    awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t; exit }' /proc/stat
}

hz=$(getconf CLK_TCK)
cores=$(nproc)

# --- cluster ----------------------------------------------------------------------------------
echo "== starting a 3-node cluster"
start_cluster "$data"
if ! wait_converged "$data"; then
    echo "the cluster did not start" >&2
    exit 1
fi
echo "   leader: node $leader; pids ${node_pid[1]} ${node_pid[2]} ${node_pid[3]}"
declare -A start_value end_value
for id in 1 2 3; do
    scrape "$id" "$out/metrics-start-n$id.txt"
    read -r -a values <<<"$(metric_values "$out/metrics-start-n$id.txt")"
    for i in "${!metric_short[@]}"; do
        start_value[$id,${metric_short[i]}]=${values[i]}
    done
done

# --- load -------------------------------------------------------------------------------------
per_stream=$(awk -v r="$rate" 'BEGIN { printf "%.3f", r / 3 }')
load_pid=()
load_cmd=()
for id in 1 2 3; do
    to=$((id % 3 + 1))
    cmd=("$bench" p2p --port "${mqtt[id]}" --pub-addr "127.0.0.1:${mqtt[id]}"
        --sub-addr "127.0.0.1:${mqtt[to]}" --mqtt-version 5 --qos 1 --sub-session-expiry 300
        --clients "$pairs" --rate "$per_stream" --inflight "$inflight" --payload 64 --warmup 5s
        --duration "${minutes}m" --drain 10s --label "soak-$id-to-$to"
        --json "$out/load-$id-to-$to.json")
    load_cmd[id]="${cmd[*]}"
    "${cmd[@]}" >"$out/load-$id-to-$to.txt" 2>"$out/load-$id-to-$to.log" &
    load_pid[id]=$!
    pids+=("$!")
done
echo "== load: 3 × p2p of $pairs pairs, QoS 1 to persistent sessions, $rate msg/s in all, for $minutes min"

csv=$out/metrics.csv
{
    printf 'elapsed_s'
    for id in 1 2 3; do
        for m in "${metric_short[@]}"; do printf ',n%s_%s' "$id" "$m"; done
    done
    echo ',nodes_cpu_pct,load_cpu_pct,machine_cpu_pct'
} >"$csv"

# Percent of the whole machine (all cores) that $1 ticks over $2 seconds are.
pct() { awk -v t="$1" -v s="$2" -v hz="$hz" -v c="$cores" 'BEGIN { printf "%.1f", (s > 0 ? 100 * t / hz / s / c : 0) }'; }

started=$(date +%s)
# Publishing ends after the warm-up and --minutes; the CPU figures cover samples up to then.
load_end=$((started + 5 + minutes * 60))
limit=$((load_end + 10 + 60))
read -r m_busy0 m_total0 <<<"$(machine_ticks)"
sum_ticks "${node_pid[@]}"; n0=$ticks
sum_ticks "${load_pid[@]}"; l0=$ticks
t_prev=$started
n_prev=$n0 l_prev=$l0 mb_prev=$m_busy0 mt_prev=$m_total0
t_win=$started n_win=$n0 l_win=$l0 mb_win=$m_busy0 mt_win=$m_total0
failures=()
# A node that exits is a failure; the loads go on (they end by themselves) so that their
# summaries and the survivors' metrics show what followed.
dead=()
while :; do
    running=0
    for id in 1 2 3; do alive "${load_pid[id]}" && running=$((running + 1)); done
    ((running > 0)) || break
    for id in 1 2 3; do
        if [[ -z ${dead[id]:-} ]] && ! alive "${node_pid[id]}"; then
            failures+=("node $id (pid ${node_pid[id]}) exited $(($(date +%s) - started)) s into the soak")
            dead[id]=1
        fi
    done
    if (($(date +%s) >= limit)); then
        failures+=("the load did not end within 60 s of its end; stopped")
        break
    fi
    sleep 10
    now=$(date +%s)
    sum_ticks "${node_pid[@]}"; n1=$ticks
    sum_ticks "${load_pid[@]}"; l1=$ticks
    read -r mb mt <<<"$(machine_ticks)"
    line=$((now - started))
    for id in 1 2 3; do
        if scrape "$id" "$work/metrics-now.txt" 2>/dev/null; then
            line+=",$(metric_values "$work/metrics-now.txt" | tr ' ' ',')"
        else
            line+=$(printf ',%.0s' "${metric_short[@]}")
        fi
    done
    dt=$((now - t_prev))
    machine_pct=$(awk -v b=$((mb - mb_prev)) -v t=$((mt - mt_prev)) 'BEGIN { printf "%.1f", (t > 0 ? 100 * b / t : 0) }')
    echo "$line,$(pct $((n1 - n_prev)) "$dt"),$(pct $((l1 - l_prev)) "$dt"),$machine_pct" >>"$csv"
    if (((now - started) % 60 < 10)); then
        echo "   [$((now - started))s] nodes $(pct $((n1 - n_prev)) "$dt") %, load tool $(pct $((l1 - l_prev)) "$dt") %, machine $machine_pct % of $cores cores"
    fi
    t_prev=$now n_prev=$n1 l_prev=$l1 mb_prev=$mb mt_prev=$mt
    if ((now <= load_end)); then
        t_win=$now n_win=$n1 l_win=$l1 mb_win=$mb mt_win=$mt
    fi
done
# CPU while publishing: from the load's start to the last sample before publishing ended.
elapsed=$(($(date +%s) - started))
window=$((t_win - started))
nodes_pct=$(pct $((n_win - n0)) "$window")
load_pct=$(pct $((l_win - l0)) "$window")
machine_pct=$(awk -v b=$((mb_win - m_busy0)) -v t=$((mt_win - m_total0)) 'BEGIN { printf "%.1f", (t > 0 ? 100 * b / t : 0) }')

load_failed=()
for id in 1 2 3; do
    status=0
    if alive "${load_pid[id]}"; then
        stop_pid "${load_pid[id]}" 5
        status=124
    else
        wait "${load_pid[id]}" || status=$?
    fi
    if ((status == 124)); then
        load_failed+=("load $id → $((id % 3 + 1)) did not end by itself; stopped")
    elif ((status != 0)); then
        load_failed+=("load $id → $((id % 3 + 1)) exited with $status")
    fi
done
failures+=("${load_failed[@]}")

# --- end state --------------------------------------------------------------------------------
for id in 1 2 3; do
    if alive "${node_pid[id]}" && scrape "$id" "$out/metrics-end-n$id.txt"; then
        read -r -a values <<<"$(metric_values "$out/metrics-end-n$id.txt")"
        for i in "${!metric_short[@]}"; do
            end_value[$id,${metric_short[i]}]=${values[i]}
        done
    else
        failures+=("node $id did not answer /metrics at the end")
        for m in "${metric_short[@]}"; do end_value[$id,$m]="?"; done
    fi
done
stop_all 5

# Checks: counters (and the term) must not move after the baseline.
for id in 1 2 3; do
    for m in term leader_changes dead_leader_elections declared_down self_fences; do
        s=${start_value[$id,$m]} e=${end_value[$id,$m]}
        [[ $e == "?" ]] && continue
        if ((e != s)); then
            failures+=("node $id: $m $s → $e")
        fi
    done
done

# The load: rate, published, acknowledged, lost, latency, errors (from each JSON summary).
load_rows=()
warnings=()
for id in 1 2 3; do
    j=$out/load-$id-to-$((id % 3 + 1)).json
    if [[ -s $j ]]; then
        load_rows+=("$(jq -r --arg s "node $id → node $((id % 3 + 1))" '
            [$s, (.messages.offered_per_s | round | tostring), (.messages.published | tostring),
             (.messages.acked | tostring),
             (.messages.lost | tostring), (.messages.duplicates | tostring),
             (if .latency_us == null then "–" else (.latency_us.p50 / 1000 * 10 | round / 10 | tostring) + " ms" end),
             (if .latency_us == null then "–" else (.latency_us.p99 / 1000 * 10 | round / 10 | tostring) + " ms" end),
             (if .latency_us == null then "–" else (.latency_us.max / 1000 | round | tostring) + " ms" end),
             (.error_count | tostring)]
            | "| " + join(" | ") + " |"' "$j")")
        lost=$(jq -r '.messages.lost // 0' "$j")
        ((lost == 0)) || failures+=("load $id → $((id % 3 + 1)): $lost messages lost")
        if jq -e --argjson want "$per_stream" '.messages.offered_per_s < 0.95 * $want' "$j" >/dev/null; then
            warnings+=("load $id → $((id % 3 + 1)) published $(jq -r '.messages.offered_per_s | round' "$j") msg/s of $per_stream: it fell behind (the machine or the cluster was saturated), so the soak ran lighter than asked")
        fi
    else
        load_rows+=("| node $id → node $((id % 3 + 1)) | (no summary: see load-$id-to-$((id % 3 + 1)).log) | | | | | | | | |")
        failures+=("load $id → $((id % 3 + 1)): no summary")
    fi
done

results=$out/results.md
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)
{
    echo "Generated by \`benches/soak.sh --minutes $minutes --rate $rate --pairs $pairs --inflight $inflight\` on $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); ${elapsed} s of load."
    echo "Machine: ${cpu:-unknown CPU}, $cores cores, $(uname -sr); raftmq $profile build ($raftmq, $(date -u -r "$raftmq" '+%Y-%m-%d %H:%M UTC')); 3 nodes and the load tool on loopback; initial leader node $leader."
    echo "CPU while publishing (${window} s sampled), in % of all $cores cores: raftmq nodes $nodes_pct %, load tool $load_pct %, whole machine $machine_pct % (other work on the machine included)."
    echo
    echo "| node | term | leader changes | dead-leader elections | nodes declared down | self-fences | commit failures |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    for id in 1 2 3; do
        row="| $id"
        for m in "${metric_short[@]}"; do
            s=${start_value[$id,$m]} e=${end_value[$id,$m]}
            if [[ $s == "$e" ]]; then row+=" | $e"; else row+=" | **$s → $e**"; fi
        done
        echo "$row |"
    done
    echo
    echo "Values at the end; **a → b** where a value moved after the baseline taken once the cluster had converged."
    echo
    echo "| load | msg/s (of $per_stream) | published | acknowledged | lost | duplicates | latency p50 | p99 | max | errors |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    printf '%s\n' "${load_rows[@]}"
    echo
    echo "Load commands:"
    echo
    for id in 1 2 3; do echo "    ${load_cmd[id]}"; done
    echo
    if ((${#warnings[@]})); then
        echo "Warnings:"
        printf -- '- %s\n' "${warnings[@]}"
        echo
    fi
    if ((${#failures[@]})); then
        echo "FAILED:"
        printf -- '- %s\n' "${failures[@]}"
    else
        echo "PASSED: no election or term change after the initial one, no node declared down, no self-fence."
    fi
} >"$results"
echo
cat "$results"
echo
echo "results, metrics, load summaries and node logs in $out"
((${#failures[@]} == 0)) || exit 1
