{{- /*
Values the templates rely on, checked once: a bad value stops the render naming it.
Included at the top of every template (and NOTES.txt), so whichever renders first stops on it.
*/ -}}
{{- define "katz.checks" -}}
{{- $v := .Values -}}
{{- if not (has $v.bundles.source (list "image" "pvc" "hostPath" "initContainer")) -}}
{{- fail (printf "bundles.source %q: one of image, pvc, hostPath, initContainer" $v.bundles.source) -}}
{{- end -}}
{{- if not (has $v.keda.protocol (list "amqp" "http")) -}}
{{- fail (printf "keda.protocol %q: amqp or http" $v.keda.protocol) -}}
{{- end -}}
{{- if and $v.rabbitmq.enabled (not (hasKey .Subcharts "rabbitmq")) -}}
{{- fail "rabbitmq.enabled needs the Bitnami rabbitmq dependency: uncomment it in Chart.yaml and run `helm dependency build`" -}}
{{- end -}}
{{- if and $v.redis.enabled (not (hasKey .Subcharts "redis")) -}}
{{- fail "redis.enabled needs the Bitnami redis dependency: uncomment it in Chart.yaml and run `helm dependency build`" -}}
{{- end -}}
{{- if not $v.models -}}{{- fail "models: at least one base model is needed" -}}{{- end -}}
{{- $seen := dict -}}
{{- range $kind := list "models" "controlnets" -}}
{{- range $e := (default (list) (index $v $kind)) -}}
{{- $m := deepCopy $v.defaults -}}{{- range $k, $x := $e -}}{{- $_ := set $m $k $x -}}{{- end -}}
{{- if not (regexMatch "^[A-Za-z0-9_.-]{1,128}$" (toString $m.name)) -}}
{{- fail (printf "%s: name %q must be a bundle name (letters, digits, _ . -)" $kind (toString $m.name)) -}}
{{- end -}}
{{- $key := printf "%s/%s" $kind (include "katz.dnsName" $m.name) -}}
{{- if hasKey $seen $key -}}
{{- fail (printf "%s: %q and %q give the same Deployment name" $kind (get $seen $key) $m.name) -}}
{{- end -}}
{{- $_ := set $seen $key $m.name -}}
{{- if or (lt (int $m.maxReplicas) 1) (gt (int $m.minReplicas) (int $m.maxReplicas)) (lt (int $m.minReplicas) 0) -}}
{{- fail (printf "%s[%s]: need 0 ≤ minReplicas ≤ maxReplicas, maxReplicas ≥ 1" $kind $m.name) -}}
{{- end -}}
{{- range $k := list "KATZ_AMQP" "KATZ_REDIS" "KATZ_QUEUE" -}}
{{- if hasKey (default (dict) $m.env) $k -}}
{{- fail (printf "%s[%s].env: %s is set by the chart (the URLs from the Secret, the queue from the name)" $kind $m.name $k) -}}
{{- end -}}
{{- end -}}
{{- if lt (int $m.queueLength) 1 -}}
{{- fail (printf "%s[%s]: queueLength must be ≥ 1" $kind $m.name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
