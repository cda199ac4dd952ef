{{/*
Names, labels and the per-model settings every template shares.

  values.models[i]      ─katz.model─▶ defaults merged ─▶ Deployment <fullname>-worker-<name>
                                                          ScaledObject on katz.jobs.<name>
  values.controlnets[j] ─katz.model─▶ defaults merged ─▶ Deployment <fullname>-cn-<name>
                                                          ScaledObject on katz.controlnet.<name>
  secret (amqp-url, redis-url) ─▶ env of every Deployment, TriggerAuthentication of every ScaledObject
*/}}

{{- define "katz.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 30 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 30 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* A model name as a DNS label part. */}}
{{- define "katz.dnsName" -}}
{{- . | lower | replace "_" "-" | replace "." "-" | trunc 28 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of the release's objects that belong to no one model. */}}
{{- define "katz.labels" -}}
app.kubernetes.io/name: katz
app.kubernetes.io/instance: {{ .Release.Name }}
{{ include "katz.chartLabels" . }}
{{- end -}}

{{- define "katz.chartLabels" -}}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Selector labels of one Deployment: ctx = dict "root" $ "component" "worker"|"controlnet" "model" NAME */}}
{{- define "katz.selector" -}}
app.kubernetes.io/name: katz
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
katz-model: {{ include "katz.dnsName" .model }}
{{- end -}}

{{- define "katz.secretName" -}}
{{- if .Values.secret.existingSecret -}}
{{- .Values.secret.existingSecret -}}
{{- else -}}
{{- printf "%s-urls" (include "katz.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The AMQP URI: the Bitnami subchart's service when it runs in the release, else rabbitmq.url. */}}
{{- define "katz.amqpUrl" -}}
{{- if .Values.rabbitmq.enabled -}}
{{- printf "amqp://%s:%s@%s-rabbitmq:5672/%%2f" .Values.rabbitmq.auth.username (required "rabbitmq.auth.password is required with rabbitmq.enabled" .Values.rabbitmq.auth.password) .Release.Name -}}
{{- else -}}
{{- required "rabbitmq.url (or secret.existingSecret) is required" .Values.rabbitmq.url -}}
{{- end -}}
{{- end -}}

{{- define "katz.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://:%s@%s-redis-master:6379/" (required "redis.auth.password is required with redis.enabled" .Values.redis.auth.password) .Release.Name -}}
{{- else -}}
{{- required "redis.url (or secret.existingSecret) is required" .Values.redis.url -}}
{{- end -}}
{{- end -}}

{{/* Where bundles are seen in the containers. */}}
{{- define "katz.bundleRoot" -}}
{{- if eq .Values.bundles.source "image" -}}/opt/katz/bundles{{- else -}}{{ .Values.bundles.mountPath }}{{- end -}}
{{- end -}}

{{/* A bundle path: absolute as given, else under the bundle root. ctx = list $ PATH */}}
{{- define "katz.bundlePath" -}}
{{- $root := index . 0 -}}{{- $p := index . 1 -}}
{{- if hasPrefix "/" $p -}}{{ $p }}{{- else -}}{{ printf "%s/%s" (include "katz.bundleRoot" $root) $p }}{{- end -}}
{{- end -}}

{{/* KEDA's rabbitmq trigger for one queue. ctx = dict "root" $ "m" MODEL "queue" Q */}}
{{- define "katz.trigger" -}}
- type: rabbitmq
  metadata:
    protocol: {{ .root.Values.keda.protocol | quote }}
    queueName: {{ .queue | quote }}
    mode: QueueLength
    value: {{ .m.queueLength | toString | quote }}
    activationValue: {{ .m.activationQueueLength | toString | quote }}
  authenticationRef:
    name: {{ include "katz.fullname" .root }}-rabbitmq
{{- end -}}
