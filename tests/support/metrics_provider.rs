//! A small custom and external metrics provider over HTTPS for the test environment, registered
//! as `v1beta2.custom.metrics.k8s.io` and `v1beta1.external.metrics.k8s.io`, so that the real
//! HPA controller and kscale read the same values through kube-apiserver.
//!
//! It serves discovery and:
//! - **pods metrics** (`namespaces/NS/pods/*/METRIC?labelSelector=...`): a total set with
//!   [`MetricsProvider::set_pods_total`] spread evenly over the pods the selector matches
//!   (listed from the apiserver at each request, as a real adapter's pods are the cluster's), so
//!   a load shared by the pods has a replica count where it settles;
//! - **object metrics** (`namespaces/NS/RESOURCE/NAME/METRIC`), set with
//!   [`MetricsProvider::set_object`];
//! - **external metrics** (`namespaces/NS/METRIC`), one or more series each, set with
//!   [`MetricsProvider::set_external`].
//!
//! Unknown metrics get a 404 `Status`. Every request target is recorded with the caller the
//! aggregator names (`X-Remote-User`). Values are stamped with the time of the request.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

use crate::upstream::{https_listener, lock, reply, serve_https, status, stop_server};

const CUSTOM: &str = "/apis/custom.metrics.k8s.io/v1beta2";
const EXTERNAL: &str = "/apis/external.metrics.k8s.io/v1beta1";

#[derive(Default)]
struct Values {
    /// Pods metric name → total in milli-units, shared by the selected pods.
    pods: BTreeMap<String, i64>,
    /// (resource, object name, metric) → quantity.
    objects: BTreeMap<(String, String, String), String>,
    /// External metric name → one quantity per series.
    external: BTreeMap<String, Vec<String>>,
}

struct State {
    kubeconfig: PathBuf,
    values: Mutex<Values>,
    seen: Mutex<Vec<(String, Option<String>)>>,
    connections: AtomicUsize,
    stop: AtomicBool,
}

/// A running provider; stopped on drop.
pub struct MetricsProvider {
    /// Where it listens (127.0.0.1).
    pub addr: SocketAddr,
    /// The CA of its serving certificate (the APIServices' `caBundle`).
    pub ca_pem: String,
    state: Arc<State>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl MetricsProvider {
    /// Starts serving on its own thread and runtime with a certificate for `names` (the
    /// `<service>.<namespace>.svc` names the aggregator verifies) and loopback; pods are listed
    /// with `kubeconfig`.
    pub fn start(kubeconfig: &Path, names: Vec<String>) -> MetricsProvider {
        let (listener, acceptor, ca_pem) = https_listener(names);
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State {
            kubeconfig: kubeconfig.to_path_buf(),
            values: Mutex::new(Values::default()),
            seen: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let served = state.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let client = crate::support::client_from_kubeconfig(&served.kubeconfig)
                    .await
                    .expect("provider client");
                let flags = served.clone();
                serve_https(
                    listener,
                    acceptor,
                    (&flags.stop, &flags.connections),
                    move |req| {
                        let state = served.clone();
                        let client = client.clone();
                        async move { answer(&state, &client, req).await }
                    },
                )
                .await
            });
        });
        MetricsProvider {
            addr,
            ca_pem,
            state,
            thread: Mutex::new(Some(thread)),
        }
    }

    /// Serves pods metric `metric` as `total_milli` spread evenly over the selected pods (each
    /// pod's share truncated to a milli-unit).
    pub fn set_pods_total(&self, metric: &str, total_milli: i64) {
        lock(&self.state.values)
            .pods
            .insert(metric.into(), total_milli);
    }

    /// Serves object metric `metric` of `resource`/`name` (any namespace) as `value`.
    pub fn set_object(&self, resource: &str, name: &str, metric: &str, value: &str) {
        lock(&self.state.values)
            .objects
            .insert((resource.into(), name.into(), metric.into()), value.into());
    }

    /// Serves external metric `metric` (any namespace) as these series.
    pub fn set_external(&self, metric: &str, series: &[&str]) {
        lock(&self.state.values).external.insert(
            metric.into(),
            series.iter().map(|s| (*s).to_string()).collect(),
        );
    }

    /// Every request target received so far, with its `X-Remote-User`.
    pub fn seen(&self) -> Vec<(String, Option<String>)> {
        lock(&self.state.seen).clone()
    }

    /// Closes the listener and every connection, and waits until they are closed.
    pub fn stop(&self) {
        stop_server(self.addr, &self.state.stop, &self.thread);
    }
}

impl Drop for MetricsProvider {
    fn drop(&mut self) {
        self.stop();
    }
}

fn json(value: &serde_json::Value) -> Response<Full<Bytes>> {
    reply(200, "application/json", value.to_string().into_bytes())
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The value of query parameter `key`, percent-decoded.
fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| decode(v))
    })
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => out.push(b),
                    Err(_) => out.extend_from_slice(&bytes[i..i + 3]),
                }
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn resource_list(group_version: &str, names: Vec<String>) -> Response<Full<Bytes>> {
    let resources: Vec<serde_json::Value> = names
        .into_iter()
        .map(|n| {
            serde_json::json!({"name": n, "singularName": "", "namespaced": true,
                "kind": "MetricValueList", "verbs": ["get"]})
        })
        .collect();
    json(
        &serde_json::json!({"kind": "APIResourceList", "apiVersion": "v1",
        "groupVersion": group_version, "resources": resources}),
    )
}

fn metric_value(kind: &str, name: &str, metric: &str, value: &str) -> serde_json::Value {
    serde_json::json!({
        "describedObject": {"kind": kind, "name": name, "apiVersion": "v1"},
        "metric": {"name": metric},
        "timestamp": now(),
        "windowSeconds": 30,
        "value": value,
    })
}

fn value_list(items: Vec<serde_json::Value>) -> Response<Full<Bytes>> {
    json(&serde_json::json!({"kind": "MetricValueList",
        "apiVersion": "custom.metrics.k8s.io/v1beta2", "metadata": {}, "items": items}))
}

async fn answer(
    state: &State,
    client: &kube::Client,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let user = req
        .headers()
        .get("x-remote-user")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    lock(&state.seen).push((
        req.uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default(),
        user,
    ));
    let (pods_totals, objects, external) = {
        let v = lock(&state.values);
        (v.pods.clone(), v.objects.clone(), v.external.clone())
    };
    if path == CUSTOM {
        let mut names: Vec<String> = pods_totals.keys().map(|m| format!("pods/{m}")).collect();
        names.extend(objects.keys().map(|(r, _, m)| format!("{r}/{m}")));
        return resource_list("custom.metrics.k8s.io/v1beta2", names);
    }
    if path == EXTERNAL {
        return resource_list(
            "external.metrics.k8s.io/v1beta1",
            external.keys().cloned().collect(),
        );
    }
    if let Some(rest) = path
        .strip_prefix(EXTERNAL)
        .and_then(|r| r.strip_prefix("/namespaces/"))
    {
        let metric = rest
            .split_once('/')
            .map(|(_, m)| decode(m))
            .unwrap_or_default();
        return match external.get(&metric) {
            Some(series) => {
                let items: Vec<serde_json::Value> = series
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        serde_json::json!({"metricName": metric,
                            "metricLabels": {"series": i.to_string()},
                            "timestamp": now(), "value": v})
                    })
                    .collect();
                json(&serde_json::json!({"kind": "ExternalMetricValueList",
                    "apiVersion": "external.metrics.k8s.io/v1beta1", "metadata": {},
                    "items": items}))
            }
            None => status(404, &format!("no external metric {metric:?}")),
        };
    }
    let Some(rest) = path
        .strip_prefix(CUSTOM)
        .and_then(|r| r.strip_prefix("/namespaces/"))
    else {
        return status(404, &format!("nothing at {path}"));
    };
    let segments: Vec<String> = rest.split('/').map(decode).collect();
    match segments.as_slice() {
        [ns, pods, star, metric] if pods == "pods" && star == "*" => {
            let Some(total) = pods_totals.get(metric) else {
                return status(404, &format!("no pods metric {metric:?}"));
            };
            let selector = query_param(&query, "labelSelector").unwrap_or_default();
            let listed = Api::<Pod>::namespaced(client.clone(), ns)
                .list(&ListParams::default().labels(&selector))
                .await;
            let Ok(listed) = listed else {
                return status(503, "listing the pods failed");
            };
            let names: Vec<String> = listed
                .items
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter_map(|p| p.metadata.name.clone())
                .collect();
            let share = if names.is_empty() {
                0
            } else {
                total / names.len() as i64
            };
            value_list(
                names
                    .iter()
                    .map(|n| metric_value("Pod", n, metric, &format!("{share}m")))
                    .collect(),
            )
        }
        [_, resource, name, metric] => {
            let resource = resource.split('.').next().unwrap_or_default().to_string();
            match objects.get(&(resource.clone(), name.clone(), metric.clone())) {
                Some(v) => value_list(vec![metric_value(&resource, name, metric, v)]),
                None => status(404, &format!("no metric {metric:?} of {resource}/{name}")),
            }
        }
        _ => status(404, &format!("nothing at {path}")),
    }
}
