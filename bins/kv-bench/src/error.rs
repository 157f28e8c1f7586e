//! The one error type of kv-bench: bad arguments, unreachable targets and failed output files.

use std::path::PathBuf;

/// Everything that stops a kv-bench command before or after the load itself.
///
/// Failed requests during a run are not errors of this kind: they are counted in the results.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A command-line value that parsed but does not make sense (for example `--url` without a host).
    #[error("{0}")]
    Invalid(String),
    /// The target's host name did not resolve to any address.
    #[error("cannot resolve {host}:{port}: {source}")]
    Resolve {
        /// Host as given in `--url`.
        host: String,
        /// Port as given or implied by `--url`.
        port: u16,
        /// What the resolver said.
        source: std::io::Error,
    },
    /// The listening socket of the limit server could not be opened.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// Address we tried to bind.
        addr: String,
        /// Why the bind failed.
        source: std::io::Error,
    },
    /// The `--json` results file could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Output {
        /// File named by `--json`.
        path: PathBuf,
        /// Why writing failed.
        source: std::io::Error,
    },
    /// A latency histogram could not be created or merged (only possible with bad bounds).
    #[error("latency histogram: {0}")]
    Histogram(String),
    /// The tokio runtime could not be built.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

impl From<hdrhistogram::errors::CreationError> for BenchError {
    fn from(e: hdrhistogram::errors::CreationError) -> Self {
        BenchError::Histogram(format!("{e:?}"))
    }
}

impl From<hdrhistogram::errors::AdditionError> for BenchError {
    fn from(e: hdrhistogram::errors::AdditionError) -> Self {
        BenchError::Histogram(format!("{e:?}"))
    }
}
