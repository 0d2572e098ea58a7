// kscale's own file (not from Kubernetes). The parity harness compiles it into one package
// together with the unmodified upstream sources of k8s.io/kubernetes/pkg/controller/podautoscaler,
// which the build overlay reads straight from the Go module cache. It only sets up controller
// state and calls the HPA's unexported functions; it computes nothing itself.

package podautoscaler

import (
	"time"

	autoscalingv2 "k8s.io/api/autoscaling/v2"
)

// KscaleTolerances builds the HPA's Tolerances (unexported fields).
func KscaleTolerances(down, up float64) Tolerances {
	return Tolerances{scaleDown: down, scaleUp: up}
}

// KscaleRecommendation is one stored raw recommendation.
type KscaleRecommendation struct {
	Replicas int32
	Time     time.Time
}

// KscaleScaleEvent is one stored scale event.
type KscaleScaleEvent struct {
	Change int32
	Time   time.Time
}

// KscaleState is the controller's per-HPA memory.
type KscaleState struct {
	Recommendations []KscaleRecommendation
	ScaleUp         []KscaleScaleEvent
	ScaleDown       []KscaleScaleEvent
}

// KscaleNormalized is what one normalization step produced.
type KscaleNormalized struct {
	Replicas       int32
	Stabilized     int32
	AbleToScale    string // reason of the AbleToScale condition
	ScalingLimited string // reason of the ScalingLimited condition
	State          KscaleState
}

const kscaleKey = "ns/hpa"

func kscaleController(downWindow time.Duration, s KscaleState) *HorizontalController {
	a := &HorizontalController{
		downscaleStabilisationWindow: downWindow,
		recommendations:              map[string][]timestampedRecommendation{},
		scaleUpEvents:                map[string][]timestampedScaleEvent{},
		scaleDownEvents:              map[string][]timestampedScaleEvent{},
	}
	for _, r := range s.Recommendations {
		a.recommendations[kscaleKey] = append(a.recommendations[kscaleKey], timestampedRecommendation{r.Replicas, r.Time})
	}
	for _, e := range s.ScaleUp {
		a.scaleUpEvents[kscaleKey] = append(a.scaleUpEvents[kscaleKey], timestampedScaleEvent{replicaChange: e.Change, timestamp: e.Time})
	}
	for _, e := range s.ScaleDown {
		a.scaleDownEvents[kscaleKey] = append(a.scaleDownEvents[kscaleKey], timestampedScaleEvent{replicaChange: e.Change, timestamp: e.Time})
	}
	return a
}

// KscaleNormalize runs one normalization step as reconcileAutoscaler does once the metrics gave
// `desired`: normalizeDesiredReplicas (no behavior) or normalizeDesiredReplicasWithBehaviors,
// then storeScaleEvent when the count changes. The stabilized value comes from the same
// stabilization function run on a second controller holding the same state.
func KscaleNormalize(hpa *autoscalingv2.HorizontalPodAutoscaler, downWindow time.Duration, s KscaleState, current, desired, minReplicas int32) KscaleNormalized {
	var out KscaleNormalized

	probe := kscaleController(downWindow, s)
	if hpa.Spec.Behavior == nil {
		out.Stabilized = probe.stabilizeRecommendation(kscaleKey, desired)
	} else {
		h := hpa.DeepCopy()
		probe.maybeInitScaleDownStabilizationWindow(h)
		out.Stabilized, _, _ = probe.stabilizeRecommendationWithBehaviors(NormalizationArg{
			Key:               kscaleKey,
			ScaleUpBehavior:   h.Spec.Behavior.ScaleUp,
			ScaleDownBehavior: h.Spec.Behavior.ScaleDown,
			MinReplicas:       minReplicas,
			MaxReplicas:       h.Spec.MaxReplicas,
			CurrentReplicas:   current,
			DesiredReplicas:   desired,
		})
	}

	a := kscaleController(downWindow, s)
	if hpa.Spec.Behavior == nil {
		out.Replicas = a.normalizeDesiredReplicas(hpa, kscaleKey, current, desired, minReplicas)
	} else {
		out.Replicas = a.normalizeDesiredReplicasWithBehaviors(hpa, kscaleKey, current, desired, minReplicas)
	}
	if out.Replicas != current {
		a.storeScaleEvent(hpa.Spec.Behavior, kscaleKey, current, out.Replicas)
	}

	for _, c := range hpa.Status.Conditions {
		switch c.Type {
		case autoscalingv2.AbleToScale:
			out.AbleToScale = c.Reason
		case autoscalingv2.ScalingLimited:
			out.ScalingLimited = c.Reason
		}
	}
	for _, r := range a.recommendations[kscaleKey] {
		out.State.Recommendations = append(out.State.Recommendations, KscaleRecommendation{r.recommendation, r.timestamp})
	}
	for _, e := range a.scaleUpEvents[kscaleKey] {
		out.State.ScaleUp = append(out.State.ScaleUp, KscaleScaleEvent{e.replicaChange, e.timestamp})
	}
	for _, e := range a.scaleDownEvents[kscaleKey] {
		out.State.ScaleDown = append(out.State.ScaleDown, KscaleScaleEvent{e.replicaChange, e.timestamp})
	}
	return out
}
