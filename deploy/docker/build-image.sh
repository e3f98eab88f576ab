#!/usr/bin/env bash
# Builds the raftmq runtime image (deploy/docker/Dockerfile, FROM scratch) without pulling any
# base image: stages a build context holding the release binary and exactly the shared libraries
# `ldd` reports for it, plus /etc/passwd, /etc/group and /etc/nsswitch.conf, then runs
# `docker build` and smoke-tests the result.
#
#   deploy/docker/build-image.sh [--binary PATH] [--tag TAG]... [--context DIR] [--stage-only] [--no-test]
#
#   --binary PATH   the raftmq binary to package (default: `cargo build --release --locked -p raftmq`
#                   is run and its output used; the binary must be built for this machine's
#                   architecture, since ldd inspects it here)
#   --tag TAG       image tag, repeatable (default: raftmq:<version> and raftmq:latest)
#   --context DIR   stage the build context in DIR and keep it (default: a temporary directory,
#                   removed on exit); DIR must be empty or absent
#   --stage-only    stage the context and stop (no docker build); implies keeping it
#   --no-test       skip the smoke test (run --version, then serve and GET /healthz and /readyz on
#                   a loopback port, then stop it with SIGTERM)
#
# The libraries come from this machine: the image runs the binary with the same glibc it was
# linked against, so build the binary and the image on the same (or an older-glibc) machine.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

binary=""
tags=()
context=""
stage_only=false
smoke_test=true
remove_context=false

die() { echo "build-image: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --binary) [ $# -ge 2 ] || die "--binary needs a path"; binary="$2"; shift 2 ;;
        --binary=*) binary="${1#*=}"; shift ;;
        --tag) [ $# -ge 2 ] || die "--tag needs a value"; tags+=("$2"); shift 2 ;;
        --tag=*) tags+=("${1#*=}"); shift ;;
        --context) [ $# -ge 2 ] || die "--context needs a directory"; context="$2"; shift 2 ;;
        --context=*) context="${1#*=}"; shift ;;
        --stage-only) stage_only=true; shift ;;
        --no-test) smoke_test=false; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

command -v ldd >/dev/null || die "ldd is required (Debian: apt-get install libc-bin)"
$stage_only || command -v docker >/dev/null || die "docker is required (or use --stage-only)"
! $smoke_test || $stage_only || command -v curl >/dev/null || die "curl is required for the smoke test (or use --no-test)"

# --- the binary ---------------------------------------------------------------------------------
if [ -z "$binary" ]; then
    command -v cargo >/dev/null || die "cargo not found: pass --binary PATH"
    echo "build-image: building the release binary (cargo build --release --locked -p raftmq)" >&2
    (cd "$repo" && cargo build --release --locked -p raftmq)
    target_dir="$(cd "$repo" && cargo metadata --format-version 1 --no-deps \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
    binary="$target_dir/release/raftmq"
fi
[ -f "$binary" ] || die "binary not found: $binary"
[ -x "$binary" ] || die "not executable: $binary"
binary="$(cd "$(dirname "$binary")" && pwd)/$(basename "$binary")"

version_line="$("$binary" --version)" || die "$binary --version failed"
version="${version_line##* }"
revision="$(git -C "$repo" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
if [ ${#tags[@]} -eq 0 ]; then
    tags=("raftmq:$version" "raftmq:latest")
fi

# --- the build context --------------------------------------------------------------------------
if [ -n "$context" ]; then
    mkdir -p "$context"
    [ -z "$(ls -A "$context")" ] || die "--context $context is not empty"
    context="$(cd "$context" && pwd)"
else
    context="$(mktemp -d "${TMPDIR:-/tmp}/raftmq-image.XXXXXX")"
    $stage_only || remove_context=true
fi
container=""
cleanup() {
    [ -z "$container" ] || docker rm -f -v "$container" >/dev/null 2>&1 || true
    ! $remove_context || rm -rf "$context"
}
trap cleanup EXIT
root="$context/rootfs"
mkdir -p "$root/usr/local/bin" "$root/etc" "$root/tmp" "$context/data"
chmod 1777 "$root/tmp"
chmod 0755 "$context/data"

cp "$binary" "$root/usr/local/bin/raftmq"
chmod 0755 "$root/usr/local/bin/raftmq"

# Every library ldd resolves, at the path it resolved it to (symlinks followed, so the image holds
# the real file under the name the loader looks for). linux-vdso is provided by the kernel.
libs=()
if ldd_out="$(ldd "$binary" 2>&1)"; then
    while IFS= read -r line; do
        line="${line#"${line%%[![:space:]]*}"}"
        case "$line" in
            *"not found"*) die "ldd cannot resolve a library: $line" ;;
            *" => "/*) path="${line#* => }"; path="${path%% (*}" ;;
            /*) path="${line%% (*}" ;;
            *) continue ;;   # linux-vdso.so.1, or a line without a path
        esac
        [ -e "$path" ] || die "ldd reported $path, which does not exist"
        libs+=("$path")
    done <<<"$ldd_out"
else
    case "$ldd_out" in
        *"not a dynamic executable"*|*"statically linked"*) ;;   # static binary: no libraries
        *) die "ldd failed on $binary: $ldd_out" ;;
    esac
fi
for lib in ${libs[@]+"${libs[@]}"}; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
    chmod 0755 "$root$lib"
done

cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
raftmq:x:10001:10001:raftmq:/data:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
EOF
cat >"$root/etc/group" <<'EOF'
root:x:0:
raftmq:x:10001:
nogroup:x:65534:
EOF
# glibc >= 2.34 has the files and dns NSS modules built in: no libnss_*.so is needed.
cat >"$root/etc/nsswitch.conf" <<'EOF'
passwd: files
group: files
hosts: files dns
EOF
chmod 0644 "$root/etc/passwd" "$root/etc/group" "$root/etc/nsswitch.conf"

cp "$here/Dockerfile" "$context/Dockerfile"
printf '%s\n' "raftmq $version ($revision), staged $(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$context/STAGED"

echo "build-image: staged $context" >&2
echo "  binary  /usr/local/bin/raftmq ($version_line, revision $revision)" >&2
for lib in ${libs[@]+"${libs[@]}"}; do echo "  library $lib" >&2; done

if $stage_only; then
    echo "$context"
    exit 0
fi

# --- docker build -------------------------------------------------------------------------------
tag_args=()
for t in "${tags[@]}"; do tag_args+=(--tag "$t"); done
# The legacy builder needs no BuildKit frontend image (nothing is pulled for FROM scratch).
DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}" docker build \
    --build-arg "VERSION=$version" --build-arg "REVISION=$revision" \
    "${tag_args[@]}" "$context" >&2
image="${tags[0]}"
size="$(docker image inspect --format '{{.Size}}' "$image")"
echo "build-image: built ${tags[*]} ($((size / 1024 / 1024)) MiB)" >&2

# --- smoke test ---------------------------------------------------------------------------------
if $smoke_test; then
    got="$(docker run --rm --read-only --network none "$image" --version)" \
        || die "smoke test: '$image --version' failed (missing library?)"
    [ "$got" = "$version_line" ] || die "smoke test: --version printed '$got', expected '$version_line'"

    container="raftmq-smoke-$$"
    cid="$(docker run -d --name "$container" --read-only -p 127.0.0.1::9100 "$image")"
    port=""
    for _ in $(seq 1 50); do
        port="$(docker port "$cid" 9100/tcp 2>/dev/null | head -n1 | sed 's/.*://')"
        [ -n "$port" ] && curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
        sleep 0.2
    done
    if ! curl -fsS "http://127.0.0.1:${port:-0}/healthz" >/dev/null 2>&1 \
        || ! curl -fsS "http://127.0.0.1:${port:-0}/readyz" >/dev/null 2>&1; then
        docker logs "$cid" >&2 || true
        die "smoke test: /healthz or /readyz did not answer on 127.0.0.1:${port:-?}"
    fi
    docker stop --time 20 "$cid" >/dev/null
    code="$(docker inspect --format '{{.State.ExitCode}}' "$cid")"
    if [ "$code" != 0 ]; then
        docker logs "$cid" >&2 || true
        die "smoke test: the broker exited with $code after SIGTERM (expected 0)"
    fi
    docker rm -v "$cid" >/dev/null   # -v: also its anonymous /data volume
    container=""
    echo "build-image: smoke test passed (--version; serve: /healthz and /readyz answered; SIGTERM exit 0)" >&2
fi

for t in "${tags[@]}"; do echo "$t"; done
