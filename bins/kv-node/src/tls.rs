//! TLS of a node at start-up: the acceptor it serves HTTPS with and the CA its peer client
//! trusts, read from the files `config.rs` names. A bad file stops start-up with one line
//! naming its variable.

use crate::config::TlsFiles;
use kv_http::TlsAcceptor;
use std::path::Path;

/// What the files gave.
#[derive(Debug, Default)]
pub struct NodeTls {
    /// Serves HTTPS when set (`TLS_CERT_FILE` + `TLS_KEY_FILE`).
    pub acceptor: Option<TlsAcceptor>,
    /// The PEM text of `TLS_CA_FILE`: the only roots the peer client trusts.
    pub ca_pem: Option<Vec<u8>>,
}

/// Reads and checks every TLS file that is set.
pub fn load(files: &TlsFiles) -> Result<NodeTls, String> {
    let acceptor = match (&files.cert_file, &files.key_file) {
        (Some(cert), Some(key)) => Some(acceptor(cert, key)?),
        _ => None,
    };
    let ca_pem = match &files.ca_file {
        Some(ca) => Some(ca_pem(ca)?),
        None => None,
    };
    Ok(NodeTls { acceptor, ca_pem })
}

fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
    kv_http::tls::read_certificates(cert)
        .map_err(|e| format!("TLS_CERT_FILE={}: {e}", cert.display()))?;
    kv_http::tls::acceptor_from_pem(cert, key)
        .map_err(|e| format!("TLS_KEY_FILE={}: {e}", key.display()))
}

fn ca_pem(ca: &Path) -> Result<Vec<u8>, String> {
    let named = |e: String| format!("TLS_CA_FILE={}: {e}", ca.display());
    kv_http::tls::client_config(Some(ca)).map_err(|e| named(e.to_string()))?;
    std::fs::read(ca).map_err(|e| named(e.to_string()))
}
