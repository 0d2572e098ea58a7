//! Which Prometheus each policy's queries go to, and the tick's queries grouped by server.
//!
//! A policy without `spec.prometheus` uses the daemon's default (`--prometheus-url`). A policy
//! with one names a URL, headers, a timeout and a Secret in its own namespace (never another
//! namespace's: a policy author cannot borrow credentials they could not read). The Secret is
//! read every tick, so a rotated credential is used at the next evaluation; a client is built
//! once per distinct (namespace, server, Secret version) and reused.
//!
//! Identical queries to the same server are sent once per tick, whichever policies ask. A server
//! that cannot be used (Secret missing, a key unusable, a URL outside the daemon's allow-list)
//! turns each of its queries into an explicit error sample naming the cause, so the policy's
//! fallback applies and its status says why.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::Api;

use super::{QueryBackend, queries_of};
use crate::model::Sample;
use crate::policy::CompiledPolicy;
use crate::policy::compile::PrometheusServer;
use crate::source::prometheus::{BasicAuth, Material, PrometheusConfig, PrometheusSource};

/// A server as the tick groups queries: the daemon's default, or a policy's own in a namespace.
pub type ServerKey = Option<(String, PrometheusServer)>;

/// The samples of one tick: per server, per distinct query.
pub type TickSamples = HashMap<ServerKey, HashMap<String, Sample>>;

/// Unused clients are dropped after this long.
const IDLE: Duration = Duration::from_secs(3600);

struct Cached {
    secret_version: Option<String>,
    source: Arc<PrometheusSource>,
    used: Instant,
}

/// The daemon's default Prometheus plus the policies' own, with their clients cached.
pub struct Servers {
    client: Client,
    default: Arc<dyn QueryBackend>,
    default_timeout: Duration,
    allowed_prefixes: Vec<String>,
    cache: Mutex<HashMap<(String, PrometheusServer), Cached>>,
}

impl Servers {
    /// `default` answers policies without `spec.prometheus`; `allowed_prefixes` (when not
    /// empty) are the only URL prefixes a policy may name.
    pub fn new(
        client: Client,
        default: Arc<dyn QueryBackend>,
        default_timeout: Duration,
        allowed_prefixes: Vec<String>,
    ) -> Servers {
        Servers {
            client,
            default,
            default_timeout,
            allowed_prefixes,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The daemon's default backend.
    pub fn default_backend(&self) -> &Arc<dyn QueryBackend> {
        &self.default
    }

    /// The backend of a policy's queries: its own server or the daemon's default. A server that
    /// cannot be used answers every query with the reason.
    pub async fn backend_for(
        &self,
        namespace: &str,
        policy: &CompiledPolicy,
    ) -> Arc<dyn QueryBackend> {
        match &policy.prometheus {
            None => self.default.clone(),
            Some(server) => match self.source(namespace, server).await {
                Ok(source) => source,
                Err(message) => Arc::new(super::Unavailable(message)),
            },
        }
    }

    /// The server a policy's queries go to.
    pub fn key_of(namespace: &str, policy: &CompiledPolicy) -> ServerKey {
        policy
            .prometheus
            .clone()
            .map(|server| (namespace.to_string(), server))
    }

    /// Runs every distinct query of `policies` (namespace, compiled policy) once per server.
    pub async fn query<'a>(
        &self,
        policies: impl IntoIterator<Item = (&'a str, &'a CompiledPolicy)>,
    ) -> TickSamples {
        let mut groups: HashMap<ServerKey, Vec<String>> = HashMap::new();
        let mut seen: HashSet<(ServerKey, &str)> = HashSet::new();
        for (namespace, policy) in policies {
            let key = Self::key_of(namespace, policy);
            for q in queries_of(policy) {
                if seen.insert((key.clone(), q)) {
                    groups.entry(key.clone()).or_default().push(q.to_string());
                }
            }
        }
        let results = futures::future::join_all(groups.into_iter().map(|(key, queries)| async {
            let samples = match &key {
                None => self.default.query_all(queries).await,
                Some((namespace, server)) => match self.source(namespace, server).await {
                    Ok(source) => QueryBackend::query_all(source.as_ref(), queries).await,
                    Err(message) => super::Unavailable(message).query_all(queries).await,
                },
            };
            (key, samples)
        }))
        .await;
        self.prune();
        results.into_iter().collect()
    }

    fn prune(&self) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.retain(|_, c| c.used.elapsed() < IDLE);
        }
    }

    /// The client for a policy's server, built from its Secret's current version.
    async fn source(
        &self,
        namespace: &str,
        server: &PrometheusServer,
    ) -> Result<Arc<PrometheusSource>, String> {
        if !self.allowed_prefixes.is_empty()
            && !self
                .allowed_prefixes
                .iter()
                .any(|p| server.url.starts_with(p.as_str()))
        {
            return Err(format!(
                "spec.prometheus.url {:?} is not allowed by the daemon's --policy-prometheus-allowed-prefix ({})",
                server.url,
                self.allowed_prefixes.join(", ")
            ));
        }
        let secret = match &server.secret {
            None => None,
            Some(name) => {
                let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
                let secret = api.get(name).await.map_err(|e| {
                    format!("spec.prometheus.secretRef: reading Secret {namespace}/{name}: {e}")
                })?;
                Some(secret)
            }
        };
        let version = secret
            .as_ref()
            .and_then(|s| s.metadata.resource_version.clone());
        let key = (namespace.to_string(), server.clone());
        if let Ok(mut cache) = self.cache.lock()
            && let Some(c) = cache.get_mut(&key)
            && c.secret_version == version
        {
            c.used = Instant::now();
            return Ok(c.source.clone());
        }
        let config = config_for(namespace, server, secret.as_ref(), self.default_timeout)?;
        let source = Arc::new(PrometheusSource::new(&config).map_err(|e| {
            format!(
                "spec.prometheus: {}",
                e.to_string().replace("--prometheus-url ", "url ")
            )
        })?);
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(
                key,
                Cached {
                    secret_version: version,
                    source: source.clone(),
                    used: Instant::now(),
                },
            );
        }
        Ok(source)
    }
}

/// The client settings for a policy's server and its Secret (keys `token`, `username` and
/// `password`, `ca.crt`, `tls.crt` and `tls.key`). Errors name the Secret and the key.
pub fn config_for(
    namespace: &str,
    server: &PrometheusServer,
    secret: Option<&Secret>,
    default_timeout: Duration,
) -> Result<PrometheusConfig, String> {
    let empty = BTreeMap::new();
    let data = secret.and_then(|s| s.data.as_ref()).unwrap_or(&empty);
    let name = server.secret.as_deref().unwrap_or_default();
    let key = |k: &str| -> Option<Material> {
        data.get(k).map(|v| Material::Bytes {
            origin: format!("spec.prometheus.secretRef: Secret {namespace}/{name} key {k}"),
            data: v.0.clone(),
        })
    };
    let text = |k: &str| -> Result<Option<String>, String> {
        data.get(k)
            .map(|v| {
                String::from_utf8(v.0.clone()).map_err(|_| {
                    format!(
                        "spec.prometheus.secretRef: Secret {namespace}/{name} key {k}: not UTF-8 text"
                    )
                })
            })
            .transpose()
    };
    let basic_auth = match (text("username")?, text("password")?) {
        (Some(user), Some(password)) => Some(BasicAuth { user, password }),
        (None, None) => None,
        _ => {
            return Err(format!(
                "spec.prometheus.secretRef: Secret {namespace}/{name} must hold both username and password, or neither"
            ));
        }
    };
    if secret.is_some() && data.is_empty() {
        return Err(format!(
            "spec.prometheus.secretRef: Secret {namespace}/{name} holds no data (expected keys token, username/password, ca.crt, tls.crt/tls.key)"
        ));
    }
    Ok(PrometheusConfig {
        url: server.url.clone(),
        timeout: server.timeout.unwrap_or(default_timeout),
        bearer_token: key("token"),
        basic_auth,
        ca: key("ca.crt"),
        client_cert: key("tls.crt"),
        client_key: key("tls.key"),
        headers: server.headers.clone(),
        ..PrometheusConfig::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn server(secret: Option<&str>) -> PrometheusServer {
        PrometheusServer {
            url: "https://thanos.example:9090".into(),
            secret: secret.map(str::to_string),
            headers: vec![("X-Scope-OrgID".into(), "team-a".into())],
            timeout: None,
        }
    }

    fn secret(pairs: &[(&str, &str)]) -> Secret {
        Secret {
            data: Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn secret_keys_become_credentials() {
        let c = config_for(
            "team-a",
            &server(Some("prom")),
            Some(&secret(&[("token", "abc"), ("ca.crt", "PEM")])),
            Duration::from_secs(7),
        )
        .unwrap();
        assert_eq!(c.timeout, Duration::from_secs(7));
        assert!(
            matches!(&c.bearer_token, Some(Material::Bytes { origin, data })
            if origin == "spec.prometheus.secretRef: Secret team-a/prom key token" && data == b"abc")
        );
        assert!(c.ca.is_some() && c.client_cert.is_none() && c.basic_auth.is_none());
        assert_eq!(c.headers, vec![("X-Scope-OrgID".into(), "team-a".into())]);

        let c = config_for(
            "team-a",
            &server(Some("prom")),
            Some(&secret(&[("username", "u"), ("password", "p")])),
            Duration::from_secs(7),
        )
        .unwrap();
        assert_eq!(c.basic_auth.map(|b| b.user), Some("u".to_string()));
    }

    #[test]
    fn unusable_secrets_are_errors_naming_the_secret() {
        let e = config_for(
            "ns",
            &server(Some("prom")),
            Some(&secret(&[("username", "u")])),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(
            e.contains("Secret ns/prom") && e.contains("username and password"),
            "{e}"
        );
        let e = config_for(
            "ns",
            &server(Some("prom")),
            Some(&secret(&[])),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(e.contains("holds no data"), "{e}");
        // A bad CA in the Secret: the source's error names the Secret key.
        let c = config_for(
            "ns",
            &server(Some("prom")),
            Some(&secret(&[("ca.crt", "not pem")])),
            Duration::from_secs(1),
        )
        .unwrap();
        let e = PrometheusSource::new(&c).unwrap_err().to_string();
        assert!(
            e.starts_with("spec.prometheus.secretRef: Secret ns/prom key ca.crt: no PEM"),
            "{e}"
        );
    }
}
