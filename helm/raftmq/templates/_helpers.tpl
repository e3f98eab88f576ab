{{/* ---------------------------------------------------------------------------------------
Names and labels
--------------------------------------------------------------------------------------- */}}

{{- define "raftmq.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Full name: "<release>-<chart>", or the release name when it already contains the chart name.
Kept to 52 characters: the StatefulSet adds "-<ordinal>" to pod names and Kubernetes adds a
controller-revision hash label of up to 11 characters to the StatefulSet name (63 in total).
*/}}
{{- define "raftmq.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "raftmq.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "raftmq.headlessName" -}}
{{- printf "%s-headless" (include "raftmq.fullname" .) -}}
{{- end -}}

{{- define "raftmq.selectorLabels" -}}
app.kubernetes.io/name: {{ include "raftmq.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "raftmq.labels" -}}
helm.sh/chart: {{ include "raftmq.chart" . }}
{{ include "raftmq.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: raftmq
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Pod template labels: the common labels without helm.sh/chart, so that a chart release that changes
nothing in the pods does not restart the brokers.
*/}}
{{- define "raftmq.podLabels" -}}
{{ include "raftmq.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: raftmq
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "raftmq.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "raftmq.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "raftmq.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion | toString -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* ---------------------------------------------------------------------------------------
Checks of the values, run by every template that includes "raftmq.validate"
--------------------------------------------------------------------------------------- */}}
{{- define "raftmq.validate" -}}
{{- $v := .Values -}}
{{- if lt (int $v.replicaCount) 1 -}}
{{- fail "replicaCount must be at least 1" -}}
{{- end -}}
{{- if and (not $v.nodeId.fromOrdinal) (gt (int $v.replicaCount) 1) -}}
{{- fail "nodeId.fromOrdinal=false gives every pod the same node_id: it is only valid with replicaCount=1" -}}
{{- end -}}
{{- if and $v.listeners.mqtts.enabled (not $v.tls.enabled) -}}
{{- fail "listeners.mqtts.enabled needs tls.enabled=true and tls.secretName" -}}
{{- end -}}
{{- if and $v.listeners.wss.enabled (not $v.tls.enabled) -}}
{{- fail "listeners.wss.enabled needs tls.enabled=true and tls.secretName" -}}
{{- end -}}
{{- if and $v.tls.enabled (not $v.tls.secretName) -}}
{{- fail "tls.enabled needs tls.secretName (an existing Secret with the certificate and key)" -}}
{{- end -}}
{{- if and $v.cluster.tls.enabled (not $v.cluster.tls.secretName) -}}
{{- fail "cluster.tls.enabled needs cluster.tls.secretName (an existing Secret with the node certificate, key and CA)" -}}
{{- end -}}
{{- if and $v.auth.passwordFile.enabled (not $v.auth.passwordFile.secretName) -}}
{{- fail "auth.passwordFile.enabled needs auth.passwordFile.secretName (an existing Secret)" -}}
{{- end -}}
{{- if not (or $v.listeners.mqtt.enabled $v.listeners.mqtts.enabled $v.listeners.ws.enabled $v.listeners.wss.enabled) -}}
{{- fail "enable at least one of listeners.mqtt, listeners.mqtts, listeners.ws, listeners.wss" -}}
{{- end -}}
{{- if not (has $v.podAntiAffinity.type (list "" "soft" "hard")) -}}
{{- fail (printf "podAntiAffinity.type must be \"soft\", \"hard\" or \"\" (got %q)" $v.podAntiAffinity.type) -}}
{{- end -}}
{{- if not (has $v.service.type (list "ClusterIP" "NodePort" "LoadBalancer")) -}}
{{- fail (printf "service.type must be ClusterIP, NodePort or LoadBalancer (got %q)" $v.service.type) -}}
{{- end -}}
{{- if not (has $v.podManagementPolicy (list "Parallel" "OrderedReady")) -}}
{{- fail (printf "podManagementPolicy must be Parallel or OrderedReady (got %q)" $v.podManagementPolicy) -}}
{{- end -}}
{{- if and $v.persistence.enabled (not $v.persistence.size) -}}
{{- fail "persistence.size is required when persistence.enabled" -}}
{{- end -}}
{{- if not (kindIs "map" $v.config) -}}
{{- fail "config must be a map of TOML sections and keys" -}}
{{- end -}}
{{- end -}}

{{/* ---------------------------------------------------------------------------------------
Broker configuration

The config keys the chart manages. The TLS, WebSocket and password-file keys are the names the
chart expects the broker to read for those features; they are only rendered when the matching
values are enabled, so the default configuration uses only keys the broker has today.
--------------------------------------------------------------------------------------- */}}
{{- define "raftmq.seeds" -}}
{{- if .Values.cluster.seeds -}}
{{- toJson .Values.cluster.seeds -}}
{{- else -}}
{{- $seeds := list -}}
{{- $full := include "raftmq.fullname" . -}}
{{- $headless := include "raftmq.headlessName" . -}}
{{- range $i := until (int .Values.replicaCount) -}}
{{- $seeds = append $seeds (printf "%s-%d.%s.%s.svc.%s:%d" $full $i $headless $.Release.Namespace $.Values.clusterDomain (int $.Values.cluster.port)) -}}
{{- end -}}
{{- toJson $seeds -}}
{{- end -}}
{{- end -}}

{{/*
The chart-managed keys, as a map. With "withSeeds" false the seed list is left out: the checksum
annotation hashes the configuration without it, so scaling does not restart the running pods.
*/}}
{{- define "raftmq.managedConfig" -}}
{{- $ := .root -}}
{{- $v := $.Values -}}
{{- $bind := $v.bindAddress -}}
{{- $listeners := dict "tcp" (ternary (printf "%s:%d" $bind (int $v.listeners.mqtt.port)) "none" (and $v.listeners.mqtt.enabled true)) -}}
{{- if $v.listeners.mqtts.enabled -}}
{{- $_ := set $listeners "tls" (printf "%s:%d" $bind (int $v.listeners.mqtts.port)) -}}
{{- end -}}
{{- if $v.listeners.ws.enabled -}}
{{- $_ := set $listeners "ws" (printf "%s:%d" $bind (int $v.listeners.ws.port)) -}}
{{- end -}}
{{- if $v.listeners.wss.enabled -}}
{{- $_ := set $listeners "wss" (printf "%s:%d" $bind (int $v.listeners.wss.port)) -}}
{{- end -}}
{{- if or $v.listeners.ws.enabled $v.listeners.wss.enabled -}}
{{- $_ := set $listeners "ws_path" $v.listeners.ws.path -}}
{{- end -}}
{{- $cluster := dict "addr" (printf "%s:%d" $bind (int $v.cluster.port)) -}}
{{- if .withSeeds -}}
{{- $_ := set $cluster "seeds" (include "raftmq.seeds" $ | fromJsonArray) -}}
{{- end -}}
{{- if $v.cluster.tls.enabled -}}
{{- $_ := set $cluster "tls_cert_file" (printf "%s/%s" $v.cluster.tls.mountPath $v.cluster.tls.certKey) -}}
{{- $_ := set $cluster "tls_key_file" (printf "%s/%s" $v.cluster.tls.mountPath $v.cluster.tls.keyKey) -}}
{{- $_ := set $cluster "tls_ca_file" (printf "%s/%s" $v.cluster.tls.mountPath $v.cluster.tls.caKey) -}}
{{- end -}}
{{- $managed := dict
      "data_dir" $v.persistence.mountPath
      "listeners" $listeners
      "http" (dict "addr" (printf "%s:%d" $bind (int $v.http.port)))
      "cluster" $cluster -}}
{{- if $v.tls.enabled -}}
{{- $tls := dict
      "cert_file" (printf "%s/%s" $v.tls.mountPath $v.tls.certKey)
      "key_file" (printf "%s/%s" $v.tls.mountPath $v.tls.keyKey) -}}
{{- if $v.tls.caKey -}}
{{- $_ := set $tls "ca_file" (printf "%s/%s" $v.tls.mountPath $v.tls.caKey) -}}
{{- $_ := set $tls "client_auth" "required" -}}
{{- end -}}
{{- $_ := set $managed "tls" $tls -}}
{{- end -}}
{{- if $v.auth.passwordFile.enabled -}}
{{- $_ := set $managed "auth" (dict "password_file" (printf "%s/%s" $v.auth.passwordFile.mountPath $v.auth.passwordFile.key)) -}}
{{- end -}}
{{- toJson $managed -}}
{{- end -}}

{{/* The whole configuration file: values.config with the managed keys merged over it. */}}
{{- define "raftmq.configToml" -}}
{{- $user := deepCopy (.root.Values.config | default dict) -}}
{{- $managed := include "raftmq.managedConfig" . | fromJson -}}
{{- $config := mustMergeOverwrite $user $managed -}}
# raftmq configuration, rendered by the {{ include "raftmq.chart" .root }} Helm chart from
# values.config and the chart's listener, storage and cluster values. node_id and
# cluster.advertise_addr come from the pod's environment.
{{ include "raftmq.toml.table" (dict "table" $config "path" "") }}
{{- end -}}

{{/* ---------------------------------------------------------------------------------------
A small TOML writer (Helm's toToml writes every YAML number as a float: 64 -> 64.0, which an
integer setting rejects). Values: strings, booleans, integers (YAML numbers without a fraction),
floats, arrays and tables (nested maps become [section.sub] tables; maps inside arrays become
inline tables). Null values are left out.
--------------------------------------------------------------------------------------- */}}
{{- define "raftmq.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . -}}{{ . }}{{- else -}}{{ toJson . }}{{- end -}}
{{- end -}}

{{- define "raftmq.toml.value" -}}
{{- $v := . -}}
{{- if kindIs "string" $v -}}
{{- toJson $v -}}
{{- else if kindIs "bool" $v -}}
{{- ternary "true" "false" $v -}}
{{- else if or (kindIs "float64" $v) (kindIs "float32" $v) -}}
{{- if eq (float64 (int64 $v)) (float64 $v) -}}{{ int64 $v }}{{- else -}}{{ toJson $v }}{{- end -}}
{{- else if or (kindIs "int" $v) (kindIs "int64" $v) (kindIs "int32" $v) (kindIs "uint64" $v) -}}
{{- $v -}}
{{- else if kindIs "slice" $v -}}
[{{- range $i, $e := $v -}}{{- if $i -}}, {{ end -}}{{- include "raftmq.toml.value" $e -}}{{- end -}}]
{{- else if kindIs "map" $v -}}
{{- $parts := list -}}
{{- range $k, $e := $v -}}
{{- if not (kindIs "invalid" $e) -}}
{{- $parts = append $parts (printf "%s = %s" (include "raftmq.toml.key" $k) (include "raftmq.toml.value" $e)) -}}
{{- end -}}
{{- end -}}
{ {{- join ", " $parts -}} }
{{- else -}}
{{- fail (printf "config: cannot write %v (%s) as TOML" $v (kindOf $v)) -}}
{{- end -}}
{{- end -}}

{{/* A table: its plain keys first, then each sub-table under its own [dotted.header]. */}}
{{- define "raftmq.toml.table" -}}
{{- $path := .path -}}
{{- $lines := list -}}
{{- range $k, $v := .table -}}
{{- if not (or (kindIs "map" $v) (kindIs "invalid" $v)) -}}
{{- $lines = append $lines (printf "%s = %s" (include "raftmq.toml.key" $k) (include "raftmq.toml.value" $v)) -}}
{{- end -}}
{{- end -}}
{{- range $k, $v := .table -}}
{{- if kindIs "map" $v -}}
{{- $sub := ternary (include "raftmq.toml.key" $k) (printf "%s.%s" $path (include "raftmq.toml.key" $k)) (eq $path "") -}}
{{- $lines = append $lines "" -}}
{{- $lines = append $lines (printf "[%s]" $sub) -}}
{{- $body := include "raftmq.toml.table" (dict "table" $v "path" $sub) -}}
{{- if $body -}}
{{- $lines = append $lines $body -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- join "\n" $lines -}}
{{- end -}}

{{/* ---------------------------------------------------------------------------------------
Ports
--------------------------------------------------------------------------------------- */}}
{{/* The enabled MQTT listeners as a list of {name, port, nodePort}. */}}
{{- define "raftmq.clientPorts" -}}
{{- $ports := list -}}
{{- range $name := list "mqtt" "mqtts" "ws" "wss" -}}
{{- $l := index $.Values.listeners $name -}}
{{- if $l.enabled -}}
{{- $ports = append $ports (dict "name" $name "port" (int $l.port) "nodePort" $l.nodePort) -}}
{{- end -}}
{{- end -}}
{{- toJson $ports -}}
{{- end -}}
