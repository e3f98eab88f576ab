# Shell helpers shared by the benchmark scripts (compare.sh, scale.sh, profile.sh,
# failover.sh). Source it; it defines functions and two variables only:
#   pids   the processes the script started, stopped by stop_all (by PID, never by name)
#   taken  ports handed out by free_port in this run

pids=()
taken=" "

# Sets $port to a free TCP port of 127.0.0.1 below the ephemeral range (so no client socket can
# hold it), not handed out before in this run (a broker not yet listening does not show as busy).
free_port() {
    while :; do
        port=$((20000 + RANDOM % 12000))
        [[ $taken == *" $port "* ]] && continue
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            taken+="$port "
            return
        fi
    done
}

# Waits until process $1 accepts connections on port $2 (at most 30 s); on failure prints the
# end of its log $3 and exits.
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

# True while process $1 runs (a zombie does not count).
alive() {
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ $state != Z* ]]
}

# Stops process $1: SIGTERM, up to ${2:-3} s, then SIGKILL; reaps it and forgets it in $pids.
stop_pid() {
    local pid=$1 wait_s=${2:-3} kept=() p
    if alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq $((wait_s * 10))); do
            alive "$pid" || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    for p in "${pids[@]}"; do [[ $p == "$pid" ]] || kept+=("$p"); done
    pids=("${kept[@]}")
}

# Stops every process in $pids (each as stop_pid, waiting up to ${1:-3} s).
stop_all() {
    local pid
    for pid in "${pids[@]}"; do
        stop_pid "$pid" "${1:-3}"
    done
    pids=()
}

# Writes a Mosquitto configuration listening on 127.0.0.1:$2 to file $1, with limits equivalent
# to raftmq's defaults: in-flight window 128, 10,000 queued messages per session, 1 MiB max
# packet, no QoS 0 queueing for offline sessions, no persistence, no $SYS, warnings only.
write_mosquitto_conf() {
    cat >"$1" <<EOF
listener $2 127.0.0.1
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
}
