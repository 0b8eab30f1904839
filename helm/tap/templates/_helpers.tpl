{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "tap.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-<chart>" unless the release name already contains the chart name. */}}
{{- define "tap.fullname" -}}
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

{{- define "tap.serverName" -}}
{{- printf "%s-server" (include "tap.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tap.clientName" -}}
{{- printf "%s-client" (include "tap.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tap.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "tap.labels" -}}
helm.sh/chart: {{ include "tap.chart" . }}
app.kubernetes.io/name: {{ include "tap.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tap
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of server / client resources (chart labels + component). */}}
{{- define "tap.serverLabels" -}}
{{ include "tap.labels" . }}
app.kubernetes.io/component: server
{{- end }}

{{- define "tap.clientLabels" -}}
{{ include "tap.labels" . }}
app.kubernetes.io/component: client
tap.federation/silo: {{ .Values.client.siloName | quote }}
{{- end }}

{{- define "tap.serverSelectorLabels" -}}
app.kubernetes.io/name: {{ include "tap.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end }}

{{- define "tap.clientSelectorLabels" -}}
app.kubernetes.io/name: {{ include "tap.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: client
tap.federation/silo: {{ .Values.client.siloName | quote }}
{{- end }}

{{/* repository:tag, or repository:tag@digest when a digest is given (the digest decides what is pulled). */}}
{{- define "tap.imageRef" -}}
{{- $ref := printf "%s:%s" .repository .tag }}
{{- if .digest }}{{ $ref = printf "%s@%s" $ref .digest }}{{ end }}
{{- $ref }}
{{- end }}

{{- define "tap.serverImage" -}}
{{- $i := .Values.server.image }}
{{- include "tap.imageRef" (dict "repository" $i.repository "tag" (default .Chart.AppVersion $i.tag) "digest" $i.digest) }}
{{- end }}

{{- define "tap.clientImage" -}}
{{- $i := .Values.client.image }}
{{- $gpu := gt (int .Values.client.gpu) 0 }}
{{- include "tap.imageRef" (dict "repository" (ternary $i.cudaRepository $i.repository $gpu)
      "tag" (default .Chart.AppVersion $i.tag) "digest" (ternary $i.cudaDigest $i.digest $gpu)) }}
{{- end }}

{{/* The port of client.server (HOST:PORT). */}}
{{- define "tap.clientServerPort" -}}
{{- $parts := splitList ":" (required "client.server is required: the federation address HOST:PORT" .Values.client.server) }}
{{- last $parts | int }}
{{- end }}

{{- define "tap.serverServiceAccountName" -}}
{{- if .Values.server.serviceAccount.create }}
{{- default (include "tap.serverName" .) .Values.server.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.server.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Name of the Secret with the server kit. Chart-created (inline values) and
operator-created (default name) Secrets share <fullname>-server-kit.
*/}}
{{- define "tap.serverKitSecret" -}}
{{- $t := .Values.server.tls }}
{{- $inline := or $t.ca $t.cert $t.key $t.silosJson }}
{{- if and $t.existingSecret $inline }}
{{- fail "server.tls: set either existingSecret or the inline ca/cert/key/silosJson, not both" }}
{{- end }}
{{- if and $inline (not (and $t.ca $t.cert $t.key $t.silosJson)) }}
{{- fail "server.tls: inline kit needs all of ca, cert, key and silosJson" }}
{{- end }}
{{- default (printf "%s-kit" (include "tap.serverName" .)) $t.existingSecret }}
{{- end }}

{{- define "tap.clientKitSecret" -}}
{{- $t := .Values.client.tls }}
{{- $inline := or $t.ca $t.cert $t.key }}
{{- if and $t.existingSecret $inline }}
{{- fail "client.tls: set either existingSecret or the inline ca/cert/key, not both" }}
{{- end }}
{{- if and $inline (not (and $t.ca $t.cert $t.key)) }}
{{- fail "client.tls: inline kit needs all of ca, cert and key" }}
{{- end }}
{{- default (printf "%s-kit" (include "tap.clientName" .)) $t.existingSecret }}
{{- end }}

{{/* Paths inside the containers: one place, used by args, mounts and tests. */}}
{{- define "tap.kitDir" -}}/etc/tap/kit{{- end }}
{{- define "tap.configDir" -}}/etc/tap/config{{- end }}
{{- define "tap.stateDir" -}}/var/lib/tap/state{{- end }}

{{/* Environment every TAP container needs with a read-only root filesystem. */}}
{{- define "tap.runtimeEnv" -}}
- name: HOME
  value: /tmp
- name: TAP_CACHE_DIR
  value: /tmp/tap-cache
- name: HF_HOME
  value: /tmp/hf
- name: MPLCONFIGDIR
  value: /tmp/mpl
- name: HF_HUB_OFFLINE
  value: "1"
- name: TRANSFORMERS_OFFLINE
  value: "1"
- name: PYTHONUNBUFFERED
  value: "1"
{{- end }}
