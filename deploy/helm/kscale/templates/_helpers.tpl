{{/* The release's full name: the release name, or "<release>-kscale" when it lacks "kscale". */}}
{{- define "kscale.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kscale.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kscale.labels" -}}
{{ include "kscale.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kscale.serviceAccountName" -}}
{{- default (include "kscale.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* Replicas (followers serving external metrics evaluate and publish too). */}}
{{- define "kscale.replicas" -}}
{{- .Values.replicaCount -}}
{{- end -}}

{{/* The Service's DNS names, for the serving certificate. */}}
{{- define "kscale.serviceNames" -}}
{{- $svc := include "kscale.fullname" . -}}
{{- $ns := .Release.Namespace -}}
{{- printf "%s,%s.%s,%s.%s.svc,%s.%s.svc.cluster.local" $svc $svc $ns $svc $ns $svc $ns -}}
{{- end -}}
