#!/usr/bin/env bash
# End-to-end test of the 3-node cluster in deploy/docker/compose.yaml, with real containers,
# real volumes and the Mosquitto command-line clients.
#
#   deploy/docker/cluster-test.sh [--binary PATH] [--image IMAGE] [--keep-image]
#
#   --binary PATH  the raftmq binary to package into the image (default: $RAFTMQ_BIN, else
#                  `cargo build --locked -p raftmq` is run and its debug binary used; a debug
#                  binary is fine for this functional test, and builds in seconds when warm)
#   --image IMAGE  use this existing image instead of building one (nothing is built or removed)
#   --keep-image   keep the image the test built (default: removed at the end)
#
#   RAFTMQ_COMPOSE_CROSS_NODE=0  skip part 2 (live cross-node routing; on by default).
#   RAFTMQ_COMPOSE_PARTITION=0   skip part 3 (the leader cut off by `docker network disconnect`;
#                  the majority elects a new leader and commits; after the heal the node catches
#                  up and a persistent session resumed there gets what was published meanwhile).
#   RAFTMQ_COMPOSE_TIMEOUT=SECS  bound of every wait (default 90)
#   RAFTMQ_NOFILE=N  open-files limit of the containers (default: 65536 as in compose.yaml, or the
#                  largest of 32768, 16384, ... the Docker daemon accepts)
#
# Part 1 (always): builds the image offline (build-image.sh, FROM scratch), starts compose.yaml
# under its own project name (so its containers, network and volumes are its own) on free
# loopback ports, and checks:
#   1. every node answers /readyz 200, and GET /api/v1/cluster on every node shows the 3 voters
#      and the same single leader;
#   2. a retained message set through node 1 is served by nodes 2 and 3;
#   3. a persistent MQTT 5 session (session expiry 3600) subscribes on node 2 and goes offline;
#      QoS 1 messages are published through node 2 (all acknowledged, so committed); node 2's
#      container is stopped (docker stop: a node lost); nodes 1 and 3 stay ready with 2 of 3
#      voters; the same client id reconnects to node 3 with clean start off, subscribing only
#      to an unrelated topic, and receives every queued message through the subscription it
#      made on node 2;
#   4. with node 2 down, a retained message set through node 3 is committed (2 of 3 is a
#      quorum); node 2 is started again, answers /readyz 200, every node shows 3 voters and one
#      leader again, and node 2 serves the retained message written while it was down.
# Part 2 (on unless RAFTMQ_COMPOSE_CROSS_NODE=0): a live subscriber on node 2 receives QoS 1 messages
# published through node 1; node 1 is stopped; the publisher reconnects to node 3 and the same
# subscriber connection (never reconnected) keeps receiving; node 1 is restarted and rejoins.
#
# Needs docker (daemon running; no registry access needed), `docker compose` or docker-compose,
# mosquitto_pub/mosquitto_sub (scripts/install-prereqs --test), curl and python3. Always removes
# its own project (`down -v`: containers, network, volumes) and nothing else, also when a check
# fails or it is interrupted. On failure, the nodes' logs are printed. Exits non-zero on failure.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

binary="${RAFTMQ_BIN:-}"
image=""
keep_image=false
cross_node="${RAFTMQ_COMPOSE_CROSS_NODE:-1}"
partition="${RAFTMQ_COMPOSE_PARTITION:-1}"
wait_secs="${RAFTMQ_COMPOSE_TIMEOUT:-90}"

die() { echo "cluster-test: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) [ $# -ge 2 ] || die "--binary needs a path"; binary="$2"; shift 2 ;;
        --binary=*) binary="${1#*=}"; shift ;;
        --image) [ $# -ge 2 ] || die "--image needs a name"; image="$2"; shift 2 ;;
        --image=*) image="${1#*=}"; shift ;;
        --keep-image) keep_image=true; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

start=$(date +%s)
elapsed() { echo "$(( $(date +%s) - start ))s"; }
log() { echo "[$(elapsed)] $*"; }
checks=0
ok() { checks=$((checks + 1)); echo "[$(elapsed)] ok   $*"; }
failure=""
fail() { failure="$*"; echo "[$(elapsed)] FAIL $*" >&2; exit 1; }

for tool in docker curl python3 mosquitto_pub mosquitto_sub; do
    command -v "$tool" >/dev/null || die "$tool is required (mosquitto clients: scripts/install-prereqs --test)"
done
timeout 30 docker info >/dev/null 2>&1 || die "the Docker daemon does not answer (docker info failed)"
if docker compose version >/dev/null 2>&1; then
    compose_cmd=(docker compose)
elif command -v docker-compose >/dev/null; then
    compose_cmd=(docker-compose)
else
    die "neither 'docker compose' nor docker-compose is installed (Debian: apt-get install docker-compose)"
fi

# --- names and ports: everything this run creates is its own ------------------------------------
project="raftmq-ct-$$-$(date +%s)"
read -r -a ports <<<"$(python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)"
mqtt=("" "${ports[0]}" "${ports[1]}" "${ports[2]}")   # mqtt[N], http[N] for node N = 1..3
http=("" "${ports[3]}" "${ports[4]}" "${ports[5]}")
export RAFTMQ_1_MQTT_PORT="${mqtt[1]}" RAFTMQ_2_MQTT_PORT="${mqtt[2]}" RAFTMQ_3_MQTT_PORT="${mqtt[3]}"
export RAFTMQ_1_HTTP_PORT="${http[1]}" RAFTMQ_2_HTTP_PORT="${http[2]}" RAFTMQ_3_HTTP_PORT="${http[3]}"

compose() { "${compose_cmd[@]}" -p "$project" -f "$here/compose.yaml" "$@"; }

built_image=""
started=false
bg_pids=()
work="$(mktemp -d "${TMPDIR:-/tmp}/raftmq-cluster-test.XXXXXX")"
status=1
cleanup() {
    set +e
    for pid in ${bg_pids[@]+"${bg_pids[@]}"}; do kill "$pid" 2>/dev/null; done
    $started || { rm -rf "$work"; [ -z "$built_image" ] || $keep_image || docker rmi "$built_image" >/dev/null 2>&1; return; }
    if [ "$status" -ne 0 ]; then
        echo "cluster-test: FAILED after $(elapsed); logs of the nodes (last 100 lines each):" >&2
        timeout 60 "${compose_cmd[@]}" -p "$project" -f "$here/compose.yaml" logs --no-color --tail 100 >&2
        [ -z "$failure" ] || echo "cluster-test: FAILED: $failure" >&2
    fi
    log "tearing down project $project (down -v: its containers, network and volumes)"
    timeout 120 "${compose_cmd[@]}" -p "$project" -f "$here/compose.yaml" down -v --remove-orphans -t 10 >/dev/null 2>&1 \
        || echo "cluster-test: WARNING: '${compose_cmd[*]} -p $project down -v' failed; remove it by hand" >&2
    left="$(docker ps -aq --filter "label=com.docker.compose.project=$project"; docker volume ls -q --filter "name=${project}_")"
    [ -z "$left" ] || echo "cluster-test: WARNING: left behind by project $project: $(echo "$left" | tr '\n' ' ')" >&2
    if [ -n "$built_image" ] && ! $keep_image; then
        docker rmi "$built_image" >/dev/null 2>&1
    fi
    rm -rf "$work"
}
trap 'status=$?; cleanup; exit $status' EXIT
trap 'failure="interrupted (SIGINT)"; exit 130' INT
trap 'failure="interrupted (SIGTERM, e.g. by timeout)"; exit 143' TERM

# --- the image ------------------------------------------------------------------------------------
if [ -z "$image" ]; then
    if [ -z "$binary" ]; then
        log "building the debug binary (cargo build --locked -p raftmq)"
        (cd "$repo" && cargo build --quiet --locked -p raftmq)
        target_dir="$(cd "$repo" && cargo metadata --format-version 1 --no-deps \
            | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
        binary="$target_dir/debug/raftmq"
    fi
    [ -x "$binary" ] || die "binary not found or not executable: $binary"
    image="raftmq-cluster-test:$project"
    log "building image $image from $binary (build-image.sh, offline)"
    "$here/build-image.sh" --binary "$binary" --tag "$image" >"$work/build.log" 2>&1 \
        || { cat "$work/build.log" >&2; die "build-image.sh failed"; }
    built_image="$image"
    ok "image $image built offline and smoke-tested ($(grep -o '[0-9]* MiB' "$work/build.log" | tail -n 1 || true))"
else
    docker image inspect "$image" >/dev/null 2>&1 || die "image $image does not exist"
fi
export RAFTMQ_IMAGE="$image"

# compose.yaml asks for 65536 open files; a daemon with a lower limit of its own refuses to start
# such a container, so use the largest of a few that it accepts (RAFTMQ_NOFILE overrides).
if [ -z "${RAFTMQ_NOFILE:-}" ]; then
    for n in 65536 32768 16384 8192 4096 1024; do
        if timeout 30 docker run --rm --network none --ulimit "nofile=$n:$n" "$image" --version >/dev/null 2>&1; then
            RAFTMQ_NOFILE="$n"
            break
        fi
    done
    [ -n "${RAFTMQ_NOFILE:-}" ] || die "the image does not run even with --ulimit nofile=1024"
    [ "$RAFTMQ_NOFILE" = 65536 ] \
        || log "note: this Docker daemon refuses nofile=65536 (its own limit is lower): RAFTMQ_NOFILE=$RAFTMQ_NOFILE"
fi
export RAFTMQ_NOFILE

# --- helpers --------------------------------------------------------------------------------------
# HTTP status of GET path on node N ("000" when it does not answer).
http_code() { curl -s -o /dev/null -w '%{http_code}' --max-time 3 "http://127.0.0.1:${http[$1]}$2" || true; }
# GET /api/v1/cluster on node N, or nothing.
cluster_json() { curl -fsS --max-time 3 "http://127.0.0.1:${http[$1]}/api/v1/cluster" 2>/dev/null || true; }
# Evaluates a Python expression on the JSON document read from stdin (bound to `d`).
jq_py() { python3 -c 'import json,sys
try:
    d = json.load(sys.stdin)
except ValueError:
    sys.exit(1)
print(eval(sys.argv[1]))' "$1" 2>/dev/null || true; }
# Container id of node N; `ps -a` so a stopped one is listed too (Compose v2 lists running ones
# only without it; v1 accepts -a as well).
container_of() { compose ps -a -q "raftmq-$1"; }

# Waits until `cond ARGS...` succeeds, at most $wait_secs; returns 1 when it did not.
wait_until() {
    local deadline=$(( $(date +%s) + wait_secs ))
    until "$@"; do
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 0.5
    done
}
# The same, failing the test with the message.
wait_for() {
    local what="$1"; shift
    wait_until "$@" || fail "$what: not reached within ${wait_secs}s"
}
lines() { tr '\n' ' ' <"$1"; }
all_ready() { local n; for n in "$@"; do [ "$(http_code "$n" /readyz)" = 200 ] || return 1; done; }
# Every listed node reports `voters` voters and the same leader, exactly one of them says it is the
# leader when the leader is among them, and the leader is not a node listed as down.
converged() {
    local voters="$1"; shift
    local n leader="" view l state leaders=0
    for n in "$@"; do
        view="$(cluster_json "$n")"
        [ "$(jq_py 'len(d["voters"])' <<<"$view")" = "$voters" ] || return 1
        l="$(jq_py 'd["leader"]' <<<"$view")"
        case "$l" in ''|None) return 1 ;; esac
        [ -z "$leader" ] || [ "$l" = "$leader" ] || return 1
        leader="$l"
        state="$(jq_py 'd["state"]' <<<"$view")"
        [ "$state" != Leader ] || leaders=$((leaders + 1))
    done
    case " $* " in
        *" $leader "*) [ "$leaders" = 1 ] || return 1 ;;
        *) [ "$leaders" = 0 ] || return 1 ;;
    esac
    echo "$leader" >"$work/leader"
}
leader_of() { cat "$work/leader"; }
applied() { cluster_json "$1" | jq_py 'd["last_applied"]'; }
caught_up() { local a b; a="$(applied "$1")"; b="$(applied "$2")"; [ -n "$a" ] && [ "$a" != None ] && [ "$a" -ge "$b" ]; }

# mosquitto clients, MQTT 5, on node N.
pub() { local n="$1"; shift; timeout 20 mosquitto_pub -h 127.0.0.1 -p "${mqtt[$n]}" -V mqttv5 "$@"; }
sub() { local n="$1"; shift; mosquitto_sub -h 127.0.0.1 -p "${mqtt[$n]}" -V mqttv5 "$@"; }
# The retained message of topic on node N (empty when none within 3 s).
retained_on() { timeout 10 mosquitto_sub -h 127.0.0.1 -p "${mqtt[$1]}" -V mqttv5 -t "$2" --retained-only -C 1 -W 3 2>/dev/null || true; }
retained_is() { [ "$(retained_on "$1" "$2")" = "$3" ]; }
# Publishes "<prefix>-K" for K in from..to, QoS 1, one connection each: every one acknowledged.
# A publish refused while the cluster elects a new leader (DISCONNECT 0x89, no PUBACK) is
# retried, as a client would, for up to 15 s.
publish_range() {
    local n="$1" topic="$2" prefix="$3" from="$4" to="$5" k tries
    for k in $(seq "$from" "$to"); do
        tries=0
        until pub "$n" -q 1 -i "ct-pub-$$" -t "$topic" -m "$prefix-$k" 2>/dev/null; do
            tries=$((tries + 1))
            [ "$tries" -lt 30 ] || fail "QoS 1 publish $prefix-$k through node $n was not acknowledged"
            sleep 0.5
        done
    done
}
# The distinct "<prefix>-K" lines of file, in order of K, compared with from..to.
received_all() {
    local file="$1" prefix="$2" from="$3" to="$4"
    [ "$(grep -x "$prefix-[0-9]*" "$file" | sort -u -t- -k2,2n | tr '\n' ' ')" \
        = "$(seq "$from" "$to" | sed "s/^/$prefix-/" | tr '\n' ' ')" ]
}
stop_node() {
    local cid; cid="$(container_of "$1")"
    [ -n "$cid" ] || fail "no container for raftmq-$1"
    timeout 60 docker stop --time 30 "$cid" >/dev/null || fail "docker stop raftmq-$1"
    [ "$(docker inspect --format '{{.State.Running}}' "$cid")" = false ] || fail "raftmq-$1 still running"
    local code; code="$(docker inspect --format '{{.State.ExitCode}}' "$cid")"
    [ "$code" = 0 ] || fail "raftmq-$1 exited with $code after SIGTERM (expected a graceful stop, 0)"
    ok "docker stop raftmq-$1: graceful (SIGTERM, exit code 0)"
}
start_node() {
    timeout 60 docker start "$(container_of "$1")" >/dev/null || fail "docker start raftmq-$1"
}
check_cluster() {   # voters, nodes expected up
    local voters="$1"; shift
    wait_for "/readyz 200 on nodes $*" all_ready "$@"
    wait_for "nodes $* agree on $voters voters and one leader" converged "$voters" "$@"
}

# --- start ----------------------------------------------------------------------------------------
log "project $project: mqtt ports ${mqtt[*]:1}, http ports ${http[*]:1}, compose: ${compose_cmd[*]}"
started=true
compose up -d >"$work/up.log" 2>&1 || { cat "$work/up.log" >&2; fail "compose up"; }
ok "compose up -d (3 containers, volumes ${project}_raftmq-{1,2,3}-data)"

# --- part 1 ---------------------------------------------------------------------------------------
check_cluster 3 1 2 3
ok "all 3 nodes ready (/readyz 200); /api/v1/cluster on each: 3 voters, leader node $(leader_of), one Leader"

# Retained through node 1, served by nodes 2 and 3.
retained="hello from node 1 ($project)"
pub 1 -q 1 -r -t ct/retained -m "$retained" || fail "retained publish through node 1"
for n in 2 3; do
    wait_for "retained message on node $n" retained_is "$n" ct/retained "$retained"
done
ok "retained message set through node 1 is served by nodes 2 and 3"

# A persistent session on node 2, offline; QoS 1 messages queued for it through node 2.
mover="ct-mover-$$"
timeout 20 mosquitto_sub -h 127.0.0.1 -p "${mqtt[2]}" -V mqttv5 -c -i "$mover" -x 3600 -q 1 \
    -t 'ct/jobs/#' -E || fail "persistent subscribe of $mover on node 2"
queued=20
publish_range 2 ct/jobs/queued job 1 "$queued"
q="$(curl -fsS --max-time 3 "http://127.0.0.1:${http[2]}/api/v1/clients/$mover" | jq_py 'd["queued"]')"
[ "$q" = "$queued" ] || fail "node 2 reports $q messages queued for $mover, expected $queued"
ok "session $mover subscribed on node 2, offline; $queued QoS 1 messages acknowledged and queued for it"

# Node 2 is lost.
stop_node 2
check_cluster 3 1 3
ok "nodes 1 and 3 stay ready with node 2 down (leader node $(leader_of), 3 voters, 2 up)"

# The client comes back through node 3, subscribing only to an unrelated topic: what it gets
# comes from the session (subscription and queue) created on node 2.
timeout $((wait_secs + 10)) mosquitto_sub -h 127.0.0.1 -p "${mqtt[3]}" -V mqttv5 -c -i "$mover" \
    -x 3600 -q 1 -t ct/unrelated -C "$queued" -W "$wait_secs" >"$work/mover.out" 2>"$work/mover.err" || true
received_all "$work/mover.out" job 1 "$queued" \
    || fail "resumed on node 3, $mover received [$(lines "$work/mover.out")] (stderr: $(cat "$work/mover.err")), expected job-1..job-$queued"
ok "$mover resumed on node 3 (clean start off) and received all $queued messages queued on node 2"

# Durable writes still commit with 2 of 3 nodes.
retained2="set through node 3 while node 2 was down ($project)"
pub 3 -q 1 -r -t ct/retained -m "$retained2" || fail "retained publish through node 3 with node 2 down"
wait_for "updated retained message on node 1" retained_is 1 ct/retained "$retained2"
ok "with node 2 down, a retained message set through node 3 is committed and served by node 1"

# Node 2 comes back and rejoins.
start_node 2
check_cluster 3 1 2 3
wait_for "node 2 catches up with node $(leader_of)" caught_up 2 "$(leader_of)"
wait_for "retained message written while node 2 was down, on node 2" retained_is 2 ct/retained "$retained2"
ok "node 2 restarted from its volume: /readyz 200, 3 voters, leader node $(leader_of), caught up, serves what was written while it was down"

# --- part 2: live cross-node routing (on unless RAFTMQ_COMPOSE_CROSS_NODE=0) -------------------------
if [ "$cross_node" = 1 ]; then
    log "part 2: live cross-node delivery"
    live="ct-live-$$"
    timeout $((4 * wait_secs)) mosquitto_sub -h 127.0.0.1 -p "${mqtt[2]}" -V mqttv5 -c -i "$live" \
        -x 3600 -q 1 -t 'ct/live/#' >"$work/live.out" 2>"$work/live.err" &
    live_pid=$!
    bg_pids+=("$live_pid")
    subscribed() { [ "$(curl -fsS --max-time 3 "http://127.0.0.1:${http[2]}/api/v1/clients/$live" | jq_py 'd["subscriptions"]')" = 1 ]; }
    wait_for "live subscriber $live connected to node 2" subscribed
    publish_range 1 ct/live/a live 1 20
    wait_until received_all "$work/live.out" live 1 20 \
        || fail "live messages 1..20 published through node 1 did not all reach the subscriber on node 2 within ${wait_secs}s (it got: $(lines "$work/live.out"))"
    ok "subscriber on node 2 received live QoS 1 messages 1..20 published through node 1"

    stop_node 1
    check_cluster 3 2 3
    publish_range 3 ct/live/a live 21 40
    wait_until received_all "$work/live.out" live 1 40 \
        || fail "live messages 21..40 published through node 3 did not all reach the subscriber on node 2 within ${wait_secs}s (it got: $(lines "$work/live.out"))"
    kill -0 "$live_pid" 2>/dev/null || fail "the subscriber on node 2 lost its connection: $(cat "$work/live.err")"
    ok "node 1 stopped: the publisher moved to node 3; the same subscriber connection on node 2 received 21..40"

    start_node 1
    check_cluster 3 1 2 3
    ok "node 1 restarted and rejoined (3 voters, leader node $(leader_of))"
else
    echo "[$(elapsed)] SKIPPED part 2 (live cross-node routing): RAFTMQ_COMPOSE_CROSS_NODE=0"
fi

# --- part 3: network partition of the leader (on unless RAFTMQ_COMPOSE_PARTITION=0) -----------
if [ "$partition" = 1 ]; then
    log "part 3: the leader cut off from the others (docker network disconnect)"
    victim="$(leader_of)"
    others=()
    for n in 1 2 3; do [ "$n" = "$victim" ] || others+=("$n"); done
    net="${project}_raftmq"
    # A persistent subscriber on the majority side, offline while its messages are published.
    parted="ct-part-$$"
    timeout 20 mosquitto_sub -h 127.0.0.1 -p "${mqtt[${others[0]}]}" -V mqttv5 -c -i "$parted" \
        -x 3600 -q 1 -t 'ct/part/#' -E || fail "persistent subscribe of $parted on node ${others[0]}"
    wait_for "node $victim applied the subscription" caught_up "$victim" "${others[0]}"
    docker network disconnect "$net" "$(container_of "$victim")" \
        || fail "docker network disconnect $net raftmq-$victim"
    # Followers keep the old leader until their election timeout: wait for the new term.
    new_leader() { converged 3 "${others[@]}" && [ "$(leader_of)" != "$victim" ]; }
    wait_for "nodes ${others[*]} elect a leader other than node $victim" new_leader
    check_cluster 3 "${others[@]}"
    ok "leader node $victim cut off: nodes ${others[*]} elected node $(leader_of) and stay ready"
    publish_range "${others[1]}" ct/part/x part 1 20
    ok "20 QoS 1 messages acknowledged through node ${others[1]} during the partition"
    docker network connect --alias "raftmq-$victim" "$net" "$(container_of "$victim")" \
        || fail "docker network connect $net raftmq-$victim"
    check_cluster 3 1 2 3
    wait_for "node $victim catches up with node $(leader_of)" caught_up "$victim" "$(leader_of)"
    ok "partition healed: node $victim rejoined (3 voters, leader node $(leader_of)) and caught up"
    # The subscriber comes back through the node that was cut off and gets everything.
    timeout $((wait_secs + 10)) mosquitto_sub -h 127.0.0.1 -p "${mqtt[$victim]}" -V mqttv5 -c \
        -i "$parted" -x 3600 -q 1 -t ct/unrelated -C 20 -W "$wait_secs" \
        >"$work/parted.out" 2>"$work/parted.err" || true
    received_all "$work/parted.out" part 1 20 \
        || fail "resumed on node $victim, $parted received [$(lines "$work/parted.out")] (stderr: $(cat "$work/parted.err")), expected part-1..part-20"
    ok "$parted resumed on the formerly cut-off node $victim and received all 20 messages"
else
    echo "[$(elapsed)] SKIPPED part 3 (partition): RAFTMQ_COMPOSE_PARTITION=0"
fi

status=0
log "cluster-test: $checks checks passed in $(elapsed)"
