{{/*
The picker's name: "<release>-epp", as upstream's chart names its picker, so that references
to it (dashboards, policies) carry over.
*/}}
{{- define "kvroute.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-epp" (.Release.Name | lower | trunc 40 | trimSuffix "-") -}}
{{- end -}}
{{- end -}}

{{/* The InferencePool (and the pool label the dashboards filter on): the release's name. */}}
{{- define "kvroute.poolName" -}}
{{- .Release.Name -}}
{{- end -}}

{{- define "kvroute.serviceAccountName" -}}
{{- .Values.router.epp.serviceAccount.name | default (include "kvroute.fullname" .) -}}
{{- end -}}

{{- define "kvroute.selectorLabels" -}}
app.kubernetes.io/name: kvroute
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kvroute.labels" -}}
{{ include "kvroute.selectorLabels" . }}
app.kubernetes.io/component: endpoint-picker
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "kvroute.image" -}}
{{- $img := .Values.router.epp.image -}}
{{- printf "%s/%s:%s" $img.registry $img.repository ($img.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* True ("true") when kvroute follows an InferencePool, empty when it follows pods by label. */}}
{{- define "kvroute.poolMode" -}}
{{- if .Values.router.inferencePool.create }}true{{ end -}}
{{- end -}}

{{/* The routing configuration file kvroute reads. */}}
{{- define "kvroute.configFile" -}}
{{- if .Values.router.epp.pluginsConfigFile -}}
{{- .Values.router.epp.pluginsConfigFile -}}
{{- else if .Values.router.epp.kvEvents.enabled -}}
precise-plugins.yaml
{{- else -}}
default-plugins.yaml
{{- end -}}
{{- end -}}

{{/* A duration as kvroute reads one ("500ms", "5s", "1m"), in seconds (a float). */}}
{{- define "kvroute.seconds" -}}
{{- $d := toString . -}}
{{- if not (regexMatch "^[0-9]+(\\.[0-9]+)?(ms|s|m)$" $d) -}}
{{- fail (printf "%q is not a duration kvroute reads (a number then ms, s or m)" $d) -}}
{{- end -}}
{{- if hasSuffix "ms" $d -}}
{{- divf (trimSuffix "ms" $d | float64) 1000 -}}
{{- else if hasSuffix "m" $d -}}
{{- mulf (trimSuffix "m" $d | float64) 60 -}}
{{- else -}}
{{- trimSuffix "s" $d | float64 -}}
{{- end -}}
{{- end -}}

{{/*
Checks made before anything renders; each failure says which value to change.
*/}}
{{- define "kvroute.validate" -}}
{{- $epp := .Values.router.epp -}}
{{- if not .Values.router.modelServers.matchLabels -}}
{{- fail "router.modelServers.matchLabels is required: the labels of the model-server pods (the InferencePool's selector, or --endpoint-selector without a pool)" -}}
{{- end -}}
{{- $ports := list -}}
{{- range .Values.router.modelServers.targetPorts -}}
{{- if has (int .number) $ports -}}
{{- fail (printf "router.modelServers.targetPorts: port %v is listed twice" .number) -}}
{{- end -}}
{{- $ports = append $ports (int .number) -}}
{{- end -}}
{{- $grace := float64 $epp.terminationGracePeriodSeconds -}}
{{- $needed := addf (include "kvroute.seconds" $epp.lameDuck) (float64 $epp.shutdownGraceSeconds) -}}
{{- if le $grace $needed -}}
{{- fail (printf "router.epp.terminationGracePeriodSeconds (%v) must exceed lameDuck + shutdownGraceSeconds (%vs), or the kubelet kills kvroute while it drains" $epp.terminationGracePeriodSeconds $needed) -}}
{{- end -}}
{{- $managed := list "serve" "grpc-port" "grpc-health-port" "metrics-port" "pool-name" "pool-namespace" "pool-group" "endpoint-selector" "endpoint-target-ports" "config-file" "config-text" "zap-encoder" "kv-events-port" "kv-replay-port" "block-size" "tokenizers-dir" "model-server-metrics-port" "refresh-metrics-interval" "metrics-staleness-threshold" "lame-duck" "drain-timeout" "shutdown-grace-secs" "secure-serving" "cert-path" "enable-cert-reload" -}}
{{- range $key, $_ := $epp.flags -}}
{{- if has $key $managed -}}
{{- fail (printf "router.epp.flags.%s: the chart renders --%s itself from its own value (see values.yaml)" $key $key) -}}
{{- end -}}
{{- end -}}
{{- range $name, $_ := $epp.pluginsCustomConfig -}}
{{- if has $name (list "default-plugins.yaml" "precise-plugins.yaml" "least-in-flight.yaml") -}}
{{- fail (printf "router.epp.pluginsCustomConfig.%s: that file is built in; give yours another name and select it with router.epp.pluginsConfigFile" $name) -}}
{{- end -}}
{{- end -}}
{{- $file := include "kvroute.configFile" . -}}
{{- if not (or (has $file (list "default-plugins.yaml" "precise-plugins.yaml" "least-in-flight.yaml")) (hasKey $epp.pluginsCustomConfig $file)) -}}
{{- fail (printf "router.epp.pluginsConfigFile %q is neither built in nor a key of router.epp.pluginsCustomConfig" $file) -}}
{{- end -}}
{{- if and $epp.kvEvents.enabled (not $epp.tokenizers.volume) -}}
{{- fail "router.epp.kvEvents.enabled needs router.epp.tokenizers.volume: precise routing tokenizes each prompt with the model's own tokenizer.json, read from that volume" -}}
{{- end -}}
{{- if and .Values.httpRoute.create (not .Values.router.inferencePool.create) -}}
{{- fail "httpRoute.create routes to the chart's InferencePool: it needs router.inferencePool.create" -}}
{{- end -}}
{{- if not (has .Values.provider.name (list "none" "istio" "gke")) -}}
{{- fail (printf "provider.name %q: one of none, istio, gke" .Values.provider.name) -}}
{{- end -}}
{{- if and (eq .Values.provider.name "gke") (not .Values.router.inferencePool.create) -}}
{{- fail "provider.name gke attaches its policies to the chart's InferencePool: it needs router.inferencePool.create" -}}
{{- end -}}
{{- end -}}
