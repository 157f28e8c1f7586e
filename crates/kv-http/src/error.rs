//! The one error enum of kv-http: what can go wrong while setting up the door (TLS files).

use std::path::PathBuf;

/// Why the HTTP door could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A PEM file could not be read.
    #[error("cannot read {}: {reason}", path.display())]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The operating system's or the PEM parser's words.
        reason: String,
    },
    /// A PEM file holds no item of the kind needed.
    #[error("{} holds no {what}", path.display())]
    NothingInFile {
        /// The file.
        path: PathBuf,
        /// What was looked for ("certificate", "private key").
        what: &'static str,
    },
    /// rustls refused the certificate chain and key.
    #[error("the certificate and key are not usable together: {0}")]
    BadKeyPair(String),
}
