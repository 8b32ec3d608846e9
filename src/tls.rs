//! TLS for streams and targets: which certificate authorities the relay trusts, and the client
//! certificate it shows to servers that ask for one.
//!
//! Every connection trusts the roots bundled with the relay (Mozilla's, through webpki-roots)
//! and the system's store, read once at start as OpenSSL reads it: the files named by
//! `SSL_CERT_FILE` and `SSL_CERT_DIR` when either is set, else the distribution's bundle and
//! directory. A stream or target with a `tls` section (`ca_file`, a client certificate) gets a
//! client of its own, built here from those roots and its section; the others share one client
//! for streams and one for deliveries.

use std::error::Error as StdError;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::client::ClientConfig;
use tracing::{info, warn};

use crate::config::TlsConfig;

/// The certificate authorities every connection trusts: the bundled roots and the system's.
#[derive(Clone)]
pub struct TrustedRoots {
    roots: Arc<RootCertStore>,
}

impl TrustedRoots {
    /// The bundled roots and the system's store. What cannot be read of the system's store is
    /// logged, naming the file, and left out; the relay runs with the rest.
    pub fn load() -> TrustedRoots {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let system = rustls_native_certs::load_native_certs();
        for err in &system.errors {
            warn!(error = %err, "part of the system's certificate store cannot be read; it is not trusted");
        }
        let (n_added, n_refused) = roots.add_parsable_certificates(system.certs);
        if n_refused > 0 {
            warn!(
                n_refused,
                "certificates in the system's store that are not valid X.509 were left out"
            );
        }
        let from_environment = ["SSL_CERT_FILE", "SSL_CERT_DIR"]
            .into_iter()
            .filter(|name| std::env::var_os(name).is_some())
            .collect::<Vec<_>>();
        info!(
            n_system_certificates = n_added, system_store_from = ?from_environment,
            "trusting the system's certificate store and the bundled roots"
        );
        TrustedRoots { roots: Arc::new(roots) }
    }

    /// The TLS settings of a client: these roots, plus what `tls` adds (its `ca_file`, its client
    /// certificate). The config was checked when it was loaded (the files parse, the key belongs
    /// to the certificate), so an error here is unexpected; it never holds key material.
    pub fn client_config(&self, tls: Option<&TlsConfig>) -> Result<ClientConfig, rustls::Error> {
        let roots = self.roots(tls)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let mut config = match tls.and_then(|tls| tls.client_identity.as_ref()) {
            Some(identity) => {
                builder.with_client_auth_cert(identity.certificates.certificates.clone(), identity.key.der())?
            }
            None => builder.with_no_client_auth(),
        };
        // The clients speak HTTP/1.1 only, as reqwest offers it when it builds its own.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

impl TrustedRoots {
    /// These roots, plus `tls.ca_file`.
    pub fn roots(&self, tls: Option<&TlsConfig>) -> Result<Arc<RootCertStore>, rustls::Error> {
        Ok(match tls.and_then(|tls| tls.ca_file.as_ref()) {
            Some(ca_file) => {
                let mut roots = RootCertStore::clone(&self.roots);
                for certificate in &ca_file.certificates {
                    roots.add(certificate.clone())?;
                }
                Arc::new(roots)
            }
            None => Arc::clone(&self.roots),
        })
    }
}

/// What a TLS failure in `err`'s chain means and what fixes it, for the error's log line; none
/// when the chain holds no TLS failure that the relay's settings can fix.
pub fn hint(err: &(dyn StdError + 'static)) -> Option<&'static str> {
    use rustls::{AlertDescription, CertificateError};

    let mut next = Some(err);
    while let Some(current) = next {
        let tls_error = rustls_error(current);
        let hint = match tls_error {
            Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => Some(
                "the server's certificate is not signed by an authority the relay trusts: add that \
                 authority's certificate with tls.ca_file, or to the system's store (SSL_CERT_FILE)",
            ),
            Some(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Some("the server's certificate does not name the host in the URL"),
            Some(rustls::Error::AlertReceived(AlertDescription::CertificateRequired)) => {
                Some("the server asks for a client certificate: set tls.client_cert and tls.client_key")
            }
            Some(rustls::Error::AlertReceived(
                AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateUnknown
                | AlertDescription::AccessDenied,
            )) => Some(
                "the server refused the relay's client certificate, or wanted one: check tls.client_cert \
                 and tls.client_key",
            ),
            _ => None,
        };
        if hint.is_some() {
            return hint;
        }
        next = current.source();
    }
    None
}

/// The rustls error that `err` is or wraps. An io::Error's `source` skips the error it wraps,
/// and the TLS stack wraps rustls's errors in io::Errors, once or twice.
fn rustls_error<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls_error) = err.downcast_ref::<rustls::Error>() {
        return Some(tls_error);
    }
    let inner = err.downcast_ref::<std::io::Error>()?.get_ref()?;
    rustls_error(inner)
}
