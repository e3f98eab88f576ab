#!/usr/bin/env bash
# Failover time of a 3-node raftmq cluster on loopback: node kill → clients reconnected and
# receiving again (`raftmq-bench failover`).
#
#   benches/failover.sh                     # both trials at QoS 1 and QoS 2, once each (~1 min)
#   benches/failover.sh --qos 1 --repeat 3  # QoS 1 only, each trial three times
#
# Trials, each on a freshly created cluster (three `raftmq serve` processes with their own data
# directories under a temporary directory; node 1 bootstraps, the others join through --seeds):
#
#   follower-sub  the subscriber is on a follower, which is killed; the publisher is on the
#                 other follower
#   leader        the subscriber is on the leader, which is killed; the publisher is on a
#                 follower
#
# Unless --no-wills, clients with wills also connect to the node to be killed (a persistent
# session, a client without a session, and a persistent session whose will waits 2 s), and a
# subscriber on a surviving node times their wills and checks that each arrives exactly once.
#
# The load tool kills the node itself (SIGKILL, `--kill-pid`) after --before of steady load, and
# reports the times from the kill. The script prints a Markdown table and writes it
# (results.md), with every JSON summary, load tool output and node log, to --out DIR (default: a
# new temporary directory, kept). It exits non-zero if a trial did not recover, lost an
# acknowledged message, or a will did not arrive exactly once.
#
# Binaries (benches/cluster.sh, find_binaries): raftmq from $RAFTMQ, else
# $HOME/.cache/raftmq-target/release/raftmq, else .../debug/raftmq (waiting up to 40 min for a
# build in progress to produce it; raftmq is never built here: its first build compiles
# RocksDB). raftmq-bench from $RAFTMQ_BENCH, else built here (debug; it depends on the codec
# only) with CARGO_TARGET_DIR=$HOME/.cache/raftmq-target-failover.
#
# Every wait is bounded, and every process the script starts is stopped by PID on exit,
# including on error or Ctrl-C.
set -euo pipefail

qos_list="1,2" trials="follower-sub,leader" repeat=1 rate=1000 before=3s after=20s out=""
wait_binary=2400 wills=(--will-delay 2) no_wills=
usage() {
    echo "usage: $0 [--qos 1|2|1,2] [--trials follower-sub,leader] [--repeat N] [--rate MSG/S]" >&2
    echo "          [--before D] [--after D] [--no-wills] [--out DIR] [--wait-binary SECONDS]" >&2
    exit 2
}
while (($#)); do
    case "$1" in
        --qos) qos_list=$2; shift 2 ;;
        --trials) trials=$2; shift 2 ;;
        --repeat) repeat=$2; shift 2 ;;
        --rate) rate=$2; shift 2 ;;
        --before) before=$2; shift 2 ;;
        --after) after=$2; shift 2 ;;
        --no-wills) wills=(--no-wills) no_wills=" --no-wills"; shift ;;
        --out) out=$2; shift 2 ;;
        --wait-binary) wait_binary=$2; shift 2 ;;
        *) usage ;;
    esac
done
[[ $qos_list =~ ^[12](,[12])*$ ]] || usage
[[ $trials =~ ^(follower-sub|leader)(,(follower-sub|leader))*$ ]] || usage
if ! [[ $repeat =~ ^[0-9]+$ ]] || ((repeat < 1 || repeat > 50)); then usage; fi
[[ $wait_binary =~ ^[0-9]+$ ]] || usage

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# shellcheck source=benches/common.sh
source "$root/benches/common.sh"
# --- binaries and cluster ---------------------------------------------------------------------
# shellcheck source=benches/cluster.sh
source "$root/benches/cluster.sh"
start_run failover 3 "$wait_binary"

# --- trials -----------------------------------------------------------------------------------
results=$out/results.md
rows=()
failures=()
n=0
IFS=, read -r -a qos_levels <<<"$qos_list"
IFS=, read -r -a trial_kinds <<<"$trials"
# Formats a JSON number of ms (or null) for the table.
ms() { jq -r "if $1 == null then \"${2:-–}\" else ($1 | round | tostring) + \" ms\" end" "$3"; }
# The publisher's connection in summary $1: kept, or kill → reconnected, to which node id.
publisher_cell() {
    jq -r '.failover | if .pub_lost | not then "kept"
        elif .pub_reconnect_ms == null then "NOT reconnected"
        else (.pub_reconnect_ms | round | tostring) + " ms to node "
            + (if .pub_reconnect_node == null then "?" else (.pub_reconnect_node + 1 | tostring) end)
        end' "$1"
}
# Will $1 in summary $2: kill → received (or NOT received), and how often it was published
# when not once.
will_cell() {
    jq -r --arg name "$1" '[.failover.wills[]? | select(.name == $name)] | first
        | if . == null then "–"
          elif .received_ms == null then "NOT received"
          else (.received_ms | round | tostring) + " ms"
              + (if .publications == 1 then "" else " (published \(.publications) times)" end)
          end' "$2"
}

for ((round = 1; round <= repeat; round++)); do
    for qos in "${qos_levels[@]}"; do
        for trial in "${trial_kinds[@]}"; do
            n=$((n + 1))
            name=$(printf '%02d-%s-qos%s' "$n" "$trial" "$qos")
            # Node data dirs (removed after the trial) and logs, the load tool's stderr.
            dir=$out/$name
            mkdir -p "$dir"
            echo "== $name: starting a 3-node cluster"
            start_cluster "$dir"
            if ! wait_converged "$dir"; then
                failures+=("$name: cluster did not start")
                stop_all 3
                continue
            fi
            # Node ids 1..3 are indexes 0..2 of --addrs.
            followers=()
            for id in 1 2 3; do
                ((id == leader)) || followers+=("$id")
            done
            if [[ $trial == follower-sub ]]; then
                sub=${followers[0]} pub=${followers[1]} killed=${followers[0]}
            else
                sub=$leader pub=${followers[0]} killed=$leader
            fi
            echo "   leader: node $leader; subscriber on node $sub, publisher on node $pub, killing node $killed (pid ${node_pid[killed]})"
            status=0
            timeout 120 "$bench" failover \
                --addrs "127.0.0.1:${mqtt[1]},127.0.0.1:${mqtt[2]},127.0.0.1:${mqtt[3]}" \
                --sub-node $((sub - 1)) --pub-node $((pub - 1)) --killed-node $((killed - 1)) \
                --kill-pid "${node_pid[killed]}" --qos "$qos" --rate "$rate" \
                --before "$before" --after "$after" "${wills[@]}" \
                --label "$name" --json "$out/$name.json" \
                >"$out/$name.txt" 2>"$dir/bench.log" || status=$?
            cat "$out/$name.txt"
            if [[ -s $out/$name.json ]]; then
                j=$out/$name.json
                sub_back=$(ms .failover.sub_reconnect_ms "kept" "$j")
                if [[ $(jq -r .failover.sub_lost "$j") == true && $sub_back == kept ]]; then
                    sub_back="NOT reconnected"
                fi
                present=$(jq -r '.failover.sub_session_present' "$j")
                if [[ $present == true ]]; then
                    sub_back+=" (session present)"
                elif [[ $present == false ]]; then
                    sub_back+=" (NO session)"
                fi
                rows+=("| $name | node $killed ($([[ $trial == leader ]] && echo leader || echo follower)) | $sub_back | $(publisher_cell "$j") | $(ms .failover.first_message_ms "none" "$j") | $(ms .failover.first_fresh_message_ms "none" "$j") | $(ms .failover.first_fresh_ack_ms "none" "$j") | $(ms .failover.recovered_ms "NOT recovered" "$j") | $(ms .failover.max_receive_gap_ms "–" "$j") | $(jq -r .failover.acked "$j") | $(jq -r .failover.missing_acked "$j") | $(jq -r .failover.duplicates "$j") | $(will_cell persistent "$j") | $(will_cell sessionless "$j") | $(will_cell delayed "$j") |")
            else
                rows+=("| $name | node $killed | (no summary: see $out/$name.txt) | | | | | | | | | | | | |")
            fi
            if ((status != 0)); then
                failures+=("$name (exit $status)")
                echo "   raftmq-bench exited with $status; its stderr:" >&2
                tail -n 5 "$dir/bench.log" >&2
            fi
            stop_all 3
            rm -rf "$dir/n1" "$dir/n2" "$dir/n3"
        done
    done
done

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)
{
    echo "Generated by \`benches/failover.sh --qos $qos_list --trials $trials --repeat $repeat --rate $rate --before $before --after $after$no_wills\` on $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)."
    echo "Machine: ${cpu:-unknown CPU}, $(nproc) cores, $(uname -sr); raftmq $profile build ($raftmq, $(date -u -r "$raftmq" '+%Y-%m-%d %H:%M UTC')); 3 nodes and the load tool on loopback."
    echo
    echo "| trial | killed | kill → subscriber reconnected | publisher | kill → first message | kill → first fresh message | kill → first fresh ack | recovered | longest gap | acked | missing acked | duplicates | kill → will, persistent session | kill → will, no session | kill → will, delay 2 s |"
    echo "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    printf '%s\n' "${rows[@]}"
} >"$results"
echo
cat "$results"
echo
echo "results, summaries and node logs in $out"
if ((${#failures[@]})); then
    printf 'failed: %s\n' "${failures[@]}" >&2
    exit 1
fi
