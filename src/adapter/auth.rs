//! Authentication and authorization as an aggregated API server does them.
//!
//! - kube-apiserver's proxied requests carry its front-proxy client certificate (verified in the
//!   TLS handshake against `requestheader-client-ca-file`); its common name must be one of
//!   `requestheader-allowed-names` (any, when the list is empty), and the user, groups and extra
//!   come from the header names listed there. All of it is read from the ConfigMap
//!   `kube-system/extension-apiserver-authentication` at start and again every minute.
//! - Any other caller must send a bearer token, checked with a TokenReview.
//! - Every authenticated request is authorized with a SubjectAccessReview.
//!
//! Both reviews are cached briefly ([`REVIEW_TTL`]), at most [`MAX_CACHED`] answers each, keyed by
//! a SHA-256 digest only: of the token, and of the user and the parsed request ([`Attributes`]:
//! namespace and metric, or one of the few served discovery paths; never the raw path), so an
//! entry has the same small size whatever a caller sends. An access decision in use is renewed in
//! the background past half its life, so requests do not wait for reviews in steady state; no
//! answer is ever used past its TTL.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use tracing::warn;

use super::types::GROUP;

/// How long a TokenReview or SubjectAccessReview answer is reused.
pub const REVIEW_TTL: Duration = Duration::from_secs(10);
/// Review answers kept at most per cache (each a 32-byte key and the answer: a few MB in all).
/// When full, expired answers are dropped, then everything.
pub const MAX_CACHED: usize = 20_000;

/// The group every authenticated user belongs to.
const AUTHENTICATED: &str = "system:authenticated";

/// The ConfigMap kube-apiserver publishes for aggregated API servers.
pub const AUTH_CONFIGMAP: &str = "kube-system/extension-apiserver-authentication";

/// The request-header settings of the front proxy.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FrontProxy {
    /// PEM bundle of the CA that signs the front-proxy client certificate.
    pub client_ca: String,
    /// Allowed common names; empty means any certificate from the CA.
    pub allowed_names: Vec<String>,
    /// Headers that may carry the user name (first non-empty wins).
    pub username_headers: Vec<String>,
    /// Headers carrying groups (every value).
    pub group_headers: Vec<String>,
    /// Prefixes of headers carrying extra attributes.
    pub extra_prefixes: Vec<String>,
}

/// Why authentication could not be set up or a review failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The ConfigMap could not be read.
    #[error(
        "reading ConfigMap {AUTH_CONFIGMAP} (the ServiceAccount needs the extension-apiserver-authentication-reader Role in kube-system): {}", crate::api_error::human(.0)
    )]
    ConfigMap(Box<kube::Error>),
    /// The ConfigMap lacks the front-proxy settings.
    #[error(
        "ConfigMap {AUTH_CONFIGMAP} has no requestheader-client-ca-file: kube-apiserver runs without --requestheader-client-ca-file, so it cannot proxy to aggregated APIs"
    )]
    NoFrontProxy,
    /// A list field is not a JSON list of strings.
    #[error("ConfigMap {AUTH_CONFIGMAP} key {key}: {message}")]
    Field {
        /// Key.
        key: &'static str,
        /// Parser message.
        message: String,
    },
    /// A review request failed.
    #[error("{kind} failed: {}", crate::api_error::human(.source))]
    Review {
        /// `TokenReview` or `SubjectAccessReview`.
        kind: &'static str,
        /// Cause.
        source: Box<kube::Error>,
    },
}

impl FrontProxy {
    /// Reads the settings from the ConfigMap.
    pub async fn load(client: &kube::Client) -> Result<FrontProxy, AuthError> {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-system");
        let cm = api
            .get("extension-apiserver-authentication")
            .await
            .map_err(|e| AuthError::ConfigMap(Box::new(e)))?;
        FrontProxy::from_data(&cm.data.unwrap_or_default())
    }

    /// Parses the ConfigMap's data.
    pub fn from_data(data: &BTreeMap<String, String>) -> Result<FrontProxy, AuthError> {
        let client_ca = data
            .get("requestheader-client-ca-file")
            .filter(|s| !s.trim().is_empty())
            .ok_or(AuthError::NoFrontProxy)?
            .clone();
        let list = |key: &'static str| -> Result<Vec<String>, AuthError> {
            match data.get(key) {
                None => Ok(Vec::new()),
                Some(text) if text.trim().is_empty() => Ok(Vec::new()),
                Some(text) => serde_json::from_str(text).map_err(|e| AuthError::Field {
                    key,
                    message: e.to_string(),
                }),
            }
        };
        Ok(FrontProxy {
            client_ca,
            allowed_names: list("requestheader-allowed-names")?,
            username_headers: list("requestheader-username-headers")?,
            group_headers: list("requestheader-group-headers")?,
            extra_prefixes: list("requestheader-extra-headers-prefix")?,
        })
    }

    /// The user a proxied request names, when the connection's verified client certificate has
    /// common name `cn`. `Err` carries the reason for a 401.
    pub fn user(&self, cn: &str, headers: &hyper::HeaderMap) -> Result<User, String> {
        if !self.allowed_names.is_empty() && !self.allowed_names.iter().any(|n| n == cn) {
            return Err(format!(
                "client certificate {cn:?} is not an allowed front-proxy name"
            ));
        }
        let name = self
            .username_headers
            .iter()
            .find_map(|h| {
                headers
                    .get(h.as_str())
                    .and_then(|v| v.to_str().ok())
                    .filter(|v| !v.is_empty())
            })
            .ok_or_else(|| "the front-proxy request names no user".to_string())?
            .to_string();
        let mut groups: Vec<String> = self
            .group_headers
            .iter()
            .flat_map(|h| headers.get_all(h.as_str()).iter())
            .filter_map(|v| v.to_str().ok())
            .map(str::to_string)
            .collect();
        // As kube-apiserver's authenticated-group adder does for every authenticated user.
        if !groups.iter().any(|g| g == AUTHENTICATED) {
            groups.push(AUTHENTICATED.to_string());
        }
        let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (k, v) in headers {
            let lower = k.as_str();
            for p in &self.extra_prefixes {
                let p = p.to_ascii_lowercase();
                if let Some(key) = lower.strip_prefix(p.as_str())
                    && let Ok(v) = v.to_str()
                {
                    extra
                        .entry(percent_decode(key))
                        .or_default()
                        .push(v.to_string());
                }
            }
        }
        Ok(User {
            name,
            uid: None,
            groups,
            extra,
        })
    }
}

/// Header names of extra keys are percent-encoded by the front proxy.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct User {
    /// User name.
    pub name: String,
    /// UID, when the token review gave one.
    pub uid: Option<String>,
    /// Groups.
    pub groups: Vec<String>,
    /// Extra attributes.
    pub extra: BTreeMap<String, Vec<String>>,
}

/// What a request asks to do.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Attributes {
    /// Reading a metric: verb `list` (a collection GET) on resource = the metric's name.
    Metric {
        /// Namespace.
        namespace: String,
        /// Metric name.
        metric: String,
    },
    /// A GET of a served path that is not a resource (discovery, OpenAPI): one of a fixed set.
    NonResource(&'static str),
}

impl Attributes {
    /// What the request asks for, for a denial's message.
    pub fn describe(&self) -> String {
        match self {
            Attributes::Metric { namespace, metric } => {
                format!("external metric {metric:?} in namespace {namespace:?}")
            }
            Attributes::NonResource(path) => (*path).to_string(),
        }
    }
}

/// The cache key of an access decision: a digest of the user and the attributes, each field
/// length-prefixed so that no two different requests share an encoding.
fn decision_key(user: &User, attrs: &Attributes) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut field = |bytes: &[u8]| {
        ctx.update(&(bytes.len() as u64).to_le_bytes());
        ctx.update(bytes);
    };
    field(user.name.as_bytes());
    field(user.uid.as_deref().unwrap_or("").as_bytes());
    field(&[u8::from(user.uid.is_some())]);
    field(&(user.groups.len() as u64).to_le_bytes());
    for g in &user.groups {
        field(g.as_bytes());
    }
    field(&(user.extra.len() as u64).to_le_bytes());
    for (k, vs) in &user.extra {
        field(k.as_bytes());
        field(&(vs.len() as u64).to_le_bytes());
        for v in vs {
            field(v.as_bytes());
        }
    }
    match attrs {
        Attributes::Metric { namespace, metric } => {
            field(b"metric");
            field(namespace.as_bytes());
            field(metric.as_bytes());
        }
        Attributes::NonResource(path) => {
            field(b"path");
            field(path.as_bytes());
        }
    }
    to_key(&ctx.finish())
}

fn to_key(digest: &ring::digest::Digest) -> [u8; 32] {
    let mut key = [0u8; 32];
    key.copy_from_slice(digest.as_ref());
    key
}

/// The SHA-256 of `bytes`: the adapter's cache keys (tokens, rule queries).
pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    to_key(&ring::digest::digest(&ring::digest::SHA256, bytes))
}

struct Cached<T> {
    value: T,
    at: Instant,
    refreshing: bool,
}

type Cache<K, T> = Arc<Mutex<HashMap<K, Cached<T>>>>;

/// TokenReview and SubjectAccessReview with brief caches.
pub struct Reviewer {
    client: kube::Client,
    tokens: Cache<[u8; 32], Option<User>>,
    decisions: Cache<[u8; 32], bool>,
}

/// A cached answer younger than [`REVIEW_TTL`], and whether the caller should refresh it ahead
/// of expiry (past half its life, once: the flag is set for the one caller that gets `true`).
fn lookup<K: std::hash::Hash + Eq, T: Clone>(
    map: &Mutex<HashMap<K, Cached<T>>>,
    key: &K,
) -> Option<(T, bool)> {
    let mut map = match map.lock() {
        Ok(m) => m,
        Err(poisoned) => poisoned.into_inner(),
    };
    let c = map.get_mut(key).filter(|c| c.at.elapsed() < REVIEW_TTL)?;
    let refresh = !c.refreshing && c.at.elapsed() >= REVIEW_TTL / 2;
    if refresh {
        c.refreshing = true;
    }
    Some((c.value.clone(), refresh))
}

fn remember<K: std::hash::Hash + Eq, T>(map: &Mutex<HashMap<K, Cached<T>>>, key: K, value: T) {
    let mut map = match map.lock() {
        Ok(m) => m,
        Err(poisoned) => poisoned.into_inner(),
    };
    if map.len() >= MAX_CACHED {
        map.retain(|_, c| c.at.elapsed() < REVIEW_TTL);
        if map.len() >= MAX_CACHED {
            map.clear();
        }
    }
    map.insert(
        key,
        Cached {
            value,
            at: Instant::now(),
            refreshing: false,
        },
    );
}

/// One SubjectAccessReview: may `user` do `attrs`?
async fn review_access(
    client: &kube::Client,
    user: &User,
    attrs: &Attributes,
) -> Result<bool, AuthError> {
    let (resource_attributes, non_resource_attributes) = match attrs {
        Attributes::Metric { namespace, metric } => (
            Some(ResourceAttributes {
                group: Some(GROUP.into()),
                version: Some(super::types::VERSION.into()),
                resource: Some(metric.clone()),
                namespace: Some(namespace.clone()),
                verb: Some("list".into()),
                ..Default::default()
            }),
            None,
        ),
        Attributes::NonResource(path) => (
            None,
            Some(NonResourceAttributes {
                path: Some((*path).to_string()),
                verb: Some("get".into()),
            }),
        ),
    };
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.name.clone()),
            uid: user.uid.clone(),
            groups: Some(user.groups.clone()),
            extra: (!user.extra.is_empty()).then(|| user.extra.clone().into_iter().collect()),
            resource_attributes,
            non_resource_attributes,
        },
        ..Default::default()
    };
    let api: Api<SubjectAccessReview> = Api::all(client.clone());
    let answer = api
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| AuthError::Review {
            kind: "SubjectAccessReview",
            source: Box::new(e),
        })?;
    let allowed = answer.status.is_some_and(|s| s.allowed);
    if !allowed {
        warn!(user = %user.name, attrs = %attrs.describe(), "request denied by SubjectAccessReview");
    }
    Ok(allowed)
}

impl Reviewer {
    /// Reviews through `client` (its identity needs `system:auth-delegator`).
    pub fn new(client: kube::Client) -> Reviewer {
        Reviewer {
            client,
            tokens: Arc::new(Mutex::new(HashMap::new())),
            decisions: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The user a bearer token belongs to, or `None` when the token is not valid.
    pub async fn authenticate(&self, token: &str) -> Result<Option<User>, AuthError> {
        let key = sha256(token.as_bytes());
        if let Some((user, _)) = lookup(&self.tokens, &key) {
            return Ok(user);
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: None,
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Review {
                kind: "TokenReview",
                source: Box::new(e),
            })?;
        let user = answer.status.and_then(|s| {
            if s.authenticated != Some(true) {
                return None;
            }
            let u = s.user?;
            Some(User {
                name: u.username?,
                uid: u.uid,
                groups: u.groups.unwrap_or_default(),
                extra: u.extra.unwrap_or_default().into_iter().collect(),
            })
        });
        remember(&self.tokens, key, user.clone());
        Ok(user)
    }

    /// Whether `user` may do `attrs`. A cached answer is at most [`REVIEW_TTL`] old; past half
    /// of that it is renewed in the background, so a steady caller never waits for a review.
    pub async fn authorize(&self, user: &User, attrs: &Attributes) -> Result<bool, AuthError> {
        let key = decision_key(user, attrs);
        if let Some((allowed, refresh)) = lookup(&self.decisions, &key) {
            if refresh {
                let (client, decisions) = (self.client.clone(), self.decisions.clone());
                let (user, attrs) = (user.clone(), attrs.clone());
                tokio::spawn(async move {
                    match review_access(&client, &user, &attrs).await {
                        Ok(allowed) => remember(&decisions, key, allowed),
                        // The answer expires on time; the next request reviews again.
                        Err(e) => warn!(error = %e, "renewing a SubjectAccessReview failed"),
                    }
                });
            }
            return Ok(allowed);
        }
        let allowed = review_access(&self.client, user, attrs).await?;
        remember(&self.decisions, key, allowed);
        Ok(allowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> FrontProxy {
        FrontProxy::from_data(&BTreeMap::from([
            (
                "requestheader-client-ca-file".to_string(),
                "PEM".to_string(),
            ),
            (
                "requestheader-allowed-names".to_string(),
                r#"["front-proxy-client"]"#.to_string(),
            ),
            (
                "requestheader-username-headers".to_string(),
                r#"["X-Remote-User"]"#.to_string(),
            ),
            (
                "requestheader-group-headers".to_string(),
                r#"["X-Remote-Group"]"#.to_string(),
            ),
            (
                "requestheader-extra-headers-prefix".to_string(),
                r#"["X-Remote-Extra-"]"#.to_string(),
            ),
        ]))
        .unwrap()
    }

    #[test]
    fn front_proxy_user_comes_from_the_listed_headers() {
        let fp = settings();
        let mut h = hyper::HeaderMap::new();
        h.insert("x-remote-user", "alice".parse().unwrap());
        h.append("x-remote-group", "a".parse().unwrap());
        h.append("x-remote-group", "b".parse().unwrap());
        h.insert("x-remote-extra-scopes%2fx", "s".parse().unwrap());
        let u = fp.user("front-proxy-client", &h).unwrap();
        assert_eq!(u.name, "alice");
        assert_eq!(u.groups, vec!["a", "b", "system:authenticated"]);
        assert_eq!(u.extra.get("scopes/x"), Some(&vec!["s".to_string()]));
        assert!(fp.user("someone-else", &h).is_err());
        assert!(
            fp.user("front-proxy-client", &hyper::HeaderMap::new())
                .is_err()
        );
    }

    #[test]
    fn cached_answers_expire_and_are_renewed_once_past_half_their_life() {
        let map: Mutex<HashMap<u8, Cached<bool>>> = Mutex::new(HashMap::new());
        remember(&map, 1, true);
        assert_eq!(lookup(&map, &1), Some((true, false)));
        let age = |d: Duration| {
            if let Some(c) = map.lock().unwrap().get_mut(&1) {
                c.at = Instant::now() - d;
            }
        };
        age(REVIEW_TTL / 2 + Duration::from_millis(10));
        assert_eq!(lookup(&map, &1), Some((true, true)));
        assert_eq!(lookup(&map, &1), Some((true, false)), "only one renewal");
        age(REVIEW_TTL);
        assert_eq!(lookup(&map, &1), None);
        assert_eq!(lookup(&map, &2), None);
    }

    #[test]
    fn decision_keys_are_digests_of_the_parsed_request() {
        let user = |name: &str, groups: &[&str]| User {
            name: name.into(),
            uid: None,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            extra: BTreeMap::new(),
        };
        let metric = |ns: &str, m: &str| Attributes::Metric {
            namespace: ns.into(),
            metric: m.into(),
        };
        let a = decision_key(&user("alice", &["g"]), &metric("ns", "web-rps"));
        assert_eq!(
            a,
            decision_key(&user("alice", &["g"]), &metric("ns", "web-rps"))
        );
        // Moving a byte from one field to the next changes the key.
        assert_ne!(
            a,
            decision_key(&user("alice", &["g"]), &metric("nsw", "eb-rps"))
        );
        assert_ne!(
            a,
            decision_key(&user("alic", &["eg"]), &metric("ns", "web-rps"))
        );
        assert_ne!(
            a,
            decision_key(&user("alice", &["g", ""]), &metric("ns", "web-rps"))
        );
        assert_ne!(
            decision_key(&user("alice", &[]), &Attributes::NonResource("/apis")),
            decision_key(&user("alice", &[]), &Attributes::NonResource("/openapi/v2"))
        );
    }

    #[test]
    fn the_cache_holds_at_most_max_cached_answers() {
        let map: Mutex<HashMap<u32, Cached<bool>>> = Mutex::new(HashMap::new());
        for i in 0..(MAX_CACHED as u32 * 2 + 7) {
            remember(&map, i, true);
            assert!(map.lock().unwrap().len() <= MAX_CACHED);
        }
    }

    #[test]
    fn missing_front_proxy_ca_is_an_error() {
        assert!(matches!(
            FrontProxy::from_data(&BTreeMap::new()),
            Err(AuthError::NoFrontProxy)
        ));
    }
}
