{{/* Names and labels. */}}
{{- define "llm-shard.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "llm-shard.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "llm-shard.labels" -}}
{{ include "llm-shard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "llm-shard.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "llm-shard.apiKeySecret" -}}
{{- .Values.apiKey.existingSecret | default (printf "%s-api-key" (include "llm-shard.fullname" .)) -}}
{{- end -}}

{{- define "llm-shard.rayAuthSecret" -}}
{{- .Values.rayAuth.existingSecret | default (printf "%s-ray-auth" (include "llm-shard.fullname" .)) -}}
{{- end -}}

{{/*
Ray's token auth for a container that runs Ray or talks to it: the mode, and the token
from the release's Secret (Ray reads RAY_AUTH_TOKEN before any token file).
*/}}
{{- define "llm-shard.rayAuthEnv" -}}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "llm-shard.rayAuthSecret" . }}
      key: {{ .Values.rayAuth.secretKey }}
{{- end -}}

{{/*
A generated Secret holding one value: `value` if given, else the one a previous release
stored under `key`, else `length` random characters. Argument: dict "root" $ "name" NAME
"key" KEY "value" VALUE "length" N.
*/}}
{{- define "llm-shard.generatedSecret" -}}
{{- $value := .value -}}
{{- if not $value -}}
{{- /* `helm template` has no cluster to ask, so there it is always a fresh one. */ -}}
{{- $old := lookup "v1" "Secret" .root.Release.Namespace .name -}}
{{- $oldValue := "" -}}
{{- if and $old $old.data -}}
{{- $oldValue = get $old.data .key | b64dec -}}
{{- end -}}
{{- $value = $oldValue | default (randAlphaNum (int .length)) -}}
{{- end -}}
apiVersion: v1
kind: Secret
metadata:
  name: {{ .name }}
  labels:
    {{- include "llm-shard.labels" .root | nindent 4 }}
type: Opaque
data:
  {{ .key }}: {{ $value | b64enc | quote }}
{{- end -}}

{{- define "llm-shard.storeClaim" -}}
{{- .Values.store.persistence.existingClaim | default (printf "%s-store" (include "llm-shard.fullname" .)) -}}
{{- end -}}

{{/*
Bytes of an amount: "4Gi" (also "4GiB"), "512Mi", "1Ti", "64Ki" or a plain byte count.
Whole numbers only, as Ray's resource quantities are.
*/}}
{{- define "llm-shard.bytes" -}}
{{- $s := toString . | trim -}}
{{- if not (regexMatch "^[0-9]+((Ki|Mi|Gi|Ti)B?)?$" $s) -}}
{{- fail (printf "amount %q: expected a whole number of bytes or of Ki, Mi, Gi, Ti (e.g. 4Gi, 512Mi)" $s) -}}
{{- end -}}
{{- $n := regexFind "^[0-9]+" $s -}}
{{- $unit := trimPrefix $n $s | trimSuffix "B" -}}
{{- $scale := get (dict "" 1 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776) $unit -}}
{{- mul (int64 $n) $scale -}}
{{- end -}}

{{/* A byte count as a Kubernetes quantity: in Gi or Mi when whole, else bytes. */}}
{{- define "llm-shard.quantity" -}}
{{- $b := int64 . -}}
{{- if and (gt $b 0) (eq (mod $b 1073741824) 0) -}}
{{- printf "%dGi" (div $b 1073741824) -}}
{{- else if and (gt $b 0) (eq (mod $b 1048576) 0) -}}
{{- printf "%dMi" (div $b 1048576) -}}
{{- else -}}
{{- $b -}}
{{- end -}}
{{- end -}}

{{/*
rayStartParams for a group: its own params (over `rayStartDefaults`, if any) plus
`resources`, the budget as the JSON of `llm-shard node-resources` (bytes), written the way
KubeRay documents it: a double-quoted, escaped JSON string that the generated
`ray start --resources=...` line unquotes. Argument: the group's values.
*/}}
{{- define "llm-shard.rayStartParams" -}}
{{- $budget := .budget -}}
{{- $json := dict
      "llm_shard_ram" (include "llm-shard.bytes" $budget.ram | int64)
      "llm_shard_disk" (include "llm-shard.bytes" $budget.disk | int64)
      "llm_shard_gpu_mem" (include "llm-shard.bytes" $budget.gpuMem | int64)
    | toJson -}}
{{- $params := merge (dict "resources" (printf "%q" $json)) (.rayStartParams | default dict) (.rayStartDefaults | default dict) -}}
{{- range $k, $v := $params }}
{{ $k }}: {{ toString $v | quote }}
{{- end -}}
{{- end -}}

{{/*
Container resources matching a group's budget. Argument: dict "group" VALUES "emptyDir" BOOL.
*/}}
{{- define "llm-shard.groupResources" -}}
{{- $g := .group -}}
{{- $mem := add (include "llm-shard.bytes" $g.budget.ram | int64) (include "llm-shard.bytes" $g.memoryOverhead | int64) -}}
{{- $disk := include "llm-shard.bytes" $g.budget.disk | int64 -}}
requests:
  cpu: {{ $g.cpu | quote }}
  memory: {{ include "llm-shard.quantity" $mem }}
  {{- if and .emptyDir (gt $disk 0) }}
  ephemeral-storage: {{ include "llm-shard.quantity" $disk }}
  {{- end }}
  {{- if gt (int ($g.gpus | default 0)) 0 }}
  nvidia.com/gpu: {{ $g.gpus }}
  {{- end }}
limits:
  cpu: {{ $g.cpu | quote }}
  memory: {{ include "llm-shard.quantity" $mem }}
  {{- if gt (int ($g.gpus | default 0)) 0 }}
  nvidia.com/gpu: {{ $g.gpus }}
  {{- end }}
{{- end -}}

{{/* The store volume of a pod. Argument: dict "root" $ "group" VALUES. */}}
{{- define "llm-shard.storeVolume" -}}
- name: store
{{- if .root.Values.store.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "llm-shard.storeClaim" .root }}
{{- else }}
  {{- $disk := include "llm-shard.bytes" .group.budget.disk | int64 }}
  {{- if gt $disk 0 }}
  emptyDir:
    sizeLimit: {{ include "llm-shard.quantity" $disk }}
  {{- else }}
  emptyDir: {}
  {{- end }}
{{- end }}
{{- end -}}

{{/* The Ray container of a pod. Argument: dict "root" $ "group" VALUES. */}}
{{- define "llm-shard.rayContainer" -}}
- name: ray
  image: {{ include "llm-shard.image" .root }}
  imagePullPolicy: {{ .root.Values.image.pullPolicy }}
  env:
    - name: LLM_SHARD_HOME
      value: {{ .root.Values.store.mountPath | quote }}
    {{- include "llm-shard.rayAuthEnv" .root | nindent 4 }}
  resources:
    {{- include "llm-shard.groupResources" (dict "group" .group "emptyDir" (not .root.Values.store.persistence.enabled)) | nindent 4 }}
  volumeMounts:
    - name: store
      mountPath: {{ .root.Values.store.mountPath }}
    - name: ray-tmp
      mountPath: /tmp/ray
    - name: shm
      mountPath: /dev/shm
{{- end -}}

{{/* Scheduling fields of a pod template. Argument: the group's values. */}}
{{- define "llm-shard.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
