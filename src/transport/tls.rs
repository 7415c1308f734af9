//! TLS 1.3 for migration channels (rustls with ring; no TLS 1.2).
//!
//! A receiver presents a certificate from `--tls-cert`/`--tls-key`, or one
//! it makes for itself at start. A source knows its receiver one of two ways:
//! it pins the receiver's certificate (`--tls-ca`, the exact certificate),
//! or both hold a shared key and prove it in the session's setup and binds
//! over the TLS channel's exported keying material, so that a man in the
//! middle, who must run two TLS sessions with two different exports, fails
//! the proof. Agents use the second, with the cluster's key.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::path::Path;
use std::sync::Arc;
use tokio::net::TcpStream;

/// The label of the keying material each channel exports for its proofs.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-ferry-channel-binding";
/// The name a source asks for (certificates are pinned or bound, not named).
const SERVER_NAME: &str = "ferry";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring this process's default TLS crypto provider, once (HTTP clients
/// need one even for plain HTTP; ferry builds with ring only).
pub fn install_default_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Another part of the process may have installed one: that one stays.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// What a connection's TLS session binds its proofs to: 32 bytes of
/// exported keying material, the same on both ends only when no one sits in
/// between.
fn export(
    conn: &impl std::ops::Deref<Target = rustls::ConnectionCommon<impl rustls::SideData>>,
) -> Result<[u8; 32], String> {
    conn.export_keying_material([0u8; 32], EXPORTER_LABEL, None)
        .map_err(|e| format!("TLS keying material: {e}"))
}

/// A receiver's side of TLS.
#[derive(Clone)]
pub struct TlsServer {
    acceptor: tokio_rustls::TlsAcceptor,
    /// The certificate it presents (DER), for sources to pin.
    pub certificate: Vec<u8>,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsServer")
    }
}

impl TlsServer {
    fn with(cert: CertificateDer<'static>, key: PrivateKeyDer<'static>) -> Result<Self, String> {
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .map_err(|e| format!("the TLS certificate and key do not make a pair: {e}"))?;
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            certificate: cert.to_vec(),
        })
    }

    /// Presents certificate `der` with its private key (PEM bytes, read by
    /// the caller under the secret-file rules).
    pub fn from_der_and_pem_key(der: &[u8], key: &[u8]) -> Result<Self, String> {
        let k = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("tls_key: {e}"))?;
        Self::with(CertificateDer::from(der.to_vec()), k)
    }

    /// The acceptor, for servers other than migration channels (the API).
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        self.acceptor.clone()
    }

    /// Presents the certificate and key in PEM files.
    pub fn from_pem(cert: &Path, key: &Path) -> Result<Self, String> {
        let c = CertificateDer::from_pem_file(cert)
            .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
        let k = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
        Self::with(c, k)
    }

    /// Presents a certificate made now, for this process's lifetime.
    pub fn ephemeral() -> Result<Self, String> {
        let made = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])
            .map_err(|e| format!("making a TLS certificate: {e}"))?;
        let key = PrivateKeyDer::try_from(made.signing_key.serialize_der())
            .map_err(|e| format!("the TLS key: {e}"))?;
        Self::with(made.cert.der().clone(), key)
    }

    /// Writes the certificate and key as PEM (`ferry tls-cert`, tests).
    pub fn generate_pem() -> Result<(String, String), String> {
        let made = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])
            .map_err(|e| format!("making a TLS certificate: {e}"))?;
        Ok((made.cert.pem(), made.signing_key.serialize_pem()))
    }

    /// Runs the server side of the handshake; returns the stream and its
    /// channel binding.
    pub async fn accept(
        &self,
        stream: TcpStream,
    ) -> Result<(tokio_rustls::TlsStream<TcpStream>, [u8; 32]), String> {
        let s = self
            .acceptor
            .accept(stream)
            .await
            .map_err(|e| format!("TLS handshake failed: {e}"))?;
        let binding = export(s.get_ref().1)?;
        Ok((tokio_rustls::TlsStream::Server(s), binding))
    }
}

/// A source's side of TLS.
#[derive(Clone)]
pub struct TlsClient {
    connector: tokio_rustls::TlsConnector,
    pinned: bool,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsClient")
    }
}

/// Accepts the receiver's certificate if it is the pinned one (or any, when
/// the session's key proofs are bound to the channel instead), and checks
/// its handshake signature either way.
#[derive(Debug)]
struct Pinned {
    certificate: Option<Vec<u8>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.certificate {
            Some(pin) if pin.as_slice() != end_entity.as_ref() => Err(rustls::Error::General(
                "the peer's TLS certificate is not the pinned one".into(),
            )),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl TlsClient {
    fn with(certificate: Option<Vec<u8>>) -> Self {
        let pinned = certificate.is_some();
        let provider = provider();
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring offers TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned {
                certificate,
                provider,
            }))
            .with_no_client_auth();
        Self {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            pinned,
        }
    }

    /// A client configuration (TLS 1.3, ring) that trusts only the server
    /// presenting certificate `der`, whatever name it is reached by: for
    /// HTTPS clients of a cluster's agents, each pinned to its node.
    pub fn pinned_config(der: &[u8]) -> rustls::ClientConfig {
        let provider = provider();
        rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring offers TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned {
                certificate: Some(der.to_vec()),
                provider,
            }))
            .with_no_client_auth()
    }

    /// Whether it checks the receiver's certificate against a pin (else the
    /// shared key's proofs over the channel must).
    pub fn is_pinned(&self) -> bool {
        self.pinned
    }

    /// Trusts only the receiver that presents the certificate in `pem`.
    pub fn pinned(pem: &Path) -> Result<Self, String> {
        let c = CertificateDer::from_pem_file(pem)
            .map_err(|e| format!("--tls-ca {}: {e}", pem.display()))?;
        Ok(Self::with(Some(c.to_vec())))
    }

    /// Trusts only the receiver whose certificate is `der`.
    pub fn pinned_der(der: &[u8]) -> Self {
        Self::with(Some(der.to_vec()))
    }

    /// Takes any certificate: the receiver is known by the shared key,
    /// proved over each channel's binding (the caller must hold a key).
    pub fn bound_to_key() -> Self {
        Self::with(None)
    }

    /// Runs the client side of the handshake; returns the stream and its
    /// channel binding.
    pub async fn connect(
        &self,
        stream: TcpStream,
    ) -> Result<(tokio_rustls::TlsStream<TcpStream>, [u8; 32]), String> {
        let name = ServerName::try_from(SERVER_NAME).expect("a valid name");
        let s = self
            .connector
            .connect(name, stream)
            .await
            .map_err(|e| format!("TLS handshake failed: {e}"))?;
        let binding = export(s.get_ref().1)?;
        Ok((tokio_rustls::TlsStream::Client(s), binding))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn both_ends_export_the_same_binding_and_pins_are_checked() {
        let server = TlsServer::ephemeral().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let s2 = server.clone();
        let accept = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let first = s2.accept(tcp).await;
            let (tcp, _) = listener.accept().await.unwrap();
            let second = s2.accept(tcp).await;
            (first.map(|x| x.1), second.map(|x| x.1))
        });
        let good = TlsClient::pinned_der(&server.certificate);
        let (_, ours) = good
            .connect(TcpStream::connect(addr).await.unwrap())
            .await
            .unwrap();
        let other = TlsServer::ephemeral().unwrap();
        let wrong = TlsClient::pinned_der(&other.certificate);
        let err = wrong
            .connect(TcpStream::connect(addr).await.unwrap())
            .await
            .unwrap_err();
        assert!(err.contains("not the pinned one"), "{err}");
        let (first, _) = accept.await.unwrap();
        assert_eq!(first.unwrap(), ours, "one channel binding on both ends");
    }
}
