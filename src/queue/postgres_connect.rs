//! The TLS connector of every connection to PostgreSQL, by what the url's `sslmode` asks of the
//! server's certificate (`config::postgres_url`, which has the table). The trusted authorities
//! are those of streams and targets (the bundled roots, the system's store, `SSL_CERT_FILE`)
//! plus `storage.tls.ca_file`; `storage.tls.client_cert` and `client_key` answer a server that
//! asks for a client certificate.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::TlsConfig;
use crate::config::postgres_url::Verify;
use crate::tls::TrustedRoots;

/// The TLS connector of every connection to the database.
pub fn connector(verify: Verify, tls: Option<&TlsConfig>) -> Result<MakeRustlsConnect, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder =
        rustls::ClientConfig::builder_with_provider(Arc::clone(&provider)).with_safe_default_protocol_versions()?;
    let verifier: Arc<dyn ServerCertVerifier> = match verify {
        Verify::Full => webpki_verifier(tls, provider)?,
        Verify::Authority => Arc::new(PartialCheck {
            chain: Some(webpki_verifier(tls, Arc::clone(&provider))?),
            provider,
        }),
        Verify::Nothing => Arc::new(PartialCheck { chain: None, provider }),
    };
    let builder = builder.dangerous().with_custom_certificate_verifier(verifier);
    let mut config = match tls.and_then(|tls| tls.client_identity.as_ref()) {
        Some(identity) => {
            builder.with_client_auth_cert(identity.certificates.certificates.clone(), identity.key.der())?
        }
        None => builder.with_no_client_auth(),
    };
    // PostgreSQL 17 refuses other protocols where a client names one.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(MakeRustlsConnect::new(config))
}

/// The standard check (chain and host name) against the trusted authorities.
fn webpki_verifier(
    tls: Option<&TlsConfig>,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, rustls::Error> {
    let roots = TrustedRoots::load().roots(tls)?;
    WebPkiServerVerifier::builder_with_provider(roots, provider)
        .build()
        .map_err(|err| rustls::Error::General(err.to_string()))
}

/// Less than the standard check: `verify-ca` checks the chain and not the host name (`chain`
/// set); `prefer` and `require` take any certificate, as libpq does (`chain` none). The
/// handshake's signatures are checked either way.
#[derive(Debug)]
struct PartialCheck {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PartialCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        // webpki checks the chain first: a name error means the chain was good.
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            checked => checked,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
