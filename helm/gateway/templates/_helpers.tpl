{{/* Names and labels. */}}
{{- define "gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gateway.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "gateway.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "gateway.selectorLabels" . }}
app.kubernetes.io/component: gateway
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The Secret the pods read: the user's or the chart's. */}}
{{- define "gateway.secretName" -}}
{{- default (include "gateway.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/* The Secret holding the Redis and NATS URLs: the chart's own (with
existingSecret, a second one holding only them). */}}
{{- define "gateway.urlSecretName" -}}
{{- if .Values.secrets.existingSecret -}}
{{- include "gateway.fullname" . }}-urls
{{- else -}}
{{- include "gateway.fullname" . }}
{{- end -}}
{{- end }}

{{/*
The drain's total in seconds (prestop + drain timeout + shutdown timeout),
rounded up, and the grace period: the explicit value, which must cover the
drain, or the total plus the margin.
*/}}
{{- define "gateway.drainSeconds" -}}
{{- $d := .Values.drain -}}
{{- $ms := add (int64 $d.prestopDelayMs) (int64 $d.timeoutMs) (int64 $d.shutdownTimeoutMs) -}}
{{- div (add $ms 999) 1000 -}}
{{- end }}

{{- define "gateway.terminationGracePeriodSeconds" -}}
{{- $drain := int64 (include "gateway.drainSeconds" .) -}}
{{- $derived := add $drain (int64 .Values.drain.marginSeconds) -}}
{{- $explicit := .Values.terminationGracePeriodSeconds -}}
{{- if kindIs "invalid" $explicit -}}
{{- $derived -}}
{{- else if lt (int64 $explicit) $drain -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) is shorter than the drain: drain.prestopDelayMs (%d) + drain.timeoutMs (%d) + drain.shutdownTimeoutMs (%d) = %d s. The kubelet would SIGKILL pods in the middle of their drain, and their remaining clients would reconnect all at once. Leave it unset (derived: %d s, with drain.marginSeconds), raise it to at least %d, or shorten the drain settings." (int64 $explicit) (int64 .Values.drain.prestopDelayMs) (int64 .Values.drain.timeoutMs) (int64 .Values.drain.shutdownTimeoutMs) $drain $derived $drain) -}}
{{- else -}}
{{- int64 $explicit -}}
{{- end -}}
{{- end }}

{{/* Redis / NATS URLs: external or bundled. */}}
{{- /* Where the gateway's Redis is: the bundled one, a Redis Cluster's
seed nodes (redis.clusterUrls, see gateway.redisEnv), or redis.url. */}}
{{- define "gateway.redisUrl" -}}
{{- if .Values.redis.bundled.enabled -}}
redis://{{ include "gateway.fullname" . }}-redis:6379/0
{{- else if .Values.redis.clusterUrls -}}
{{- .Values.redis.clusterUrls -}}
{{- else -}}
{{- .Values.redis.url -}}
{{- end -}}
{{- end }}

{{- /* The setting gateway.redisUrl goes to. */}}
{{- define "gateway.redisEnv" -}}
{{- if and .Values.redis.clusterUrls (not .Values.redis.bundled.enabled) -}}
GATEWAY_REDIS_CLUSTER_URLS
{{- else -}}
GATEWAY_REDIS_URL
{{- end -}}
{{- end }}

{{- define "gateway.natsUrl" -}}
{{- if .Values.nats.bundled.enabled -}}
nats://{{ include "gateway.fullname" . }}-nats:4222
{{- else -}}
{{- .Values.nats.url -}}
{{- end -}}
{{- end }}

{{/*
One TOML value. Helm reads every number as a float: whole ones are written
as integers (the gateway's integer settings refuse 2000.0).
*/}}
{{- define "gateway.tomlValue" -}}
{{- if kindIs "bool" . -}}
{{- . -}}
{{- else if or (kindIs "float64" .) (kindIs "int64" .) (kindIs "int" .) -}}
{{- if eq (float64 .) (float64 (int64 .)) -}}{{ int64 . }}{{- else -}}{{ . }}{{- end -}}
{{- else if kindIs "string" . -}}
{{- toJson . -}}
{{- else -}}
{{- fail (printf "config: %v is not a string, number or boolean" .) -}}
{{- end -}}
{{- end }}

{{/* The gateway's TOML config file. */}}
{{- define "gateway.configToml" -}}
{{- $d := .Values.drain -}}
{{- $c := dict
  "addr" (printf "0.0.0.0:%d" (int64 .Values.ports.client))
  "admin_addr" (printf "0.0.0.0:%d" (int64 .Values.ports.ops))
  "log_format" .Values.logFormat
  "log" .Values.logLevel
  "drain_prestop_delay_ms" $d.prestopDelayMs
  "drain_batch_fraction" $d.batchFraction
  "drain_batch_interval_ms" $d.batchIntervalMs
  "drain_timeout_ms" $d.timeoutMs
  "drain_close_grace_ms" $d.closeGraceMs
  "shutdown_timeout_ms" $d.shutdownTimeoutMs
  "reconnect_min_delay_ms" $d.reconnectMinDelayMs
  "reconnect_max_delay_ms" $d.reconnectMaxDelayMs
-}}
{{- /* Sentinel and the Redis users are no secrets: the passwords come
from redis.auth.existingSecret as environment variables. */ -}}
{{- with .Values.redis.sentinel.addresses -}}
{{- $_ := set $c "redis_sentinels" . -}}
{{- $_ := set $c "redis_master_name" $.Values.redis.sentinel.masterName -}}
{{- end -}}
{{- with .Values.redis.auth.username -}}
{{- $_ := set $c "redis_username" . -}}
{{- end -}}
{{- with .Values.redis.auth.sentinelUsername -}}
{{- $_ := set $c "redis_sentinel_username" . -}}
{{- end -}}
{{- if ne .Values.auth.algorithm "HS256" -}}
{{- $_ := set $c "jwt_algorithm" .Values.auth.algorithm -}}
{{- $_ := set $c "jwt_public_key_file" "/etc/gateway/secrets/jwt-public-key.pem" -}}
{{- end -}}
{{- range $k, $v := .Values.config -}}
{{- $_ := set $c $k $v -}}
{{- end -}}
# The gateway's settings (README, Configuration). Secrets and the Redis and
# NATS URLs come from the Secret as environment variables, the node id from
# the pod name.
{{- range $k := keys $c | sortAlpha }}
{{- if ne $k "namespace" }}
{{ $k }} = {{ include "gateway.tomlValue" (get $c $k) }}
{{- end }}
{{- end }}
{{- /* Channel namespaces: TOML tables, after every plain key. */}}
{{- range $ns := (get $c "namespace" | default list) }}

[[namespace]]
{{- range $k := keys $ns | sortAlpha }}
{{ $k }} = {{ include "gateway.tomlValue" (get $ns $k) }}
{{- end }}
{{- end }}
{{- end }}
