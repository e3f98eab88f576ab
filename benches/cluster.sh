# shellcheck shell=bash
# Shell helpers of the scripts that run 3-node raftmq clusters on loopback (failover.sh,
# soak.sh). Source it after common.sh. It defines functions only; they set the variables named
# in their comments.

# The common start of a script that runs clusters: checks for curl and jq, makes the work
# directory $work (and $out, if empty, is it), removes it on exit (unless it is $out) after
# stopping every process started (stop_all $2), and finds the binaries (find_binaries, waiting
# up to $3 s). $1 names the run (the work directory's prefix). Call it after sourcing common.sh.
start_run() {
    local tool
    for tool in curl jq; do
        command -v "$tool" >/dev/null || { echo "$tool is required" >&2; exit 1; }
    done
    work=$(mktemp -d "${TMPDIR:-/tmp}/raftmq-$1.XXXXXX")
    [[ -n $out ]] || out=$work
    mkdir -p "$out"
    stop_wait=$2
    # shellcheck disable=SC2317 # called by the trap
    cleanup() {
        stop_all "$stop_wait"
        rm -f "$work/raftmq"
        [[ $out == "$work" ]] || rm -rf "$work"
    }
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    find_binaries "$work" "$3"
}

# Finds the binaries; sets $raftmq (the binary found), $raftmq_bin (a copy of it in directory
# $1: a rebuild replacing the original cannot mix versions in a cluster), $profile and $bench.
#   raftmq: $RAFTMQ, else $HOME/.cache/raftmq-target/release/raftmq, else .../debug/raftmq,
#           waiting up to $2 s for a build in progress to produce one (never built here: its
#           first build compiles RocksDB).
#   raftmq-bench: $RAFTMQ_BENCH, else built here (debug; it depends on the codec only) with
#           CARGO_TARGET_DIR=$HOME/.cache/raftmq-target-failover.
find_binaries() {
    local copy_dir=$1 wait_binary=$2 cache=$HOME/.cache/raftmq-target waited=0
    raftmq=${RAFTMQ:-}
    if [[ -z $raftmq ]]; then
        while :; do
            if [[ -x $cache/release/raftmq ]]; then
                raftmq=$cache/release/raftmq profile=release
                break
            elif [[ -x $cache/debug/raftmq ]]; then
                raftmq=$cache/debug/raftmq profile=debug
                break
            fi
            if ((waited >= wait_binary)); then
                echo "no raftmq binary in $cache/{release,debug} after ${wait_binary}s" >&2
                exit 1
            fi
            echo "waiting for $cache/debug/raftmq (a build is in progress?), ${waited}s so far"
            sleep 30
            waited=$((waited + 30))
        done
    else
        profile="from \$RAFTMQ"
    fi
    cp "$raftmq" "$copy_dir/raftmq"
    echo "== raftmq: $raftmq ($profile build, $(date -u -r "$raftmq" '+%Y-%m-%d %H:%M UTC'))"
    raftmq_bin=$copy_dir/raftmq

    bench=${RAFTMQ_BENCH:-}
    if [[ -z $bench ]]; then
        echo "== building raftmq-bench (debug)"
        CARGO_TARGET_DIR=$HOME/.cache/raftmq-target-failover \
            cargo build --locked -p raftmq-bench --bin raftmq-bench
        bench=$HOME/.cache/raftmq-target-failover/debug/raftmq-bench
    fi
    echo "== raftmq-bench: $bench"
}

# GET http://127.0.0.1:$1$2 (2 s bound); prints the body, fails unless 200.
http_get() { curl -fsS --max-time 2 "http://127.0.0.1:$1$2"; }

# Starts nodes 1..$cluster_size (default 3) of a new cluster in $1 (data directories $1/nN, logs
# $1/nN.log), each with the extra `raftmq serve` arguments ${@:2} and the environment variables
# of the array $node_env (e.g. RAFTMQ_CLUSTER__SHARDS=4); sets node_pid, mqtt, http, cluster
# (arrays by node id) and adds the PIDs to $pids.
# shellcheck disable=SC2154 # $port is set by free_port (common.sh)
start_cluster() {
    local dir=$1 id seeds=""
    shift
    node_pid=() mqtt=() http=() cluster=()
    for id in $(seq "${cluster_size:-3}"); do
        free_port; mqtt[id]=$port
        free_port; http[id]=$port
        free_port; cluster[id]=$port
        seeds+="${seeds:+,}127.0.0.1:${cluster[id]}"
    done
    for id in $(seq "${cluster_size:-3}"); do
        # A clean environment: no RAFTMQ_* variable of the caller changes the nodes' config.
        env -i HOME="$HOME" PATH="$PATH" ${node_env[@]+"${node_env[@]}"} "$raftmq_bin" serve --node-id "$id" \
            --mqtt-addr "127.0.0.1:${mqtt[id]}" --http-addr "127.0.0.1:${http[id]}" \
            --cluster-addr "127.0.0.1:${cluster[id]}" --seeds "$seeds" \
            --data-dir "$dir/n$id" --log-level warn "$@" >"$dir/n$id.log" 2>&1 &
        node_pid[id]=$!
        pids+=("$!")
    done
}

# Waits (at most 60 s) until every node of the cluster whose logs are in $1 is ready, all agree
# on a leader and $cluster_size (default 3) voters, and every shard has a leader and that many
# voters; sets $leader (a node id).
wait_converged() {
    local dir=$1 id views leaders voters shards n=${cluster_size:-3}
    for _ in $(seq 300); do
        for id in $(seq "$n"); do
            if ! alive "${node_pid[id]}"; then
                echo "node $id (pid ${node_pid[id]}) exited; last lines of its log:" >&2
                tail -n 20 "$dir/n$id.log" >&2
                return 1
            fi
        done
        views=""
        for id in $(seq "$n"); do
            http_get "${http[id]}" /readyz >/dev/null 2>&1 || { views=""; break; }
            views+="$(http_get "${http[id]}" /api/v1/cluster 2>/dev/null || echo '{}')"$'\n'
        done
        if [[ -n $views ]]; then
            leaders=$(jq -r '.leader // "none"' <<<"$views" | sort -u)
            voters=$(jq -r '.voters | length' <<<"$views" | sort -u)
            # Per node: "ok" when each of its shards has a leader and n voters.
            shards=$(jq -r --argjson n "$n" \
                'if all((.shards // [])[]; .leader != null and (.voters | length) == $n)
                 then "ok" else "no" end' <<<"$views" | sort -u)
            if [[ $leaders =~ ^[0-9]+$ && $voters == "$n" && $shards == ok ]]; then
                # shellcheck disable=SC2034 # for the caller
                leader=$leaders
                return 0
            fi
        fi
        sleep 0.2
    done
    echo "the cluster did not converge within 60 s; last views:" >&2
    echo "$views" >&2
    return 1
}
