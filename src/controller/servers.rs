//! Which Prometheus each policy's queries go to, and the tick's queries grouped by server.
//!
//! A policy without `spec.prometheus` uses the daemon's default (`--prometheus-url`). A policy
//! with one names a URL, headers, a timeout and a Secret in its own namespace (never another
//! namespace's: a policy author cannot borrow credentials they could not read). The Secret is
//! read every tick, so a rotated credential is used at the next evaluation; a client is built
//! once per distinct (namespace, server, Secret version) and reused.
//!
//! Identical queries to the same server are sent once per tick, whichever policies ask
//! ([`Servers::groups`]). Each server's group runs under its own deadline, the server's timeout
//! ([`Servers::query_server`]): a server that is slow, or accepts and never answers, turns its
//! late queries into error samples of its own policies and delays nobody else. A server that
//! cannot be used (Secret missing or not labelled for kscale, a key unusable, a URL outside the
//! daemon's allow-list) turns each of its queries into an explicit error sample naming the
//! cause, so the policy's fallback applies and its status says why.
//!
//! # What a policy may point at
//!
//! - `--policy-prometheus-allowed-prefix` entries are parsed URLs ([`AllowedPrefix`]): a policy's
//!   URL must have the same scheme, host and port, and a path that starts with the entry's path
//!   segment by segment (`http://prometheus.monitoring` admits neither
//!   `http://prometheus.monitoring.example.org` nor `http://prometheus.monitoring:8080`).
//! - A Secret is used only if it carries the label [`CREDENTIALS_LABEL`]`: "true"`: only someone
//!   who may write a Secret can label it, so a policy author cannot make kscale send a Secret
//!   they cannot read (a ServiceAccount token, say). Without it no request is sent at all.
//! - Redirects are never followed, and no answer's text reaches a status (see
//!   [`crate::source::prometheus`]).

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
use crate::source::prometheus::{
    AnswerLimits, BasicAuth, Material, PrometheusConfig, PrometheusSource,
};

/// The label a Secret must carry, with the value `"true"`, to be used as a policy's Prometheus
/// credentials (`spec.prometheus.secretRef`).
pub const CREDENTIALS_LABEL: &str = "kscale.dev/prometheus-credentials";

/// A server's queries get this much longer than its timeout before the group is cut off as a
/// whole (reading the Secret and building the client happen inside the group too).
const GROUP_GRACE: Duration = Duration::from_secs(1);

/// One entry of `--policy-prometheus-allowed-prefix`, parsed: scheme, host, port and the path
/// segments a policy's `spec.prometheus.url` must start with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedPrefix {
    text: String,
    scheme: String,
    host: String,
    port: u16,
    segments: Vec<String>,
}

/// The flag whose entries [`AllowedPrefix::parse`] reads.
pub const ALLOWED_PREFIX_FLAG: &str = "--policy-prometheus-allowed-prefix";

/// `(scheme, host, port, path segments)` of an http(s) URL without credentials, query or
/// fragment; the path is normalized by the URL parser (dot segments removed) and a trailing `/`
/// dropped.
fn url_parts(text: &str) -> Result<(String, String, u16, Vec<String>), String> {
    if let Some(fix) = crate::policy::compile::missing_scheme(text) {
        return Err(fix);
    }
    let url = reqwest::Url::parse(text).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("scheme {:?} is not http or https", url.scheme()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("must not carry a query or a fragment".into());
    }
    let host = match url.host() {
        Some(h) => h.to_string(),
        None => return Err("has no host".into()),
    };
    let port = url
        .port_or_known_default()
        .ok_or_else(|| "has no port".to_string())?;
    let segments = url
        .path_segments()
        .map(|s| s.filter(|p| !p.is_empty()).map(str::to_string).collect())
        .unwrap_or_default();
    Ok((url.scheme().to_string(), host, port, segments))
}

impl AllowedPrefix {
    /// Parses an entry; the error names the flag and the entry.
    pub fn parse(text: &str) -> Result<AllowedPrefix, String> {
        let (scheme, host, port, segments) =
            url_parts(text).map_err(|e| format!("{ALLOWED_PREFIX_FLAG} {text:?}: {e}"))?;
        Ok(AllowedPrefix {
            text: text.to_string(),
            scheme,
            host,
            port,
            segments,
        })
    }

    /// Parses every entry (empty ones, from a trailing comma say, are skipped).
    pub fn parse_all(entries: &[String]) -> Result<Vec<AllowedPrefix>, String> {
        entries
            .iter()
            .map(|e| e.trim())
            .filter(|e| !e.is_empty())
            .map(AllowedPrefix::parse)
            .collect()
    }

    /// Whether `url` has this entry's scheme, host and port, and a path starting with its
    /// segments. A URL that does not parse is never admitted.
    pub fn admits(&self, url: &str) -> bool {
        url_parts(url).is_ok_and(|(scheme, host, port, segments)| {
            scheme == self.scheme
                && host == self.host
                && port == self.port
                && segments.starts_with(&self.segments)
        })
    }

    /// The entry as given.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

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
    allowed_prefixes: Vec<AllowedPrefix>,
    limits: AnswerLimits,
    cache: Mutex<HashMap<(String, PrometheusServer), Cached>>,
}

impl Servers {
    /// `default` answers policies without `spec.prometheus`; `allowed_prefixes` (when not
    /// empty) are the only URL prefixes a policy may name.
    pub fn new(
        client: Client,
        default: Arc<dyn QueryBackend>,
        default_timeout: Duration,
        allowed_prefixes: Vec<AllowedPrefix>,
    ) -> Servers {
        Servers {
            client,
            default,
            default_timeout,
            allowed_prefixes,
            limits: AnswerLimits::default(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The caps on the answers of the policies' own servers (the daemon's flags).
    pub fn with_limits(mut self, limits: AnswerLimits) -> Servers {
        self.limits = limits;
        self
    }

    /// The deadline of a server's group of queries in one tick: its timeout (the policy's
    /// `spec.prometheus.timeout` or the daemon's `--prometheus-timeout`).
    pub fn timeout_of(&self, key: &ServerKey) -> Duration {
        key.as_ref()
            .and_then(|(_, server)| server.timeout)
            .unwrap_or(self.default_timeout)
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

    /// Every distinct query of `policies` (namespace, compiled policy), grouped by server in the
    /// order the servers first appear: each (server, query) pair once.
    pub fn groups<'a>(
        policies: impl IntoIterator<Item = (&'a str, &'a CompiledPolicy)>,
    ) -> Vec<(ServerKey, Vec<String>)> {
        let mut groups: Vec<(ServerKey, Vec<String>)> = Vec::new();
        let mut index: HashMap<ServerKey, usize> = HashMap::new();
        let mut seen: HashSet<(ServerKey, &str)> = HashSet::new();
        for (namespace, policy) in policies {
            let key = Self::key_of(namespace, policy);
            for q in queries_of(policy) {
                if seen.insert((key.clone(), q)) {
                    let i = *index.entry(key.clone()).or_insert_with(|| {
                        groups.push((key.clone(), Vec::new()));
                        groups.len() - 1
                    });
                    groups[i].1.push(q.to_string());
                }
            }
        }
        groups
    }

    /// Runs one server's queries under the server's own deadline ([`Self::timeout_of`], plus a
    /// second for its Secret and client): a query still unanswered then is an error sample
    /// saying so, for this server's policies only.
    pub async fn query_server(
        &self,
        key: &ServerKey,
        queries: Vec<String>,
    ) -> HashMap<String, Sample> {
        let timeout = self.timeout_of(key);
        let all = queries.clone();
        let run = async {
            match key {
                None => self.default.query_all(queries).await,
                Some((namespace, server)) => match self.source(namespace, server).await {
                    Ok(source) => QueryBackend::query_all(source.as_ref(), queries).await,
                    Err(message) => super::Unavailable(message).query_all(queries).await,
                },
            }
        };
        let setting = match key {
            Some((_, server)) if server.timeout.is_some() => "spec.prometheus.timeout",
            _ => "--prometheus-timeout",
        };
        let mut samples = tokio::time::timeout(timeout + GROUP_GRACE, run)
            .await
            .unwrap_or_default();
        for q in all {
            samples.entry(q).or_insert_with(|| Sample::Error {
                message: format!(
                    "no answer within the server's {timeout:?} deadline for this evaluation ({setting})"
                ),
            });
        }
        self.prune();
        samples
    }

    /// Runs every distinct query of `policies` once per server, the servers concurrently, each
    /// under its own deadline ([`Self::query_server`]).
    pub async fn query<'a>(
        &self,
        policies: impl IntoIterator<Item = (&'a str, &'a CompiledPolicy)>,
    ) -> TickSamples {
        let groups = Self::groups(policies);
        futures::future::join_all(groups.into_iter().map(|(key, queries)| async move {
            let samples = self.query_server(&key, queries).await;
            (key, samples)
        }))
        .await
        .into_iter()
        .collect()
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
            && !self.allowed_prefixes.iter().any(|p| p.admits(&server.url))
        {
            let list: Vec<&str> = self
                .allowed_prefixes
                .iter()
                .map(AllowedPrefix::as_str)
                .collect();
            return Err(format!(
                "spec.prometheus.url {:?} is not allowed by the daemon's {ALLOWED_PREFIX_FLAG} ({}): the scheme, host and port must match an entry and the path must start with its path",
                server.url,
                list.join(", ")
            ));
        }
        let secret = match &server.secret {
            None => None,
            Some(name) => {
                let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
                let secret = api.get(name).await.map_err(|e| {
                    format!("spec.prometheus.secretRef: reading Secret {namespace}/{name}: {e}")
                })?;
                check_opt_in(namespace, name, &secret)?;
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
        let mut config = config_for(namespace, server, secret.as_ref(), self.default_timeout)?;
        config.limits = self.limits;
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

/// A Secret is used as credentials only when it opts in with [`CREDENTIALS_LABEL`]` = "true"`;
/// the error names the Secret and the label, and nothing is sent.
pub fn check_opt_in(namespace: &str, name: &str, secret: &Secret) -> Result<(), String> {
    let labelled = secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(CREDENTIALS_LABEL))
        .is_some_and(|v| v == "true");
    if labelled {
        Ok(())
    } else {
        Err(format!(
            "spec.prometheus.secretRef: Secret {namespace}/{name} lacks the label {CREDENTIALS_LABEL}: \"true\"; kscale uses only Secrets labelled for it (whoever may write the Secret adds the label), so no query was sent"
        ))
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
        url_setting: "spec.prometheus.url".into(),
        timeout_setting: if server.timeout.is_some() {
            "spec.prometheus.timeout"
        } else {
            "--prometheus-timeout"
        },
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

    #[test]
    fn allowed_prefixes_compare_scheme_host_port_and_path_segments() {
        let p = AllowedPrefix::parse("http://prometheus.monitoring").unwrap();
        assert!(p.admits("http://prometheus.monitoring"));
        assert!(p.admits("http://prometheus.monitoring/"));
        assert!(p.admits("http://prometheus.monitoring:80/any/path"));
        assert!(
            p.admits("http://PROMETHEUS.monitoring"),
            "hosts are case-insensitive"
        );
        // The string-prefix escapes the old check let through.
        assert!(!p.admits("http://prometheus.monitoring.example.org"));
        assert!(!p.admits("http://prometheus.monitoring.example.org:9090/api"));
        assert!(!p.admits("http://prometheus.monitoringx"));
        assert!(
            !p.admits("http://prometheus.monitoring:9090"),
            "another port"
        );
        assert!(!p.admits("https://prometheus.monitoring"), "another scheme");
        assert!(!p.admits("http://prometheus.monitoring@evil.example"));
        assert!(!p.admits("http://evil.example/?prometheus.monitoring"));
        assert!(!p.admits("not a url"));

        let p = AllowedPrefix::parse("https://thanos.example:9443/tenant-a/").unwrap();
        assert!(p.admits("https://thanos.example:9443/tenant-a"));
        assert!(p.admits("https://thanos.example:9443/tenant-a/api"));
        assert!(
            !p.admits("https://thanos.example:9443/tenant-ab"),
            "segment-aware"
        );
        assert!(!p.admits("https://thanos.example:9443/tenant-a-evil/x"));
        assert!(!p.admits("https://thanos.example:9443/"));
        assert!(
            !p.admits("https://thanos.example:9443/tenant-a/../tenant-b"),
            "dot segments are resolved before comparing"
        );
        assert!(!p.admits("https://thanos.example:9443/tenant-a/%2e%2e/tenant-b"));
        assert!(
            !p.admits("https://thanos.example/tenant-a"),
            "port 443 is not 9443"
        );

        // Default ports are the scheme's.
        let p = AllowedPrefix::parse("https://prom.example").unwrap();
        assert!(p.admits("https://prom.example:443/x"));
        let p = AllowedPrefix::parse("http://127.0.0.1:9090").unwrap();
        assert!(p.admits("http://127.0.0.1:9090"));
        assert!(!p.admits("http://127.0.0.10:9090"));
        assert!(!p.admits("http://127.0.0.1:90900"));

        for (bad, why) in [
            (
                "prometheus.monitoring",
                "has no scheme; write \"http://prometheus.monitoring\"",
            ),
            ("http://", "not a URL"),
            ("ftp://x", "scheme"),
            ("http://u:p@x", "credentials"),
            ("http://x/?a=b", "query"),
        ] {
            let e = AllowedPrefix::parse(bad).unwrap_err();
            assert!(e.starts_with("--policy-prometheus-allowed-prefix"), "{e}");
            assert!(e.contains(why), "{e}");
        }
        let list = AllowedPrefix::parse_all(&["http://a:1".into(), " ".into()]).unwrap();
        assert_eq!(list.len(), 1);
    }

    #[test]
    fn a_secret_is_used_only_with_the_opt_in_label() {
        let mut s = secret(&[("token", "abc")]);
        let e = check_opt_in("ns", "legacy-token", &s).unwrap_err();
        assert!(e.contains("Secret ns/legacy-token"), "{e}");
        assert!(e.contains("kscale.dev/prometheus-credentials"), "{e}");
        s.metadata.labels = Some([(CREDENTIALS_LABEL.to_string(), "false".to_string())].into());
        assert!(check_opt_in("ns", "legacy-token", &s).is_err());
        s.metadata.labels = Some([(CREDENTIALS_LABEL.to_string(), "true".to_string())].into());
        assert!(check_opt_in("ns", "legacy-token", &s).is_ok());
    }

    #[test]
    fn groups_hold_each_query_once_per_server() {
        let p: crate::crd::ScalingPolicy = serde_yaml::from_str(
            "apiVersion: kscale.dev/v1alpha1\nkind: ScalingPolicy\nmetadata: {name: p, namespace: n}\nspec:\n  targetRef: {kind: Deployment, name: d}\n  maxReplicas: 3\n  metrics:\n  - {name: a, prometheus: {query: q1}, target: {type: Value, value: '1'}}\n  - {name: b, prometheus: {query: q2}, target: {type: Value, value: '1'}}\n",
        )
        .unwrap();
        let mut own = p.clone();
        own.spec.prometheus = Some(crate::crd::PrometheusServer {
            url: "http://other:9090".into(),
            secret_ref: None,
            headers: Vec::new(),
            timeout: Some("2s".into()),
        });
        let a = CompiledPolicy::from_resource(&p).unwrap();
        let b = CompiledPolicy::from_resource(&own).unwrap();
        let groups = Servers::groups([("n", &a), ("n", &a), ("n", &b), ("m", &b)]);
        assert_eq!(groups.len(), 3, "{groups:?}");
        assert_eq!(groups[0].0, None);
        assert_eq!(groups[0].1, vec!["q1".to_string(), "q2".to_string()]);
        assert_eq!(groups[1].0.as_ref().map(|k| k.0.as_str()), Some("n"));
        assert_eq!(groups[2].0.as_ref().map(|k| k.0.as_str()), Some("m"));
    }
}
