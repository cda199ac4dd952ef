{{/*
One Deployment of katz workers, base or ControlNet (the same pod shape for both).

  ctx = dict "root" $  "m" MODEL (defaults merged)  "component" "worker"|"controlnet"
             "name" DEPLOYMENT  "args" [katz subcommand]  "env" [EnvVar]

  pod: katz <args>  env: KATZ_AMQP / KATZ_REDIS from the Secret, the model's KATZ_* options
       port metrics (KATZ_METRICS_ADDR): /readyz → readiness, /healthz → liveness, /metrics
       bundles: image | pvc | hostPath | initContainer copy (values.bundles.source)
       stop: preStop sends SIGTERM and waits while the worker drains (jobs in flight finish,
             are stored and acked), within terminationGracePeriodSeconds = drain + margin
*/}}
{{- define "katz.workload" -}}
{{- $root := .root -}}
{{- $m := .m -}}
{{- $v := $root.Values -}}
{{- $sel := dict "root" $root "component" .component "model" $m.name -}}
{{- $drain := int (default $v.drainSeconds $m.drainSeconds) -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .name }}
  labels:
    {{- include "katz.chartLabels" $root | nindent 4 }}
    {{- include "katz.selector" $sel | nindent 4 }}
  annotations:
    katz/queue: {{ .queue | quote }}
    katz/drain-seconds: {{ $drain | quote }}
spec:
  {{- if not $v.keda.enabled }}
  replicas: {{ $m.minReplicas }}
  {{- end }}
  revisionHistoryLimit: 3
  {{- if $m.strategy }}
  strategy:
    {{- toYaml $m.strategy | nindent 4 }}
  {{- else if $m.gpu }}
  strategy:
    # a surge pod would need a free GPU: replace one pod at a time instead
    type: RollingUpdate
    rollingUpdate: { maxSurge: 0, maxUnavailable: 1 }
  {{- end }}
  selector:
    matchLabels:
      {{- include "katz.selector" $sel | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "katz.chartLabels" $root | nindent 8 }}
        {{- include "katz.selector" $sel | nindent 8 }}
      annotations:
        {{- if $v.prometheusAnnotations }}
        prometheus.io/scrape: "true"
        prometheus.io/port: {{ $v.metricsPort | quote }}
        prometheus.io/path: /metrics
        {{- end }}
        {{- if not $v.secret.existingSecret }}
        checksum/urls: {{ include (print $root.Template.BasePath "/secret.yaml") $root | sha256sum }}
        {{- end }}
    spec:
      {{- with $v.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      terminationGracePeriodSeconds: {{ add $drain $v.graceMarginSeconds }}
      # workers talk to RabbitMQ and Redis only, never to the Kubernetes API
      automountServiceAccountToken: false
      {{- with $v.podSecurityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if eq $v.bundles.source "initContainer" }}
      initContainers:
        - name: bundles
          image: {{ required "bundles.initContainer.image is required with bundles.source=initContainer" $v.bundles.initContainer.image }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          command: ["sh", "-c", {{ printf "cp -a %s/. /copy/" $v.bundles.initContainer.path | quote }}]
          volumeMounts:
            - name: bundles
              mountPath: /copy
      {{- end }}
      containers:
        - name: {{ .component }}
          image: "{{ $v.image.repository }}:{{ ternary $v.image.gpuTag $v.image.cpuTag (eq (toString $m.gpu) "true") }}"
          {{- with $v.securityContext }}
          securityContext:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          args:
            {{- toYaml .args | nindent 12 }}
          env:
            - name: KATZ_AMQP
              valueFrom:
                secretKeyRef: { name: {{ include "katz.secretName" $root }}, key: amqp-url }
            - name: KATZ_REDIS
              valueFrom:
                secretKeyRef: { name: {{ include "katz.secretName" $root }}, key: redis-url }
            - name: KATZ_WORKER_NAME
              valueFrom:
                fieldRef: { fieldPath: metadata.name }
            {{- $gpu := eq (toString $m.gpu) "true" }}
            {{- $res := deepCopy (default (ternary $m.gpuResources $m.cpuResources $gpu) $m.resources) }}
            {{- $opts := list
              (dict "name" "KATZ_METRICS_ADDR" "value" (printf "0.0.0.0:%v" $v.metricsPort))
              (dict "name" "KATZ_DEVICE" "value" (ternary "cuda:0" "cpu" $gpu))
              (dict "name" "KATZ_CONCURRENCY" "value" (toString $m.concurrency)) }}
            {{- $cpu := toString (dig "requests" "cpu" "" $res) }}
            {{- if and (not $gpu) (regexMatch "^[1-9][0-9]*$" $cpu) }}
            {{- /* ONNX Runtime's threads: the cores the pod asked for, not all of the node's */}}
            {{- $opts = append $opts (dict "name" "KATZ_THREADS" "value" $cpu) }}
            {{- end }}
            {{- range $e := concat $opts .env }}
            {{- if not (hasKey (default (dict) $m.env) $e.name) }}
            - name: {{ $e.name }}
              value: {{ $e.value | quote }}
            {{- end }}
            {{- end }}
            {{- range $k := keys (default (dict) $m.env) | sortAlpha }}
            - name: {{ $k }}
              value: {{ index $m.env $k | toString | quote }}
            {{- end }}
          ports:
            - name: metrics
              containerPort: {{ $v.metricsPort }}
              protocol: TCP
          readinessProbe:
            httpGet: { path: /readyz, port: metrics }
            periodSeconds: 5
            timeoutSeconds: 3
            failureThreshold: 2
          livenessProbe:
            httpGet: { path: /healthz, port: metrics }
            initialDelaySeconds: 10
            periodSeconds: 10
            timeoutSeconds: 5
            failureThreshold: 6
          lifecycle:
            preStop:
              exec:
                # Start the drain now and wait for it: the worker takes no new job, finishes the
                # ones in flight, stores and acks them, and exits (the grace period bounds it).
                command: ["/bin/sh", "-c", "kill -TERM 1; while kill -0 1 2>/dev/null; do sleep 1; done"]
          resources:
            {{- if $gpu }}
            {{- $_ := set $res "limits" (merge (dict "nvidia.com/gpu" 1) (default (dict) $res.limits)) }}
            {{- end }}
            {{- toYaml $res | nindent 12 }}
          {{- if or (ne $v.bundles.source "image") $v.extraVolumeMounts }}
          volumeMounts:
            {{- if ne $v.bundles.source "image" }}
            - name: bundles
              mountPath: {{ $v.bundles.mountPath }}
              readOnly: true
            {{- end }}
            {{- with $v.extraVolumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- end }}
      {{- if or (ne $v.bundles.source "image") $v.extraVolumes }}
      volumes:
        {{- if ne $v.bundles.source "image" }}
        - name: bundles
          {{- if eq $v.bundles.source "pvc" }}
          persistentVolumeClaim:
            claimName: {{ $v.bundles.pvc.claimName }}
            readOnly: true
          {{- else if eq $v.bundles.source "hostPath" }}
          hostPath:
            path: {{ $v.bundles.hostPath.path }}
            type: Directory
          {{- else if eq $v.bundles.source "initContainer" }}
          emptyDir:
            sizeLimit: {{ $v.bundles.initContainer.sizeLimit }}
          {{- end }}
        {{- end }}
        {{- with $v.extraVolumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
      {{- with $m.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $m.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $m.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end -}}
