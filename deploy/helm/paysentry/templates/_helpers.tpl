{{- define "paysentry.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "paysentry.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "paysentry.labels" -}}
{{ include "paysentry.selectorLabels" . }}
app.kubernetes.io/part-of: paysentry
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "paysentry.image" -}}
{{- if .Values.image.digest -}}{{ .Values.image.repository }}@{{ .Values.image.digest }}{{- else -}}{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}{{- end -}}
{{- end -}}

{{- define "paysentry.tls" -}}
{{- if and .Values.tls.enabled (eq .Values.mode "gateway") -}}true{{- end -}}
{{- end -}}

{{- define "paysentry.secretEnv" -}}
{{- if .ref.name }}
- name: {{ .env }}
  valueFrom:
    secretKeyRef: {name: {{ .ref.name }}, key: {{ .ref.key }}}
{{- end }}
{{- end -}}

{{/* The paysentry container, the same in both modes. */}}
{{- define "paysentry.container" -}}
name: paysentry
image: {{ include "paysentry.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
ports:
  {{- if eq .Values.mode "gateway" }}
  - {name: agents, containerPort: 8080}
  {{- end }}
  - {name: diagnostics, containerPort: 8081}
envFrom:
  - configMapRef: {name: {{ include "paysentry.fullname" . }}-settings}
env:
  - {name: PAYSENTRY_LISTEN, value: {{ ternary "127.0.0.1:8080" "0.0.0.0:8080" (eq .Values.mode "sidecar") | quote }}}
  - {name: PAYSENTRY_ADMIN_LISTEN, value: "0.0.0.0:8081"}
  - {name: PAYSENTRY_POLICIES, value: /etc/paysentry/policies}
  {{- if .Values.state.enabled }}
  - {name: PAYSENTRY_STATE_FILE, value: /etc/paysentry/state/state.yaml}
  {{- end }}
  {{- if eq .Values.mode "sidecar" }}
  - {name: PAYSENTRY_STORE, value: "sqlite:////var/lib/paysentry/paysentry.db"}
  {{- else }}
  {{- include "paysentry.secretEnv" (dict "env" "PAYSENTRY_STORE" "ref" .Values.secrets.database) | nindent 2 }}
  {{- include "paysentry.secretEnv" (dict "env" "PAYSENTRY_REDIS_URL" "ref" .Values.secrets.redis) | nindent 2 }}
  {{- end }}
  {{- if include "paysentry.tls" . }}
  - {name: PAYSENTRY_TLS_CERT_FILE, value: /etc/paysentry/tls/tls.crt}
  - {name: PAYSENTRY_TLS_KEY_FILE, value: /etc/paysentry/tls/tls.key}
  - {name: PAYSENTRY_ADMIN_TLS_CERT_FILE, value: /etc/paysentry/tls/tls.crt}
  - {name: PAYSENTRY_ADMIN_TLS_KEY_FILE, value: /etc/paysentry/tls/tls.key}
  {{- end }}
  {{- include "paysentry.secretEnv" (dict "env" "PAYSENTRY_ENCRYPTION_KEYS" "ref" .Values.secrets.encryptionKeys) | nindent 2 }}
  {{- include "paysentry.secretEnv" (dict "env" "PAYSENTRY_NOTIFY_SECRET" "ref" .Values.secrets.notifySecret) | nindent 2 }}
  {{- include "paysentry.secretEnv" (dict "env" "PAYSENTRY_METRICS_TOKEN" "ref" .Values.secrets.metricsToken) | nindent 2 }}
  {{- with .Values.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
volumeMounts:
  - {name: policies, mountPath: /etc/paysentry/policies, readOnly: true}
  {{- if .Values.state.enabled }}
  - {name: state, mountPath: /etc/paysentry/state, readOnly: true}
  - {name: provider-credentials, mountPath: /etc/paysentry/provider, readOnly: true}
  - {name: agent-tokens, mountPath: /etc/paysentry/agents, readOnly: true}
  {{- end }}
  {{- if include "paysentry.tls" . }}
  - {name: tls, mountPath: /etc/paysentry/tls, readOnly: true}
  {{- end }}
  {{- if eq .Values.mode "sidecar" }}
  - {name: data, mountPath: /var/lib/paysentry}
  {{- else }}
  - {name: tmp, mountPath: /tmp}
  {{- end }}
{{- $scheme := ternary "HTTPS" "HTTP" (eq (include "paysentry.tls" .) "true") }}
startupProbe:
  httpGet: {path: /livez, port: diagnostics, scheme: {{ $scheme }}}
  periodSeconds: 1
  failureThreshold: 30
livenessProbe:
  httpGet: {path: /livez, port: diagnostics, scheme: {{ $scheme }}}
  periodSeconds: 10
readinessProbe:
  httpGet: {path: /readyz, port: diagnostics, scheme: {{ $scheme }}}
  periodSeconds: 5
resources:
  {{- toYaml .Values.resources | nindent 2 }}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities: {drop: [ALL]}
{{- end -}}

{{- define "paysentry.volumes" -}}
- name: policies
  configMap: {name: {{ .Values.policies.existingConfigMap | default (printf "%s-policies" (include "paysentry.fullname" .)) }}}
{{- if .Values.state.enabled }}
- name: state
  configMap: {name: {{ .Values.state.existingConfigMap | default (printf "%s-state" (include "paysentry.fullname" .)) }}}
- name: provider-credentials
  secret: {secretName: {{ .Values.secrets.providerCredentials.name }}, defaultMode: 0440}
- name: agent-tokens
  secret: {secretName: {{ .Values.secrets.agentTokens.name }}, defaultMode: 0440}
{{- end }}
{{- if include "paysentry.tls" . }}
- name: tls
  secret: {secretName: {{ .Values.tls.secretName }}, defaultMode: 0440}
{{- end }}
{{- if eq .Values.mode "sidecar" }}
- name: data
  persistentVolumeClaim: {claimName: {{ include "paysentry.fullname" . }}-data}
{{- else }}
- name: tmp
  emptyDir: {}
{{- end }}
{{- end -}}

{{- define "paysentry.podSecurity" -}}
automountServiceAccountToken: false
terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  fsGroup: 10001
  seccompProfile: {type: RuntimeDefault}
{{- end -}}
