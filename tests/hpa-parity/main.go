// hpa-parity: answers replica-count questions with the real HPA code of Kubernetes (see
// README.md). Reads {"cases":[...]} on stdin, writes {"results":[...]} (same order) on stdout.
//
// Every timestamp in a case is an age in milliseconds; it becomes time.Now().Add(-age) right
// before the HPA function is called, since the HPA reads the clock itself.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"time"

	autoscalingv2 "k8s.io/api/autoscaling/v2"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/ptr"

	metricsclient "k8s.io/kubernetes/pkg/controller/podautoscaler/metrics"
	"kscale.local/hpaparity/podautoscaler"
)

const namespace = "ns"

type readyCond struct {
	Status bool  `json:"status"`
	AgeMs  int64 `json:"age_ms"`
}

type usage struct {
	Milli   int64 `json:"milli"`
	AgeMs   int64 `json:"age_ms"`
	WindowS int64 `json:"window_s"`
}

type pod struct {
	Name       string     `json:"name"`
	Phase      string     `json:"phase"`
	Deleting   bool       `json:"deleting"`
	Ready      *readyCond `json:"ready"`
	StartAgeMs *int64     `json:"start_age_ms"`
	Requests   []*int64   `json:"requests"` // one per container, null = no request
	Usage      *usage     `json:"usage"`
}

type policy struct {
	Kind    string `json:"kind"` // Pods | Percent
	Value   int32  `json:"value"`
	PeriodS int32  `json:"period_s"`
}

type rules struct {
	WindowS  *int32   `json:"window_s"` // null: scale-down falls back to the controller's window
	Select   string   `json:"select"`   // Max | Min | Disabled
	Policies []policy `json:"policies"`
}

type behavior struct {
	Up   rules `json:"up"`
	Down rules `json:"down"`
}

type timed struct {
	N     int32 `json:"n"`
	AgeMs int64 `json:"age_ms"`
}

type testCase struct {
	Kind string `json:"kind"` // ext_value | ext_average | object_value | object_average | pods | resource | normalize

	// External metrics.
	Series    []int64 `json:"series"`
	Target    int64   `json:"target"` // milli; for resource: percent (utilization) or milli (average)
	Spec      int32   `json:"spec"`
	Status    int32   `json:"status"`
	ReadyPods int     `json:"ready_pods"`
	OtherPods int     `json:"other_pods"`
	TolDown   float64 `json:"tol_down"`
	TolUp     float64 `json:"tol_up"`

	// Resource metrics.
	CPU         bool   `json:"cpu"`
	Utilization bool   `json:"utilization"`
	Current     int32  `json:"current"`
	Container   string `json:"container"` // ContainerResource: the container whose usage and request count
	CPUInitS    int64  `json:"cpu_init_s"`
	ReadyDelayS int64  `json:"ready_delay_s"`
	Pods        []pod  `json:"pods"`

	// Normalization.
	Behavior    *behavior `json:"behavior"`
	DownWindowS int64     `json:"down_window_s"`
	Recs        []timed   `json:"recs"`
	UpEvents    []timed   `json:"up_events"`
	DownEvents  []timed   `json:"down_events"`
	Desired     int32     `json:"desired"`
	Min         int32     `json:"min"`
	Max         int32     `json:"max"`
}

type result struct {
	Replicas       int32   `json:"replicas"`
	Error          string  `json:"error,omitempty"`
	Value          int64   `json:"value"` // utilization percent, or usage in milli-units
	Stabilized     int32   `json:"stabilized"`
	AbleToScale    string  `json:"able_to_scale,omitempty"`
	ScalingLimited string  `json:"scaling_limited,omitempty"`
	Recs           []timed `json:"recs,omitempty"`
	UpEvents       []timed `json:"up_events,omitempty"`
	DownEvents     []timed `json:"down_events,omitempty"`
}

// fakeMetrics serves fixed metrics, as the metrics APIs would.
type fakeMetrics struct {
	pods     metricsclient.PodMetricsInfo
	external []int64
	object   int64
}

func (f *fakeMetrics) podsCopy() metricsclient.PodMetricsInfo {
	out := make(metricsclient.PodMetricsInfo, len(f.pods)) // the calculator edits the map
	for k, v := range f.pods {
		out[k] = v
	}
	return out
}

func (f *fakeMetrics) GetResourceMetric(_ context.Context, _ v1.ResourceName, _ string, _ labels.Selector, _ string) (metricsclient.PodMetricsInfo, time.Time, error) {
	return f.podsCopy(), time.Time{}, nil
}

func (f *fakeMetrics) GetRawMetric(string, string, labels.Selector, labels.Selector) (metricsclient.PodMetricsInfo, time.Time, error) {
	return f.podsCopy(), time.Time{}, nil
}

func (f *fakeMetrics) GetObjectMetric(string, string, *autoscalingv2.CrossVersionObjectReference, labels.Selector) (int64, time.Time, error) {
	return f.object, time.Time{}, nil
}

func (f *fakeMetrics) GetExternalMetric(string, string, labels.Selector) ([]int64, time.Time, error) {
	return append([]int64(nil), f.external...), time.Time{}, nil
}

func lister(pods []*v1.Pod) corelisters.PodLister {
	idx := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
	for _, p := range pods {
		if err := idx.Add(p); err != nil {
			panic(err)
		}
	}
	return corelisters.NewPodLister(idx)
}

func ago(now time.Time, ms int64) time.Time { return now.Add(-time.Duration(ms) * time.Millisecond) }

func ageOf(now, t time.Time) int64 {
	if t.After(now) {
		return 0 // stored during the call
	}
	return now.Sub(t).Milliseconds()
}

// externalPods: `ready` Running+Ready pods and `other` pods the HPA does not count as ready.
func externalPods(ready, other int) []*v1.Pod {
	var pods []*v1.Pod
	mk := func(name string, phase v1.PodPhase, cond *v1.ConditionStatus) *v1.Pod {
		p := &v1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: namespace}, Status: v1.PodStatus{Phase: phase}}
		if cond != nil {
			p.Status.Conditions = []v1.PodCondition{{Type: v1.PodReady, Status: *cond}}
		}
		return p
	}
	for i := 0; i < ready; i++ {
		pods = append(pods, mk(fmt.Sprintf("r%d", i), v1.PodRunning, ptr.To(v1.ConditionTrue)))
	}
	for i := 0; i < other; i++ {
		name := fmt.Sprintf("o%d", i)
		switch i % 4 {
		case 0:
			pods = append(pods, mk(name, v1.PodPending, nil))
		case 1:
			pods = append(pods, mk(name, v1.PodRunning, ptr.To(v1.ConditionFalse)))
		case 2:
			pods = append(pods, mk(name, v1.PodFailed, ptr.To(v1.ConditionTrue)))
		default:
			pods = append(pods, mk(name, v1.PodRunning, nil))
		}
	}
	return pods
}

func resourcePods(now time.Time, c *testCase, res v1.ResourceName) ([]*v1.Pod, metricsclient.PodMetricsInfo) {
	var pods []*v1.Pod
	info := metricsclient.PodMetricsInfo{}
	for _, p := range c.Pods {
		vp := &v1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: namespace},
			Status:     v1.PodStatus{Phase: v1.PodPhase(p.Phase)},
		}
		if p.Deleting {
			vp.DeletionTimestamp = &metav1.Time{Time: ago(now, 1000)}
		}
		if p.Ready != nil {
			status := v1.ConditionFalse
			if p.Ready.Status {
				status = v1.ConditionTrue
			}
			vp.Status.Conditions = []v1.PodCondition{{
				Type: v1.PodReady, Status: status, LastTransitionTime: metav1.Time{Time: ago(now, p.Ready.AgeMs)},
			}}
		}
		if p.StartAgeMs != nil {
			vp.Status.StartTime = &metav1.Time{Time: ago(now, *p.StartAgeMs)}
		}
		for i, r := range p.Requests {
			ctr := v1.Container{Name: fmt.Sprintf("c%d", i)}
			if r != nil {
				ctr.Resources.Requests = v1.ResourceList{res: *resource.NewMilliQuantity(*r, resource.DecimalSI)}
			}
			vp.Spec.Containers = append(vp.Spec.Containers, ctr)
		}
		pods = append(pods, vp)
		if p.Usage != nil {
			info[p.Name] = metricsclient.PodMetric{
				Timestamp: ago(now, p.Usage.AgeMs),
				Window:    time.Duration(p.Usage.WindowS) * time.Second,
				Value:     p.Usage.Milli,
			}
		}
	}
	return pods, info
}

func scalingRules(r rules) *autoscalingv2.HPAScalingRules {
	out := &autoscalingv2.HPAScalingRules{
		StabilizationWindowSeconds: r.WindowS,
		SelectPolicy:               ptr.To(autoscalingv2.ScalingPolicySelect(r.Select)),
	}
	for _, p := range r.Policies {
		out.Policies = append(out.Policies, autoscalingv2.HPAScalingPolicy{
			Type: autoscalingv2.HPAScalingPolicyType(p.Kind), Value: p.Value, PeriodSeconds: p.PeriodS,
		})
	}
	return out
}

func run(c *testCase) result {
	ctx := context.Background()
	tol := podautoscaler.KscaleTolerances(c.TolDown, c.TolUp)
	var out result
	switch c.Kind {
	case "ext_value", "ext_average":
		calc := podautoscaler.NewReplicaCalculator(&fakeMetrics{external: c.Series}, lister(externalPods(c.ReadyPods, c.OtherPods)), 0, 0)
		var err error
		if c.Kind == "ext_value" {
			out.Replicas, out.Value, _, err = calc.GetExternalMetricReplicas(c.Spec, c.Target, "m", tol, namespace, &metav1.LabelSelector{}, labels.Everything())
		} else {
			out.Replicas, out.Value, _, err = calc.GetExternalPerPodMetricReplicas(c.Status, c.Target, "m", tol, namespace, &metav1.LabelSelector{})
		}
		if err != nil {
			out.Error = err.Error()
		}
	case "object_value", "object_average":
		calc := podautoscaler.NewReplicaCalculator(&fakeMetrics{object: c.Series[0]}, lister(externalPods(c.ReadyPods, c.OtherPods)), 0, 0)
		ref := &autoscalingv2.CrossVersionObjectReference{Kind: "Service", Name: "svc", APIVersion: "v1"}
		var err error
		if c.Kind == "object_value" {
			out.Replicas, out.Value, _, err = calc.GetObjectMetricReplicas(c.Spec, c.Target, "m", tol, namespace, ref, labels.Everything(), labels.Everything())
		} else {
			out.Replicas, out.Value, _, err = calc.GetObjectPerPodMetricReplicas(c.Status, c.Target, "m", tol, namespace, ref, labels.Everything())
		}
		if err != nil {
			out.Error = err.Error()
		}
	case "pods":
		now := time.Now()
		pods, info := resourcePods(now, c, v1.ResourceMemory)
		calc := podautoscaler.NewReplicaCalculator(&fakeMetrics{pods: info}, lister(pods),
			time.Duration(c.CPUInitS)*time.Second, time.Duration(c.ReadyDelayS)*time.Second)
		var err error
		out.Replicas, out.Value, _, err = calc.GetMetricReplicas(c.Current, c.Target, "m", tol, namespace, labels.Everything(), labels.Everything())
		if err != nil {
			out.Error = err.Error()
		}
	case "resource":
		res := v1.ResourceMemory
		if c.CPU {
			res = v1.ResourceCPU
		}
		now := time.Now()
		pods, info := resourcePods(now, c, res)
		calc := podautoscaler.NewReplicaCalculator(&fakeMetrics{pods: info}, lister(pods),
			time.Duration(c.CPUInitS)*time.Second, time.Duration(c.ReadyDelayS)*time.Second)
		var err error
		if c.Utilization {
			var util int32
			out.Replicas, util, _, _, err = calc.GetResourceReplicas(ctx, c.Current, int32(c.Target), res, tol, namespace, labels.Everything(), c.Container)
			out.Value = int64(util)
		} else {
			out.Replicas, out.Value, _, err = calc.GetRawResourceReplicas(ctx, c.Current, c.Target, res, tol, namespace, labels.Everything(), c.Container)
		}
		if err != nil {
			out.Error = err.Error()
		}
	case "normalize":
		hpa := &autoscalingv2.HorizontalPodAutoscaler{
			ObjectMeta: metav1.ObjectMeta{Name: "hpa", Namespace: namespace},
			Spec:       autoscalingv2.HorizontalPodAutoscalerSpec{MinReplicas: ptr.To(c.Min), MaxReplicas: c.Max},
		}
		if c.Behavior != nil {
			hpa.Spec.Behavior = &autoscalingv2.HorizontalPodAutoscalerBehavior{
				ScaleUp: scalingRules(c.Behavior.Up), ScaleDown: scalingRules(c.Behavior.Down),
			}
		}
		now := time.Now()
		var s podautoscaler.KscaleState
		for _, r := range c.Recs {
			s.Recommendations = append(s.Recommendations, podautoscaler.KscaleRecommendation{Replicas: r.N, Time: ago(now, r.AgeMs)})
		}
		for _, e := range c.UpEvents {
			s.ScaleUp = append(s.ScaleUp, podautoscaler.KscaleScaleEvent{Change: e.N, Time: ago(now, e.AgeMs)})
		}
		for _, e := range c.DownEvents {
			s.ScaleDown = append(s.ScaleDown, podautoscaler.KscaleScaleEvent{Change: e.N, Time: ago(now, e.AgeMs)})
		}
		n := podautoscaler.KscaleNormalize(hpa, time.Duration(c.DownWindowS)*time.Second, s, c.Current, c.Desired, c.Min)
		out.Replicas, out.Stabilized = n.Replicas, n.Stabilized
		out.AbleToScale, out.ScalingLimited = n.AbleToScale, n.ScalingLimited
		for _, r := range n.State.Recommendations {
			out.Recs = append(out.Recs, timed{r.Replicas, ageOf(now, r.Time)})
		}
		for _, e := range n.State.ScaleUp {
			out.UpEvents = append(out.UpEvents, timed{e.Change, ageOf(now, e.Time)})
		}
		for _, e := range n.State.ScaleDown {
			out.DownEvents = append(out.DownEvents, timed{e.Change, ageOf(now, e.Time)})
		}
	default:
		out.Error = "unknown case kind " + c.Kind
	}
	return out
}

func main() {
	var in struct {
		Cases []testCase `json:"cases"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fmt.Fprintln(os.Stderr, "hpa-parity: reading cases:", err)
		os.Exit(2)
	}
	results := make([]result, len(in.Cases))
	for i := range in.Cases {
		results[i] = run(&in.Cases[i])
	}
	if err := json.NewEncoder(os.Stdout).Encode(map[string][]result{"results": results}); err != nil {
		fmt.Fprintln(os.Stderr, "hpa-parity: writing results:", err)
		os.Exit(2)
	}
}
