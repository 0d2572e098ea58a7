//go:build kscale_parity_deps

// The harness compiles the upstream podautoscaler sources through an overlay, which
// `go mod tidy` cannot see; this file (never built) names the module they come from.
package main

import _ "k8s.io/kubernetes/pkg/controller/podautoscaler"
