{{/* Names are cut at 63 characters: the DNS label limit of Services. */}}
{{- define "flotilla.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "flotilla.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "flotilla.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "flotilla.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "head"). */}}
{{- define "flotilla.selector" -}}
app.kubernetes.io/name: {{ include "flotilla.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "flotilla.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}

{{- define "flotilla.tokenSecret" -}}
{{- .Values.clusterToken.existingSecret | default (printf "%s-cluster-token" (include "flotilla.fullname" .)) -}}
{{- end -}}

{{- define "flotilla.etcdService" -}}
{{ include "flotilla.fullname" . }}-etcd
{{- end -}}

{{- define "flotilla.headAddress" -}}
{{ include "flotilla.fullname" . }}-head:{{ .Values.heads.port }}
{{- end -}}

{{/* etcd client URLs, comma-separated: every member by its stable name, so
     that the client fails over between them. */}}
{{- define "flotilla.etcdEndpoints" -}}
{{- if .Values.etcd.enabled -}}
{{- $svc := include "flotilla.etcdService" . -}}
{{- $eps := list -}}
{{- range $i := until (int .Values.etcd.replicas) -}}
{{- $eps = append $eps (printf "http://%s-%d.%s.%s.svc.%s:2379" $svc $i $svc $.Release.Namespace $.Values.clusterDomain) -}}
{{- end -}}
{{- join "," $eps -}}
{{- else -}}
{{- if not .Values.etcd.external.endpoints -}}
{{- fail "etcd.enabled=false needs etcd.external.endpoints (the client URLs of your etcd)" -}}
{{- end -}}
{{- join "," .Values.etcd.external.endpoints -}}
{{- end -}}
{{- end -}}

{{/* Flags and mounts for an external etcd's TLS and auth (heads and agents
     both dial etcd, with their own flags). */}}
{{- define "flotilla.etcdTlsArgs" -}}
{{- if and (not .Values.etcd.enabled) .Values.etcd.external.tls.secretName -}}
- --etcd-cacert=/etc/flotilla/etcd-tls/ca.crt
{{- if .Values.etcd.external.tls.clientCert }}
- --etcd-cert=/etc/flotilla/etcd-tls/tls.crt
- --etcd-key=/etc/flotilla/etcd-tls/tls.key
{{- end }}
{{- end }}
{{- end -}}

{{- define "flotilla.etcdTlsMount" -}}
{{- if and (not .Values.etcd.enabled) .Values.etcd.external.tls.secretName -}}
- name: etcd-tls
  mountPath: /etc/flotilla/etcd-tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "flotilla.etcdTlsVolume" -}}
{{- if and (not .Values.etcd.enabled) .Values.etcd.external.tls.secretName -}}
- name: etcd-tls
  secret:
    secretName: {{ .Values.etcd.external.tls.secretName }}
{{- end }}
{{- end -}}

{{/* The environment every orchestrator, agent and gateway container shares. */}}
{{- define "flotilla.commonEnv" -}}
# The cluster's internal address is the pod's (vLLM's VLLM_HOST_IP).
- name: VLLM_HOST_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: FLOTILLA_CLUSTER_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "flotilla.tokenSecret" . }}
      key: token
# State files (token, known heads, node id, compiled kernels) on an emptyDir:
# writable whatever user the image runs as.
- name: FLOTILLA_CACHE_ROOT
  value: /var/cache/flotilla
{{- end -}}

{{/* etcd credentials: for heads and node agents only, the processes that
     dial etcd (the gateway would copy FLOTILLA_* variables to its actors). */}}
{{- define "flotilla.etcdAuthEnv" -}}
{{- if and (not .Values.etcd.enabled) .Values.etcd.external.authSecret -}}
- name: FLOTILLA_ETCD_USER
  valueFrom:
    secretKeyRef:
      name: {{ .Values.etcd.external.authSecret }}
      key: username
- name: FLOTILLA_ETCD_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.etcd.external.authSecret }}
      key: password
{{- end }}
{{- end -}}

{{- define "flotilla.modelVolume" -}}
- name: model
{{- if eq .Values.model.volume.type "hostPath" }}
  hostPath:
    path: {{ .Values.model.volume.hostPath }}
    type: Directory
{{- else }}
  persistentVolumeClaim:
    claimName: {{ required "model.volume.claimName is needed with model.volume.type=persistentVolumeClaim" .Values.model.volume.claimName }}
    readOnly: true
{{- end }}
{{- end -}}

{{/* Parallel sizes, with the defaults values.yaml describes. */}}
{{- define "flotilla.tp" -}}
{{- if kindIs "invalid" .Values.model.tensorParallelSize -}}
{{- max 1 (int .Values.workers.gpusPerNode) -}}
{{- else -}}
{{- int .Values.model.tensorParallelSize -}}
{{- end -}}
{{- end -}}

{{- define "flotilla.pp" -}}
{{- if kindIs "invalid" .Values.model.pipelineParallelSize -}}
{{- max 1 (int .Values.workers.replicas) -}}
{{- else -}}
{{- int .Values.model.pipelineParallelSize -}}
{{- end -}}
{{- end -}}

{{- define "flotilla.servedModelName" -}}
{{- if .Values.model.servedModelName -}}
{{- first .Values.model.servedModelName -}}
{{- else -}}
{{- .Values.model.path -}}
{{- end -}}
{{- end -}}

{{/* Checks across values that the schema cannot express. */}}
{{- define "flotilla.validate" -}}
{{- $path := required "model.path is required: the model directory or .gguf file, e.g. --set model.path=/models/llama" .Values.model.path -}}
{{- $mount := trimSuffix "/" .Values.model.volume.mountPath -}}
{{- if not (hasPrefix (printf "%s/" $mount) $path) -}}
{{- fail (printf "model.path %s must lie under model.volume.mountPath %s (the model volume is mounted there)" $path $mount) -}}
{{- end -}}
{{- $world := mul (int (include "flotilla.tp" .)) (int (include "flotilla.pp" .)) -}}
{{- if gt (int .Values.workers.gpusPerNode) 0 -}}
{{- $need := mul $world (int .Values.gateway.replicas) -}}
{{- $have := mul (int .Values.workers.gpusPerNode) (int .Values.workers.replicas) -}}
{{- if gt $need $have -}}
{{- fail (printf "%d gateway replica(s) x tensorParallelSize x pipelineParallelSize need %d GPUs, but workers.replicas x workers.gpusPerNode offer %d" (int .Values.gateway.replicas) $need $have) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* An init container that waits until one of .addresses (host:port)
     accepts a connection, so that a pod starts once what it dials is up
     instead of crash-looping into ever longer back-offs (the orchestrator
     exits when etcd or the head is not there yet). Uses bash's /dev/tcp. */}}
{{- define "flotilla.waitFor" -}}
{{- if .ctx.Values.waitForDependencies -}}
initContainers:
  - name: wait-for-{{ .what }}
    image: {{ include "flotilla.image" .ctx }}
    imagePullPolicy: {{ .ctx.Values.image.pullPolicy }}
    command:
      - bash
      - -c
      - |
        until for a in "$@"; do timeout 2 bash -c "exec 3<>/dev/tcp/${a%:*}/${a##*:}" 2>/dev/null && exit 0; done; false; do
          echo "waiting for {{ .what }} ($*)"; sleep 2
        done
      - wait-for-{{ .what }}
      {{- range .addresses }}
      - {{ . }}
      {{- end }}
{{- end }}
{{- end -}}

{{/* host:port of each etcd endpoint URL. */}}
{{- define "flotilla.etcdHostPorts" -}}
{{- $out := list -}}
{{- range splitList "," (include "flotilla.etcdEndpoints" .) -}}
{{- $out = append $out (regexReplaceAll "^[a-z]+://" . "") -}}
{{- end -}}
{{- join "," $out -}}
{{- end -}}
