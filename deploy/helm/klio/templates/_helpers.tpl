{{/* Names, labels and the rendered Klio configuration file. */}}

{{- define "klio.fullname" -}}
{{- if contains "klio" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-klio" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "klio.labels" -}}
app.kubernetes.io/part-of: klio
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "klio.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "klio.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "klio.tier1ClaimName" -}}
{{- default (printf "%s-tier1" (include "klio.fullname" .)) .Values.tier1.persistence.existingClaim -}}
{{- end -}}

{{- define "klio.natsUrl" -}}
{{- if contains "nats" .Release.Name -}}
{{- printf "nats://%s:4222" .Release.Name -}}
{{- else -}}
{{- printf "nats://%s-nats:4222" .Release.Name -}}
{{- end -}}
{{- end -}}

{{/*
The configuration file every service reads (--config /etc/klio/klio.yaml). Paths in it are the
mount paths used by the Deployments, so the two cannot disagree.
*/}}
{{- define "klio.config" -}}
{{- $cfg := deepCopy (.Values.config | default dict) -}}
{{- $nats := get $cfg "nats" | default dict -}}
{{- if not (get $nats "url") -}}
{{- $_ := set $nats "url" (include "klio.natsUrl" .) -}}
{{- end -}}
{{- $_ := set $cfg "nats" $nats -}}
{{- $_ := set $cfg "tier1" (dict "path" .Values.tier1.mountPath) -}}
{{- if .Values.encryption.existingSecret -}}
{{- $keys := dict -}}
{{- range .Values.encryption.keys -}}
{{- $_ := set $keys . (printf "%s/%s" $.Values.encryption.mountPath .) -}}
{{- end -}}
{{- $_ := set $cfg "encryption" (dict "active" .Values.encryption.active "keys" $keys) -}}
{{- end -}}
{{- if .Values.tier2.enabled -}}
{{- $s3 := dict "bucket" .Values.tier2.s3.bucket "prefix" .Values.tier2.s3.prefix "region" .Values.tier2.s3.region -}}
{{- if .Values.tier2.s3.endpoint_url -}}
{{- $_ := set $s3 "endpoint_url" .Values.tier2.s3.endpoint_url -}}
{{- end -}}
{{- $_ := set $cfg "tier2" (dict "s3" $s3) -}}
{{- end -}}
{{- $clusters := list -}}
{{- range .Values.clusters -}}
{{- $c := omit . "passwordSecret" "caSecret" -}}
{{- if .passwordSecret -}}
{{- $_ := set $c "password_file" (printf "/etc/klio/pg/%s/password" .name) -}}
{{- end -}}
{{- $clusters = append $clusters $c -}}
{{- end -}}
{{- $_ := set $cfg "clusters" $clusters -}}
{{- $services := dict -}}
{{- range $name, $svc := .Values.services -}}
{{- $_ := set $services $name (dict "http_port" $svc.port "log_level" $svc.logLevel) -}}
{{- end -}}
{{- $_ := set $cfg "services" $services -}}
{{- toYaml $cfg -}}
{{- end -}}
