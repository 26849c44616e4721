{{- define "tollgate.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tollgate.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tollgate.labels" -}}
{{ include "tollgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* gateway.yaml: the user's config with the admin listener the chart manages. */}}
{{- define "tollgate.gatewayYaml" -}}
{{- $admin := dict "bind" (printf "%s:%v" (ternary "0.0.0.0" "127.0.0.1" .Values.admin.exposed) .Values.admin.port) -}}
{{- if .Values.admin.tokenSha256 -}}
{{- $_ := set $admin "token_sha256" .Values.admin.tokenSha256 -}}
{{- end -}}
{{- $config := deepCopy .Values.config -}}
{{- $_ := set $config "admin" (merge $admin (default (dict) $config.admin)) -}}
{{- with .Values.cluster -}}
{{- if .enabled -}}
{{- $etcd := dict "endpoints" .etcd.endpoints "prefix" .etcd.prefix "timeout" .etcd.timeout -}}
{{- if .etcd.tls }}{{ $_ := set $etcd "tls" .etcd.tls }}{{ end -}}
{{- $_ := set $config "store" (dict "etcd" $etcd) -}}
{{- if .nats.servers -}}
{{- $nats := dict "servers" .nats.servers "prefix" .nats.prefix -}}
{{- if .nats.tls }}{{ $_ := set $nats "tls" .nats.tls }}{{ end -}}
{{- $_ := set $config "bus" (dict "nats" $nats) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}

{{- define "tollgate.checks" -}}
{{- if not (has .Values.mode (list "daemonset" "deployment")) -}}
{{- fail (printf "mode: expected daemonset or deployment, got %q" .Values.mode) -}}
{{- end -}}
{{- if not (has .Values.nodeAccess (list "hostPort" "hostNetwork")) -}}
{{- fail (printf "nodeAccess: expected hostPort or hostNetwork, got %q" .Values.nodeAccess) -}}
{{- end -}}
{{- if and .Values.admin.exposed (not .Values.admin.tokenSha256) (not (and .Values.config.admin .Values.config.admin.policy)) -}}
{{- fail "admin.exposed: the admin API would be reachable without credentials; set admin.tokenSha256 (or config.admin.policy)" -}}
{{- end -}}
{{- if and .Values.serviceMonitor.enabled (not .Values.admin.exposed) -}}
{{- fail "serviceMonitor.enabled: Prometheus cannot reach /metrics on the pod's loopback; set admin.exposed (with admin.tokenSha256)" -}}
{{- end -}}
{{- range .Values.config.listeners -}}
{{- if and (eq .name "sidecar") (not (hasSuffix (printf ":%v" $.Values.ports.sidecar) (toString .bind))) -}}
{{- fail (printf "config.listeners[sidecar].bind: expected port %v (ports.sidecar), got %q" $.Values.ports.sidecar (toString .bind)) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.cluster.enabled (not .Values.cluster.etcd.endpoints) -}}
{{- fail "cluster.etcd.endpoints: cluster mode needs the etcd cluster's client URLs (e.g. http://etcd-0.etcd:2379)" -}}
{{- end -}}
{{- if and .Values.cluster.enabled .Values.config.bus -}}
{{- fail "config.bus: with cluster.enabled the chart renders bus.nats from cluster.nats; give it there" -}}
{{- end -}}
{{- if and .Values.secretFiles .Values.existingSecret -}}
{{- fail "secretFiles and existingSecret: give one or the other" -}}
{{- end -}}
{{- end -}}
