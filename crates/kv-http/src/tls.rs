//! TLS from PEM files: the server side (`TLS_CERT_FILE` + `TLS_KEY_FILE` -> an acceptor) and the
//! client side (`TLS_CA_FILE` -> the only roots a client trusts). rustls with the ring provider.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::Error;

/// Accepts TLS connections with one certificate; cheap to clone.
#[derive(Clone)]
pub struct TlsAcceptor(tokio_rustls::TlsAcceptor);

impl TlsAcceptor {
    /// Completes the server side of a TLS handshake on `stream`.
    pub(crate) fn accept<S>(&self, stream: S) -> tokio_rustls::Accept<S>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        self.0.accept(stream)
    }
}

impl std::fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsAcceptor").finish_non_exhaustive()
    }
}

/// The crypto provider of every TLS config kv builds (one provider, chosen here).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// An acceptor serving the certificate chain of `cert_file` with the private key of `key_file`
/// (both PEM), HTTP/1.1 only.
pub fn acceptor_from_pem(cert_file: &Path, key_file: &Path) -> Result<TlsAcceptor, Error> {
    let chain = read_certificates(cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| pem_error(key_file, &e))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::BadKeyPair(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| Error::BadKeyPair(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor(tokio_rustls::TlsAcceptor::from(Arc::new(
        config,
    ))))
}

/// Every certificate of a PEM file (at least one), in file order.
pub fn read_certificates(file: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certificates = CertificateDer::pem_file_iter(file)
        .map_err(|e| pem_error(file, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(file, &e))?;
    if certificates.is_empty() {
        return Err(Error::NothingInFile {
            path: file.to_owned(),
            what: "certificate",
        });
    }
    Ok(certificates)
}

/// A client config that trusts exactly the certificates of `ca_file` (PEM) and nothing else;
/// without a file it trusts nothing, so every `https://` peer is refused.
pub fn client_config(ca_file: Option<&Path>) -> Result<ClientConfig, Error> {
    let mut roots = RootCertStore::empty();
    let certificates = match ca_file {
        Some(ca_file) => read_certificates(ca_file)?,
        None => Vec::new(),
    };
    for certificate in certificates {
        roots.add(certificate).map_err(|e| Error::ReadFile {
            path: ca_file.map(Path::to_owned).unwrap_or_default(),
            reason: format!("not a CA certificate: {e}"),
        })?;
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::BadKeyPair(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

fn pem_error(path: &Path, error: &rustls::pki_types::pem::Error) -> Error {
    match error {
        rustls::pki_types::pem::Error::NoItemsFound => Error::NothingInFile {
            path: path.to_owned(),
            what: "PEM item of the expected kind",
        },
        other => Error::ReadFile {
            path: path.to_owned(),
            reason: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_generated_pair_loads_and_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cert_file = write(dir.path(), "cert.pem", &cert.pem());
        let key_file = write(dir.path(), "key.pem", &key.serialize_pem());
        assert!(acceptor_from_pem(&cert_file, &key_file).is_ok());
        assert!(client_config(Some(&cert_file)).is_ok());
        assert!(client_config(None).is_ok());

        let missing = dir.path().join("missing.pem");
        let message = acceptor_from_pem(&missing, &key_file)
            .err()
            .unwrap()
            .to_string();
        assert!(message.contains("missing.pem"), "{message}");
        let empty = write(dir.path(), "empty.pem", "not pem at all\n");
        let message = acceptor_from_pem(&cert_file, &empty)
            .err()
            .unwrap()
            .to_string();
        assert!(message.contains("empty.pem"), "{message}");
        let message = client_config(Some(&empty)).err().unwrap().to_string();
        assert!(
            message.contains("no certificate") || message.contains("holds no"),
            "{message}"
        );
    }
}
