//! The adapter's TLS: a serving certificate from files (a mounted Secret) or self-generated with
//! rcgen, and client certificates verified against the front-proxy CA (optional: callers without
//! a certificate authenticate with a bearer token instead).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read or parsed.
    #[error("{flag} {path}: {message}")]
    File {
        /// The flag naming the file.
        flag: &'static str,
        /// File.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Generating the self-signed certificate failed.
    #[error("generating a self-signed serving certificate for {names:?}: {message}")]
    Generate {
        /// The certificate's names.
        names: Vec<String>,
        /// Cause.
        message: String,
    },
    /// The front-proxy CA bundle is unusable.
    #[error(
        "the front-proxy CA (kube-system/extension-apiserver-authentication requestheader-client-ca-file): {0}"
    )]
    ClientCa(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// A serving certificate chain and its key.
pub struct ServingCert {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The key.
    pub key: PrivateKeyDer<'static>,
    /// The leaf as PEM (for an APIService `caBundle` when self-signed).
    pub pem: String,
}

impl Clone for ServingCert {
    fn clone(&self) -> ServingCert {
        ServingCert {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            pem: self.pem.clone(),
        }
    }
}

/// Reads a PEM certificate chain and key.
pub fn from_files(cert: &Path, key: &Path) -> Result<ServingCert, TlsError> {
    let read = |flag: &'static str, path: &Path| {
        std::fs::read(path).map_err(|e| TlsError::File {
            flag,
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    };
    let cert_pem = read("--external-metrics-tls-cert-file", cert)?;
    let key_pem = read("--external-metrics-tls-key-file", key)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::File {
            flag: "--external-metrics-tls-cert-file",
            path: cert.to_path_buf(),
            message: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::File {
            flag: "--external-metrics-tls-cert-file",
            path: cert.to_path_buf(),
            message: "no CERTIFICATE block".into(),
        });
    }
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::File {
        flag: "--external-metrics-tls-key-file",
        path: key.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(ServingCert {
        chain,
        key: key_der,
        pem: String::from_utf8_lossy(&cert_pem).into_owned(),
    })
}

/// A self-signed certificate for `names` (DNS names or IP addresses).
pub fn self_signed(names: &[String]) -> Result<ServingCert, TlsError> {
    let generated =
        rcgen::generate_simple_self_signed(names.to_vec()).map_err(|e| TlsError::Generate {
            names: names.to_vec(),
            message: e.to_string(),
        })?;
    let key = PrivateKeyDer::try_from(generated.signing_key.serialize_der()).map_err(|e| {
        TlsError::Generate {
            names: names.to_vec(),
            message: e.to_string(),
        }
    })?;
    Ok(ServingCert {
        pem: generated.cert.pem(),
        chain: vec![generated.cert.der().clone()],
        key,
    })
}

/// The server configuration: `cert` served, client certificates verified against `client_ca`
/// (PEM) when one is given, and optional.
pub fn server_config(
    cert: ServingCert,
    client_ca: Option<&str>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match client_ca {
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let der = der.map_err(|e| TlsError::ClientCa(e.to_string()))?;
                roots
                    .add(der)
                    .map_err(|e| TlsError::ClientCa(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(TlsError::ClientCa("no CERTIFICATE block".into()));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::ClientCa(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(cert.chain, cert.key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The subject common name of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_certificate_names_its_subject_and_builds_a_config() {
        let cert = self_signed(&["localhost".into(), "127.0.0.1".into()]).unwrap();
        assert!(cert.pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(
            common_name(cert.chain[0].as_ref()).as_deref(),
            Some("rcgen self signed cert")
        );
        let ca = cert.pem.clone();
        server_config(cert, Some(&ca)).unwrap();
        assert!(matches!(
            server_config(self_signed(&["x".into()]).unwrap(), Some("junk")),
            Err(TlsError::ClientCa(_))
        ));
    }
}
