//! kscale: a Kubernetes autoscaler and external metrics adapter.
