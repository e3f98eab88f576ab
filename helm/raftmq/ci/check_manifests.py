#!/usr/bin/env python3
"""Checks manifests rendered from the raftmq chart (run by deploy/check-chart.sh).

    check_manifests.py validate --scenario NAME [--k8s 1.25,1.37] [--raftmq-bin PATH] FILE
    check_manifests.py checksum BASE SCALED CHANGED
    check_manifests.py selftest DEFAULT_RENDER ALL_FEATURES_RENDER
    check_manifests.py docker DOCKERFILE MULTISTAGE COMPOSE_RENDERED

`validate` checks every document of FILE:
  - against the Kubernetes OpenAPI schemas of each version in --k8s, strictly (unknown fields are
    errors), with kubernetes-validate (schemas bundled, offline);
  - a ServiceMonitor against a strict JSON schema derived from the prometheus-operator models of
    cloudcoil.models.prometheus_operator;
  - cross-references a schema cannot see (selectors, port names, volumes, the config file);
  - the facts the scenario promises (replicas, probes, PVC template, headless Service, PDB...).
`checksum` checks the config checksum annotation: the same when only replicaCount changed, different
when the config changed. `selftest` breaks good renders on purpose and requires every break to be
caught (so the checks cannot pass vacuously). `docker` checks the Dockerfiles and the rendered compose file.

Prints one line per check group and exits 1 on the first scenario with problems (listing them all).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import yaml

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


class Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, what: str) -> None:
        self.items.append(f"{where}: {what}")

    def check(self, cond: bool, where: str, what: str) -> bool:
        if not cond:
            self.add(where, what)
        return cond


def load_docs(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "apiVersion" not in d:
            raise SystemExit(f"{path}: a document is not a Kubernetes object: {str(d)[:200]}")
    return docs


def kn(doc: dict[str, Any]) -> str:
    return f"{doc['kind']}/{doc.get('metadata', {}).get('name', '?')}"


# --- schema validation ---------------------------------------------------------------------------

_SM_SCHEMA: dict[str, Any] | None = None


def _strict(schema: Any) -> None:
    """Forbids unknown properties in every object schema that lists its properties."""
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        for v in schema.values():
            _strict(v)
    elif isinstance(schema, list):
        for v in schema:
            _strict(v)


def servicemonitor_schema() -> dict[str, Any]:
    global _SM_SCHEMA
    if _SM_SCHEMA is None:
        from cloudcoil.models.prometheus_operator import v1 as pov1

        schema = pov1.ServiceMonitor.model_json_schema(by_alias=True)
        _strict(schema)
        _SM_SCHEMA = schema
    return _SM_SCHEMA


def validate_schemas(docs: list[dict[str, Any]], versions: list[str], p: Problems) -> list[str]:
    import jsonschema
    import kubernetes_validate

    done = []
    for doc in docs:
        where = kn(doc)
        if doc["apiVersion"] == "monitoring.coreos.com/v1":
            validator = jsonschema.Draft202012Validator(servicemonitor_schema())
            for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
                path = ".".join(str(x) for x in err.absolute_path)
                p.add(where, f"ServiceMonitor schema (prometheus-operator v1): {path}: {err.message[:300]}")
            done.append(f"{where} (prometheus-operator CRD schema)")
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                path = ".".join(str(x) for x in err.absolute_path)
                p.add(where, f"Kubernetes {version} schema: {path}: {err.message[:300]}")
            except kubernetes_validate.SchemaNotFoundError as err:
                p.add(where, f"Kubernetes {version}: {err.message}")
        done.append(where)
    return done


# --- helpers -------------------------------------------------------------------------------------

def one(docs: list[dict[str, Any]], kind: str, p: Problems, pred=lambda d: True) -> dict[str, Any] | None:
    found = [d for d in docs if d["kind"] == kind and pred(d)]
    if len(found) != 1:
        p.add(kind, f"expected exactly one, found {len(found)}")
        return None
    return found[0]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def env_map(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


# --- generic cross-reference checks --------------------------------------------------------------

def check_generic(docs: list[dict[str, Any]], namespace: str, p: Problems) -> None:
    names = set()
    for d in docs:
        where = kn(d)
        md = d.get("metadata", {})
        name = md.get("name", "")
        p.check((d["kind"], name) not in names, where, "duplicate kind/name")
        names.add((d["kind"], name))
        p.check(bool(DNS1123_SUBDOMAIN.match(name)) and len(name) <= 253, where, f"invalid name {name!r}")
        if d["kind"] in ("Service", "StatefulSet"):
            p.check(bool(DNS1123_LABEL.match(name)) and len(name) <= 63, where, f"{name!r} is not a DNS-1123 label")
        if d["kind"] != "ServiceMonitor":
            p.check(md.get("namespace") == namespace, where, f"namespace {md.get('namespace')!r}, expected {namespace!r}")
        labels = md.get("labels", {})
        for k in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/managed-by", "helm.sh/chart"):
            p.check(k in labels, where, f"missing label {k}")
        for k, v in labels.items():
            p.check(isinstance(v, str) and len(v) <= 63 and bool(LABEL_VALUE.match(v)), where, f"label {k}={v!r} is not a valid label value")


def check_statefulset_wiring(docs: list[dict[str, Any]], p: Problems) -> None:
    sts = one(docs, "StatefulSet", p)
    if sts is None:
        return
    where = kn(sts)
    spec = sts["spec"]
    tmpl = spec["template"]
    pod_labels = tmpl["metadata"]["labels"]
    pod = tmpl["spec"]
    p.check(matches(spec["selector"]["matchLabels"], pod_labels), where, "selector does not match the pod template labels")

    containers = pod["containers"]
    p.check(len(containers) == 1, where, "expected one container")
    c = containers[0]
    port_names = [pt["name"] for pt in c.get("ports", [])]
    p.check(len(port_names) == len(set(port_names)), where, f"duplicate container port names {port_names}")
    for n in port_names:
        p.check(len(n) <= 15 and bool(IANA_SVC_NAME.match(n)), where, f"container port name {n!r} is not an IANA_SVC_NAME")
    ports = {pt["name"]: pt["containerPort"] for pt in c.get("ports", [])}
    p.check(len(set(ports.values())) == len(ports), where, f"two container ports share a number: {ports}")

    for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = c.get(probe_name)
        if probe and "httpGet" in probe:
            port = probe["httpGet"]["port"]
            p.check(port in ports or port in ports.values(), where, f"{probe_name} port {port!r} is not a container port")
    pre = c.get("lifecycle", {}).get("preStop", {}).get("httpGet")
    if pre:
        p.check(pre["port"] in ports or pre["port"] in ports.values(), where, f"preStop port {pre['port']!r} is not a container port")
    pre = c.get("lifecycle", {}).get("preStop", {}).get("exec")
    if pre and pre.get("command", [None])[0] == "/usr/local/bin/raftmq" and "--url" in pre["command"]:
        url = pre["command"][pre["command"].index("--url") + 1]
        port = int(url.rsplit(":", 1)[1]) if ":" in url.split("//", 1)[-1] else 80
        p.check(port == ports.get("http"), where, f"preStop drain URL {url!r} is not the http container port")

    volumes = {v["name"] for v in pod.get("volumes", [])}
    claims = {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])}
    p.check(not (volumes & claims), where, f"volumes and claim templates share names: {volumes & claims}")
    mounts = c.get("volumeMounts", [])
    for m in mounts:
        p.check(m["name"] in volumes | claims, where, f"volumeMount {m['name']!r} has no volume or claim template")
    paths = [m["mountPath"] for m in mounts]
    p.check(len(paths) == len(set(paths)), where, f"duplicate mount paths {paths}")

    sa = pod.get("serviceAccountName")
    sas = [d for d in docs if d["kind"] == "ServiceAccount"]
    if sas:
        p.check(any(d["metadata"]["name"] == sa for d in sas), where, f"serviceAccountName {sa!r} is not the chart's ServiceAccount")

    # Services: selectors pick the pods, target ports are container port names.
    for svc in (d for d in docs if d["kind"] == "Service"):
        sw = kn(svc)
        p.check(matches(svc["spec"]["selector"], pod_labels), sw, "selector does not match the StatefulSet's pods")
        for sp in svc["spec"]["ports"]:
            tp = sp.get("targetPort", sp["port"])
            p.check(tp in ports or tp in ports.values(), sw, f"targetPort {tp!r} is not a container port")
            if isinstance(tp, str):
                p.check(sp["port"] == ports.get(tp), sw, f"port {sp['name']} {sp['port']} != container port {tp} {ports.get(tp)}")

    headless = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == spec["serviceName"]]
    if p.check(len(headless) == 1, where, f"serviceName {spec['serviceName']!r} is not a Service of the chart"):
        h = headless[0]["spec"]
        p.check(h.get("clusterIP") == "None", kn(headless[0]), "the StatefulSet's service must be headless (clusterIP: None)")
        p.check(h.get("publishNotReadyAddresses") is True, kn(headless[0]), "publishNotReadyAddresses must be true")

    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        p.check(matches(pdb["spec"]["selector"]["matchLabels"], pod_labels), kn(pdb), "selector does not match the pods")

    for sm in (d for d in docs if d["kind"] == "ServiceMonitor"):
        sel = sm["spec"]["selector"]["matchLabels"]
        picked = [d for d in docs if d["kind"] == "Service" and matches(sel, d["metadata"]["labels"])]
        p.check([d["metadata"]["name"] for d in picked] == [spec["serviceName"]], kn(sm),
                f"selector must pick exactly the headless Service, picks {[kn(d) for d in picked]}")
        for ep in sm["spec"]["endpoints"]:
            if picked:
                p.check(any(sp["name"] == ep["port"] for sp in picked[0]["spec"]["ports"]), kn(sm), f"endpoint port {ep['port']!r} not on the headless Service")
            p.check(ep.get("path") == "/metrics", kn(sm), "endpoint path must be /metrics")
        ns = sm["spec"].get("namespaceSelector", {}).get("matchNames", [])
        p.check(ns == [sts["metadata"]["namespace"]], kn(sm), f"namespaceSelector {ns}")


def check_config(docs: list[dict[str, Any]], p: Problems, raftmq_bin: str | None, current_keys: bool) -> dict[str, Any] | None:
    cm = one(docs, "ConfigMap", p)
    sts = one(docs, "StatefulSet", p)
    if cm is None or sts is None:
        return None
    where = kn(cm)
    text = cm["data"].get("raftmq.toml")
    if not p.check(text is not None, where, "no raftmq.toml key"):
        return None
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        p.add(where, f"raftmq.toml is not valid TOML: {e}\n{text}")
        return None

    spec = sts["spec"]
    pod = spec["template"]["spec"]
    c = pod["containers"][0]
    env = env_map(c)
    ports = {pt["name"]: pt["containerPort"] for pt in c["ports"]}

    # The config file is mounted where RAFTMQ_CONFIG points.
    cfg_path = env.get("RAFTMQ_CONFIG", {}).get("value", "")
    cfg_vol = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == cm["metadata"]["name"]]
    if p.check(len(cfg_vol) == 1, kn(sts), "the ConfigMap is not mounted"):
        m = [m for m in c["volumeMounts"] if m["name"] == cfg_vol[0]["name"]]
        if p.check(len(m) == 1, kn(sts), "the config volume is not mounted"):
            expected = m[0]["mountPath"].rstrip("/") + "/raftmq.toml" if "subPath" not in m[0] else m[0]["mountPath"]
            p.check(cfg_path == expected, kn(sts), f"RAFTMQ_CONFIG={cfg_path!r} but the file is at {expected!r}")

    # Listener addresses agree with the container ports.
    def port_of(addr: str) -> int:
        return int(addr.rsplit(":", 1)[1])

    listeners = config.get("listeners", {})
    want = {"tcp": "mqtt", "tls": "mqtts", "ws": "ws", "wss": "wss"}
    for key, port_name in want.items():
        if port_name in ports:
            if p.check(key in listeners and listeners[key] != "none", where, f"listeners.{key} missing but port {port_name} is open"):
                p.check(port_of(listeners[key]) == ports[port_name], where, f"listeners.{key}={listeners[key]} != container port {ports[port_name]}")
        elif key == "tcp":
            p.check(listeners.get("tcp") == "none", where, "listeners.tcp must be \"none\" when the mqtt listener is disabled")
        else:
            p.check(key not in listeners, where, f"listeners.{key} set but no {port_name} port")
    p.check(port_of(config["http"]["addr"]) == ports.get("http"), where, "http.addr != http container port")
    p.check(port_of(config["cluster"]["addr"]) == ports.get("cluster"), where, "cluster.addr != cluster container port")

    # data_dir is the data volume, also given as RAFTMQ_DATA_DIR (overrides the image's ENV).
    data_mount = [m["mountPath"] for m in c["volumeMounts"] if m["name"] == "data"]
    if p.check(len(data_mount) == 1, kn(sts), "no data volume mounted"):
        p.check(config.get("data_dir") == data_mount[0], where, f"data_dir {config.get('data_dir')!r} != data mount {data_mount[0]!r}")
        p.check(env.get("RAFTMQ_DATA_DIR", {}).get("value") == data_mount[0], kn(sts), "RAFTMQ_DATA_DIR != data mount")

    # Seeds: by default every pod's stable DNS name on the headless Service.
    seeds = config.get("cluster", {}).get("seeds", [])
    ns = sts["metadata"]["namespace"]
    name = sts["metadata"]["name"]
    svc = spec["serviceName"]
    adv = env.get("RAFTMQ_CLUSTER__ADVERTISE_ADDR", {}).get("value", "")
    m = re.fullmatch(r"\$\(POD_NAME\)\." + re.escape(svc) + r"\.\$\(POD_NAMESPACE\)\.svc\.([a-z0-9.-]+):(\d+)", adv)
    if p.check(m is not None, kn(sts), f"RAFTMQ_CLUSTER__ADVERTISE_ADDR={adv!r} is not $(POD_NAME).{svc}.$(POD_NAMESPACE).svc.<domain>:<port>"):
        domain, port = m.group(1), int(m.group(2))
        p.check(port == ports.get("cluster"), kn(sts), "advertised port != cluster port")
        expected = [f"{name}-{i}.{svc}.{ns}.svc.{domain}:{port}" for i in range(spec["replicas"])]
        p.check(seeds == expected, where, f"cluster.seeds {seeds} != {expected}")
    # $(VAR) references in env values must name variables defined before them.
    defined: list[str] = []
    for e in c.get("env", []):
        for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", e.get("value", "")):
            p.check(ref in defined, kn(sts), f"env {e['name']} refers to $({ref}) which is not defined before it")
        defined.append(e["name"])
    for n in env:
        if n.startswith("RAFTMQ_") and n not in ("RAFTMQ_CONFIG", "RAFTMQ_DATA_DIR", "RAFTMQ_NODE_ID_FROM_ORDINAL"):
            p.check("__" in n or n in ("RAFTMQ_NODE_ID",), kn(sts), f"env {n} is neither a flag variable nor RAFTMQ_<SECTION>__<KEY>")
    p.check(pod.get("enableServiceLinks") is False, kn(sts), "enableServiceLinks must be false (Service variables would be read as RAFTMQ_* settings)")

    if raftmq_bin and current_keys:
        with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
            f.write(text)
            f.flush()
            r = subprocess.run([raftmq_bin, "config", "check", f.name], capture_output=True, text=True)
        p.check(r.returncode == 0, where, f"`raftmq config check` rejected the rendered config:\n{r.stdout}{r.stderr}")
    return config


# --- scenario facts ------------------------------------------------------------------------------

def container(sts: dict[str, Any]) -> dict[str, Any]:
    return sts["spec"]["template"]["spec"]["containers"][0]


def check_common_facts(docs, p: Problems, replicas: int) -> None:
    sts = one(docs, "StatefulSet", p)
    if sts is None:
        return
    w = kn(sts)
    c = container(sts)
    pod = sts["spec"]["template"]["spec"]
    p.check(sts["spec"]["replicas"] == replicas, w, f"replicas {sts['spec']['replicas']} != {replicas}")
    p.check(c.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/readyz", w, "readiness probe must GET /readyz")
    p.check(c.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/healthz", w, "liveness probe must GET /healthz")
    p.check(c.get("startupProbe", {}).get("httpGet", {}).get("path") == "/healthz", w, "startup probe must GET /healthz")
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        p.check(c.get(probe, {}).get("httpGet", {}).get("port") == "http", w, f"{probe} must use the http port")
    sc = c.get("securityContext", {})
    psc = pod.get("securityContext", {})
    p.check(sc.get("readOnlyRootFilesystem") is True, w, "readOnlyRootFilesystem must be true")
    p.check(sc.get("allowPrivilegeEscalation") is False, w, "allowPrivilegeEscalation must be false")
    p.check(sc.get("capabilities", {}).get("drop") == ["ALL"], w, "capabilities must drop ALL")
    p.check(psc.get("runAsNonRoot") is True and psc.get("runAsUser") == 10001, w, "pod must run as non-root uid 10001")
    p.check(psc.get("fsGroup") == 10001, w, "fsGroup must be 10001 (volumes writable by the broker)")
    # The "restricted" Pod Security Standard: non-root, no escalation, drop ALL, a seccomp profile,
    # and only these volume types.
    p.check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", w, "seccompProfile RuntimeDefault expected")
    allowed = {"configMap", "emptyDir", "secret", "persistentVolumeClaim", "downwardAPI", "projected", "ephemeral", "csi"}
    for vol in pod.get("volumes", []):
        kinds = set(vol) - {"name"}
        p.check(kinds <= allowed, w, f"volume {vol['name']} type {sorted(kinds)} is not allowed by the restricted Pod Security Standard")
    p.check(not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), w, "host namespaces are not allowed")
    p.check(pod.get("automountServiceAccountToken") is False, w, "the service account token must not be mounted")
    p.check(any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), w, "/tmp must be a writable mount")
    ann = sts["spec"]["template"]["metadata"].get("annotations", {})
    p.check(re.fullmatch(r"[0-9a-f]{64}", ann.get("checksum/config", "")) is not None, w, "checksum/config annotation missing")
    p.check(c["args"][:1] == ["serve"], w, f"args must start with serve: {c['args']}")
    p.check("helm.sh/chart" not in sts["spec"]["template"]["metadata"]["labels"], w,
            "the pod template must not carry helm.sh/chart (a chart-only release would restart every broker)")
    p.check(sts["spec"].get("podManagementPolicy") == "Parallel", w, "podManagementPolicy must default to Parallel")
    p.check(sts["spec"].get("updateStrategy", {}).get("type") == "RollingUpdate", w, "updateStrategy must be RollingUpdate")


def check_default(docs, p: Problems) -> None:
    check_common_facts(docs, p, replicas=3)
    sts = one(docs, "StatefulSet", p)
    if sts is None:
        return
    w = kn(sts)
    c = container(sts)
    env = env_map(c)
    pod = sts["spec"]["template"]["spec"]
    p.check(env.get("RAFTMQ_NODE_ID_FROM_ORDINAL", {}).get("value") == "true", w, "RAFTMQ_NODE_ID_FROM_ORDINAL=true expected")
    p.check(env.get("POD_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name", w, "POD_NAME from metadata.name expected")
    p.check("RAFTMQ_NODE_ID" not in env, w, "RAFTMQ_NODE_ID must not be set (it comes from the ordinal)")
    # PVC per pod.
    vcts = sts["spec"].get("volumeClaimTemplates", [])
    if p.check(len(vcts) == 1, w, "one volumeClaimTemplate expected"):
        v = vcts[0]
        p.check(v["metadata"]["name"] == "data", w, "claim template must be named data")
        p.check(v["spec"]["accessModes"] == ["ReadWriteOnce"], w, "claim must be ReadWriteOnce")
        p.check(v["spec"]["resources"]["requests"]["storage"] == "8Gi", w, "claim size must default to 8Gi")
        p.check("storageClassName" not in v["spec"], w, "default storage class expected (no storageClassName)")
        p.check(set(v["metadata"]["labels"]) == {"app.kubernetes.io/name", "app.kubernetes.io/instance"}, w,
                "claim template labels must be the stable selector labels only (volumeClaimTemplates are immutable)")
    p.check(not any(v["name"] == "data" for v in pod["volumes"]), w, "data must come from the claim template, not a pod volume")
    p.check(sts["spec"].get("persistentVolumeClaimRetentionPolicy") == {"whenDeleted": "Retain", "whenScaled": "Retain"}, w, "PVCs must be retained by default")
    # preStop drain: the broker binary itself (no shell in the image) runs `ctl drain --wait`
    # against its own HTTP port, and a grace period covers it.
    pre = c.get("lifecycle", {}).get("preStop", {})
    cmd = pre.get("exec", {}).get("command", [])
    p.check(cmd[:1] == ["/usr/local/bin/raftmq"] and cmd[1:2] == ["ctl"] and "drain" in cmd and "--wait" in cmd, w,
            "preStop must exec `/usr/local/bin/raftmq ctl ... drain --wait` (no shell in the image)")
    p.check("httpGet" not in pre, w, "preStop must not httpGet (GET /api/v1/drain only reports status)")
    if "--wait-timeout" in cmd:
        p.check(int(cmd[cmd.index("--wait-timeout") + 1]) < pod.get("terminationGracePeriodSeconds", 30), w,
                "the drain wait must end before terminationGracePeriodSeconds")
    p.check(pod.get("terminationGracePeriodSeconds", 30) >= 30, w, "terminationGracePeriodSeconds too short for drain + shutdown")
    # Soft anti-affinity by default.
    aff = pod.get("affinity", {}).get("podAntiAffinity", {})
    p.check("preferredDuringSchedulingIgnoredDuringExecution" in aff and "requiredDuringSchedulingIgnoredDuringExecution" not in aff, w, "soft pod anti-affinity expected by default")
    # Services.
    headless = one(docs, "Service", p, lambda d: d["spec"].get("clusterIP") == "None")
    client = one(docs, "Service", p, lambda d: d["spec"].get("clusterIP") != "None")
    if headless:
        hw = kn(headless)
        p.check(headless["spec"]["publishNotReadyAddresses"] is True, hw, "publishNotReadyAddresses must be true")
        names = {pt["name"]: pt["port"] for pt in headless["spec"]["ports"]}
        p.check(names.get("cluster") == 7946, hw, "cluster port 7946 expected on the headless Service")
        p.check(names.get("http") == 9100, hw, "http port 9100 expected on the headless Service")
        p.check(sts["spec"]["serviceName"] == headless["metadata"]["name"], w, "serviceName must be the headless Service")
    if client:
        cw = kn(client)
        p.check(client["spec"]["type"] == "ClusterIP", cw, "client Service must default to ClusterIP")
        p.check({pt["name"]: pt["port"] for pt in client["spec"]["ports"]} == {"mqtt": 1883}, cw, "client Service must expose only mqtt 1883 by default")
        p.check(not any(pt["name"] in ("http", "cluster") for pt in client["spec"]["ports"]), cw, "admin/cluster ports must not be on the client Service")
    pdb = one(docs, "PodDisruptionBudget", p)
    if pdb:
        p.check(pdb["spec"].get("maxUnavailable") == 1 and "minAvailable" not in pdb["spec"], kn(pdb), "PDB must be maxUnavailable: 1")
    p.check(not any(d["kind"] == "ServiceMonitor" for d in docs), "ServiceMonitor", "must be off by default")
    p.check(not any(v.get("secret") for v in pod["volumes"]), w, "no Secret is mounted by default")
    kinds = sorted(d["kind"] for d in docs)
    p.check(kinds == ["ConfigMap", "PodDisruptionBudget", "Service", "Service", "ServiceAccount", "StatefulSet"], "render", f"unexpected kinds {kinds}")


def mounts_ro(c, name: str, path: str) -> bool:
    """Whether container `c` mounts volume `name` read-only at `path`."""
    return any(m["name"] == name and m["mountPath"] == path and m.get("readOnly") is True for m in c["volumeMounts"])


def check_all_features(docs, p: Problems) -> None:
    check_common_facts(docs, p, replicas=5)
    sts = one(docs, "StatefulSet", p)
    if sts is None:
        return
    w = kn(sts)
    c = container(sts)
    pod = sts["spec"]["template"]["spec"]
    ports = {pt["name"]: pt["containerPort"] for pt in c["ports"]}
    p.check(ports == {"mqtt": 1883, "mqtts": 8883, "ws": 8083, "wss": 8084, "http": 9100, "cluster": 7946}, w, f"container ports {ports}")
    p.check(c["image"].startswith("registry.example.com/raftmq/raftmq@sha256:"), w, f"image digest not used: {c['image']}")
    secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    p.check(secrets.get("tls", {}).get("secretName") == "raftmq-tls", w, "TLS Secret not mounted")
    p.check(secrets.get("auth", {}).get("secretName") == "raftmq-passwords", w, "password Secret not mounted")
    p.check(secrets.get("cluster-tls", {}).get("secretName") == "raftmq-cluster-tls", w, "cluster TLS Secret not mounted")
    p.check(mounts_ro(c, "cluster-tls", "/etc/raftmq/cluster-tls"), w, "cluster TLS Secret mount must be read-only at /etc/raftmq/cluster-tls")
    for s in secrets.values():
        p.check(s.get("defaultMode") == 0o440, w, "Secrets must be mounted 0440")
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    p.check(mounts.get("tls", {}).get("readOnly") is True and mounts.get("auth", {}).get("readOnly") is True, w, "Secret mounts must be read-only")
    aff = pod.get("affinity", {}).get("podAntiAffinity", {})
    p.check("requiredDuringSchedulingIgnoredDuringExecution" in aff, w, "hard anti-affinity expected")
    tsc = pod.get("topologySpreadConstraints", [])
    p.check(len(tsc) == 1 and "labelSelector" in tsc[0], w, "topologySpreadConstraints must get the pods' selector")
    vct = sts["spec"]["volumeClaimTemplates"][0]
    p.check(vct["spec"].get("storageClassName") == "fast-ssd" and vct["spec"]["resources"]["requests"]["storage"] == "20Gi", w, "persistence values not applied")
    p.check(sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Delete", w, "retention policy not applied")
    client = one(docs, "Service", p, lambda d: d["spec"].get("clusterIP") != "None")
    if client:
        cw = kn(client)
        p.check(client["spec"]["type"] == "LoadBalancer", cw, "LoadBalancer expected")
        sp = {pt["name"]: pt for pt in client["spec"]["ports"]}
        p.check(set(sp) == {"mqtt", "mqtts", "ws", "wss"}, cw, f"client ports {sorted(sp)}")
        p.check(sp.get("mqtt", {}).get("nodePort") == 31883 and sp.get("mqtts", {}).get("nodePort") == 31884, cw, "nodePorts not applied")
        p.check(client["spec"].get("externalTrafficPolicy") == "Local", cw, "externalTrafficPolicy not applied")
    pdb = one(docs, "PodDisruptionBudget", p)
    if pdb:
        p.check(pdb["spec"].get("minAvailable") == 3 and "maxUnavailable" not in pdb["spec"], kn(pdb), "minAvailable must replace maxUnavailable")
    sm = one(docs, "ServiceMonitor", p)
    if sm:
        p.check(sm["metadata"]["namespace"] == "monitoring", kn(sm), "ServiceMonitor namespace not applied")
        p.check(sm["metadata"]["labels"].get("release") == "kube-prometheus-stack", kn(sm), "ServiceMonitor labels not applied")
        ep = sm["spec"]["endpoints"][0]
        p.check(ep["port"] == "http" and ep["interval"] == "15s", kn(sm), "ServiceMonitor endpoint values not applied")
    cm = one(docs, "ConfigMap", p)
    if cm:
        cfg = tomllib.loads(cm["data"]["raftmq.toml"])
        p.check(cfg.get("tls") == {"cert_file": "/etc/raftmq/tls/tls.crt", "key_file": "/etc/raftmq/tls/tls.key", "ca_file": "/etc/raftmq/tls/ca.crt", "client_auth": "required"}, kn(cm), f"tls section {cfg.get('tls')}")
        p.check(cfg.get("auth", {}).get("password_file") == "/etc/raftmq/auth/passwords", kn(cm), "auth.password_file")
        p.check(cfg.get("auth", {}).get("allow_anonymous") is False, kn(cm), "user auth keys must merge with the managed ones")
        p.check(cfg["mqtt"].get("max_inflight") == 64 and isinstance(cfg["mqtt"]["max_inflight"], int), kn(cm), "integers must stay integers in TOML")
        p.check(cfg["listeners"].get("ws_path") == "/mqtt", kn(cm), "ws_path")
        p.check(cfg["cluster"]["addr"] == "[::]:7946", kn(cm), "bindAddress not applied")
        want_cluster_tls = {k: f"/etc/raftmq/cluster-tls/{f}" for k, f in (("tls_cert_file", "tls.crt"), ("tls_key_file", "tls.key"), ("tls_ca_file", "ca.crt"))}
        got_cluster_tls = {k: v for k, v in cfg["cluster"].items() if k.startswith("tls_")}
        p.check(got_cluster_tls == want_cluster_tls, kn(cm), f"cluster TLS keys {got_cluster_tls}")


def check_single_ephemeral(docs, p: Problems) -> None:
    sts = one(docs, "StatefulSet", p)
    if sts is None:
        return
    w = kn(sts)
    c = container(sts)
    pod = sts["spec"]["template"]["spec"]
    env = env_map(c)
    p.check(sts["spec"]["replicas"] == 1, w, "replicas 1 expected")
    p.check("volumeClaimTemplates" not in sts["spec"], w, "no claim template without persistence")
    p.check("persistentVolumeClaimRetentionPolicy" not in sts["spec"], w, "no retention policy without persistence")
    p.check(any(v["name"] == "data" and "emptyDir" in v for v in pod["volumes"]), w, "data must be an emptyDir")
    p.check("RAFTMQ_NODE_ID_FROM_ORDINAL" not in env, w, "fromOrdinal=false must not set RAFTMQ_NODE_ID_FROM_ORDINAL")
    p.check("lifecycle" not in c, w, "drain.enabled=false must leave out the preStop hook")
    p.check("affinity" not in pod, w, "podAntiAffinity.type='' must leave out the affinity")
    p.check(not any(d["kind"] in ("PodDisruptionBudget", "ServiceAccount") for d in docs), "render", "PDB and ServiceAccount must be off")
    p.check(pod.get("serviceAccountName") == "default", w, "serviceAccount.create=false must use the default account")
    client = one(docs, "Service", p, lambda d: d["spec"].get("clusterIP") != "None")
    if client:
        p.check([pt["name"] for pt in client["spec"]["ports"]] == ["ws"], kn(client), "only the ws port expected")
    cm = one(docs, "ConfigMap", p)
    if cm:
        cfg = tomllib.loads(cm["data"]["raftmq.toml"])
        p.check(cfg["listeners"].get("tcp") == "none", kn(cm), "disabled mqtt listener must render tcp = \"none\"")


def check_renamed(docs, p: Problems) -> None:
    sts = one(docs, "StatefulSet", p)
    if sts is None:
        return
    p.check(sts["metadata"]["name"] == "mq-raftmq", kn(sts), "release mq must name the StatefulSet mq-raftmq")
    p.check(sts["spec"]["serviceName"] == "mq-raftmq-headless", kn(sts), "headless Service name")


SCENARIOS = {
    "default": (check_default, True),
    "all-features": (check_all_features, False),
    "single-ephemeral": (check_single_ephemeral, False),
    "renamed": (check_renamed, True),
}


def run_checks(docs: list[dict[str, Any]], scenario: str, versions: list[str], namespace: str,
               raftmq_bin: str | None) -> tuple[Problems, list[str]]:
    p = Problems()
    validated = validate_schemas(docs, versions, p)
    if p.items:
        return p, validated  # the cross-reference checks assume schema-valid objects
    facts, current_keys = SCENARIOS[scenario]
    try:
        check_generic(docs, namespace, p)
        check_statefulset_wiring(docs, p)
        check_config(docs, p, raftmq_bin, current_keys)
        facts(docs, p)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        p.add("render", f"unexpected structure ({type(e).__name__}: {e})")
    return p, validated


def cmd_validate(args: argparse.Namespace) -> int:
    docs = load_docs(Path(args.file))
    versions = [v for v in args.k8s.split(",") if v]
    p, validated = run_checks(docs, args.scenario, versions, args.namespace, args.raftmq_bin)
    if p.items:
        print(f"FAIL {args.scenario}: {len(p.items)} problem(s)")
        for item in p.items:
            print(f"  - {item}")
        return 1
    current_keys = SCENARIOS[args.scenario][1]
    binary = " + `raftmq config check`" if args.raftmq_bin and current_keys else ""
    print(f"ok   {args.scenario}: {len(docs)} manifests valid against Kubernetes {', '.join(versions)} (strict){binary}; "
          f"cross-references and scenario facts hold")
    for v in validated:
        print(f"       {v}")
    return 0


def cmd_selftest(args: argparse.Namespace) -> int:
    """Breaks known-good renders in known ways and requires the checks to notice each one."""
    import copy

    default = load_docs(Path(args.default))
    full = load_docs(Path(args.all_features))

    def kind(ds, k, pred=lambda d: True):
        return [d for d in ds if d["kind"] == k and pred(d)][0]

    def sts(ds):
        return kind(ds, "StatefulSet")

    def ctr(ds):
        return sts(ds)["spec"]["template"]["spec"]["containers"][0]

    def cm_set(ds, old, new):
        cm = kind(ds, "ConfigMap")
        cm["data"]["raftmq.toml"] = cm["data"]["raftmq.toml"].replace(old, new)

    mutations = [
        ("default", "unknown field in the StatefulSet spec", lambda ds: sts(ds)["spec"].__setitem__("replica", 3)),
        ("default", "containerPort as a string", lambda ds: ctr(ds)["ports"][0].__setitem__("containerPort", "1883")),
        ("default", "PDB without a selector", lambda ds: kind(ds, "PodDisruptionBudget")["spec"].__setitem__("selector", "x")),
        ("default", "readiness probe on /healthz", lambda ds: ctr(ds)["readinessProbe"]["httpGet"].__setitem__("path", "/healthz")),
        ("default", "liveness probe on a missing port", lambda ds: ctr(ds)["livenessProbe"]["httpGet"].__setitem__("port", "admin")),
        ("default", "headless Service not publishing unready pods",
         lambda ds: kind(ds, "Service", lambda d: d["spec"].get("clusterIP") == "None")["spec"].__setitem__("publishNotReadyAddresses", False)),
        ("default", "client Service targeting a missing port",
         lambda ds: kind(ds, "Service", lambda d: d["spec"].get("clusterIP") != "None")["spec"]["ports"][0].__setitem__("targetPort", "mqtt5")),
        ("default", "Service selector not matching the pods",
         lambda ds: kind(ds, "Service", lambda d: d["spec"].get("clusterIP") != "None")["spec"]["selector"].__setitem__("app.kubernetes.io/name", "other")),
        ("default", "volume mount without a volume", lambda ds: ctr(ds)["volumeMounts"].append({"name": "nope", "mountPath": "/nope"})),
        ("default", "no PVC template", lambda ds: sts(ds)["spec"].pop("volumeClaimTemplates")),
        ("default", "replicas 2", lambda ds: sts(ds)["spec"].__setitem__("replicas", 2)),
        ("default", "seed list missing a pod", lambda ds: cm_set(ds, ', "raftmq-2.', ', "raftmq-9.')),
        ("default", "config that is not TOML", lambda ds: cm_set(ds, "[mqtt]", "[mqtt")),
        ("default", "listener port not matching the container port", lambda ds: cm_set(ds, ":1883", ":1884")),
        ("default", "preStop exec hook through a shell", lambda ds: ctr(ds)["lifecycle"]["preStop"].__setitem__("exec", {"command": ["sh", "-c", "sleep 5"]})),
        ("default", "service links enabled", lambda ds: sts(ds)["spec"]["template"]["spec"].__setitem__("enableServiceLinks", True)),
        ("all-features", "ServiceMonitor with an unknown endpoint field",
         lambda ds: kind(ds, "ServiceMonitor")["spec"]["endpoints"][0].__setitem__("intervall", "15s")),
        ("all-features", "ServiceMonitor with a malformed interval",
         lambda ds: kind(ds, "ServiceMonitor")["spec"]["endpoints"][0].__setitem__("interval", "15 seconds")),
        ("all-features", "ServiceMonitor selecting the client Service too",
         lambda ds: kind(ds, "ServiceMonitor")["spec"]["selector"]["matchLabels"].pop("raftmq.io/service")),
    ]
    failures = []
    for scenario, what, mutate in mutations:
        docs = copy.deepcopy(default if scenario == "default" else full)
        mutate(docs)
        p, _ = run_checks(docs, scenario, ["1.25"], args.namespace, args.raftmq_bin)
        if not p.items:
            failures.append(f"{scenario}: {what}: not detected")
    if failures:
        print("FAIL self-test: " + "; ".join(failures))
        return 1
    print(f"ok   self-test: all {len(mutations)} deliberately broken renders were rejected")
    return 0


def checksum_of(path: Path) -> str:
    for d in load_docs(path):
        if d["kind"] == "StatefulSet":
            return d["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    raise SystemExit(f"{path}: no StatefulSet")


def cmd_checksum(args: argparse.Namespace) -> int:
    base, scaled, changed = (checksum_of(Path(f)) for f in (args.base, args.scaled, args.changed))
    problems = []
    if base != scaled:
        problems.append("changing replicaCount changed checksum/config (scaling would restart every pod)")
    if base == changed:
        problems.append("changing config did not change checksum/config (pods would not roll)")
    seeds = {}
    for f in (args.base, args.scaled):
        for d in load_docs(Path(f)):
            if d["kind"] == "ConfigMap":
                seeds[f] = tomllib.loads(d["data"]["raftmq.toml"])["cluster"]["seeds"]
    if len(seeds[args.base]) == len(seeds[args.scaled]):
        problems.append("the seed list did not follow replicaCount")
    if problems:
        print("FAIL checksum: " + "; ".join(problems))
        return 1
    print("ok   checksum/config: stable when only replicaCount changes (seeds follow it), changes with config")
    return 0


def cmd_docker(args: argparse.Namespace) -> int:
    import dockerfile

    p = Problems()
    ports = {"1883", "8883", "8083", "8084", "9100", "7946"}
    for path, scratch in ((args.dockerfile, True), (args.multistage, False)):
        try:
            cmds = dockerfile.parse_file(path)
        except dockerfile.GoParseError as e:
            p.add(path, f"does not parse: {e}")
            continue
        by = {}
        for c in cmds:
            by.setdefault(c.cmd, []).append(c)
        froms = [c.value[0] for c in by.get("FROM", [])]
        final = [c for c in cmds]
        last_from = max(i for i, c in enumerate(final) if c.cmd == "FROM")
        final = final[last_from:]
        if scratch:
            p.check(froms == ["scratch"], path, f"must be a single FROM scratch stage (no pull), has {froms}")
            text = Path(path).read_text()
            p.check(not re.search(r"^#\s*syntax=", text, re.M), path, "a # syntax= directive would pull a BuildKit frontend image")
            p.check(not by.get("RUN"), path, "RUN needs a shell, which a scratch image has not")
        else:
            p.check(len(froms) == 2 and froms[0].startswith("rust:") and froms[1].startswith("debian:"), path, f"stages {froms}")
        final_by: dict[str, list] = {}
        for c in final:
            final_by.setdefault(c.cmd, []).append(c)
        exposed = {v.split("/")[0] for c in final_by.get("EXPOSE", []) for v in c.value}
        p.check(exposed == ports, path, f"EXPOSE {sorted(exposed)} != {sorted(ports)}")
        p.check([c.value for c in final_by.get("USER", [])] == [("10001:10001",)], path, "must run as 10001:10001")
        p.check(("/data",) in [c.value for c in final_by.get("VOLUME", [])], path, "VOLUME /data expected")
        p.check([c.value for c in final_by.get("ENTRYPOINT", [])] == [("/usr/local/bin/raftmq",)], path, "ENTRYPOINT /usr/local/bin/raftmq expected")
        p.check([c.value for c in final_by.get("CMD", [])] == [("serve",)], path, "CMD serve expected")
        p.check(not final_by.get("HEALTHCHECK"), path, "no HEALTHCHECK expected (documented: no shell or HTTP client in the image)")

    compose = yaml.safe_load(Path(args.compose).read_text())
    services = compose.get("services", {})
    p.check(sorted(services) == ["raftmq-1", "raftmq-2", "raftmq-3"], "compose", f"services {sorted(services)}")
    volumes = set(compose.get("volumes", {}))
    for i in (1, 2, 3):
        s = services.get(f"raftmq-{i}", {})
        env = s.get("environment", {})
        where = f"compose raftmq-{i}"
        p.check(str(env.get("RAFTMQ_NODE_ID")) == str(i), where, "RAFTMQ_NODE_ID")
        others = sorted(f"raftmq-{j}:7946" for j in (1, 2, 3) if j != i)
        p.check(sorted(str(env.get("RAFTMQ_SEEDS", "")).split(",")) == others, where, f"RAFTMQ_SEEDS {env.get('RAFTMQ_SEEDS')} != {others}")
        p.check(env.get("RAFTMQ_CLUSTER__ADVERTISE_ADDR") == f"raftmq-{i}:7946", where, "advertise address")
        published = sorted(str(x) for x in s.get("ports", []))
        want = sorted([f"127.0.0.1:1883{i}:1883/tcp", f"127.0.0.1:1910{i}:9100/tcp"])
        p.check(published == want, where, f"ports {published} != {want}")
        vols = [str(v) for v in s.get("volumes", [])]
        p.check(vols == [f"raftmq-{i}-data:/data:rw"], where, f"volumes {vols}")
        p.check(f"raftmq-{i}-data" in volumes, where, "named volume not declared")
        p.check(list(s.get("networks", {})) == ["raftmq"], where, "must be on the raftmq network only")
    if p.items:
        print(f"FAIL docker packaging: {len(p.items)} problem(s)")
        for item in p.items:
            print(f"  - {item}")
        return 1
    print("ok   docker packaging: Dockerfile (FROM scratch, no RUN, no pull) and Dockerfile.multistage parse with "
          "the official Dockerfile parser; runtime layout identical; compose has 3 nodes, ids 1..3, seeds, loopback ports, volumes")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate")
    v.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    v.add_argument("--k8s", default="1.25,1.37")
    v.add_argument("--namespace", default="raftmq")
    v.add_argument("--raftmq-bin")
    v.add_argument("file")
    c = sub.add_parser("checksum")
    c.add_argument("base")
    c.add_argument("scaled")
    c.add_argument("changed")
    t = sub.add_parser("selftest")
    t.add_argument("--namespace", default="raftmq")
    t.add_argument("--raftmq-bin")
    t.add_argument("default")
    t.add_argument("all_features")
    d = sub.add_parser("docker")
    d.add_argument("dockerfile")
    d.add_argument("multistage")
    d.add_argument("compose")
    args = ap.parse_args()
    return {"validate": cmd_validate, "checksum": cmd_checksum, "selftest": cmd_selftest, "docker": cmd_docker}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
