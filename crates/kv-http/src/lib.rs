//! kv-http: the one hardened HTTP door of kv-node and kv-lb. Knows nothing of keys, rings or
//! storage: it serves an axum `Router` safely and offers the small pieces both binaries share.
//!
//! # Layout
//! - [`serve`]: the accept loop (connection cap, request-head deadline, keep-alive idle
//!   timeout, head size limit answered with 431, optional TLS, graceful drain).
//! - `connection`: one connection's life: what it is doing now, and when it must be closed.
//! - [`tls`]: PEM certificate and key files -> a rustls acceptor.
//! - [`shutdown_signal`]: resolves on SIGTERM or Ctrl-C.
//! - [`bearer_matches`]: the `Authorization: Bearer` check (RFC 7235, constant time).
//! - [`error_body`]: the JSON error body `{"error": code, "message": text}`.
//! - [`dashboard`]: the `/ui` page, the per-route request window and recent warnings it shows.
//! - [`limit_transparent_huge_pages`]: the process memory setting both binaries apply at start.
//! - [`runtime()`]: the async runtime both binaries run on, `WORKER_THREADS` workers.
//! - [`Error`]: the crate's one error enum.

mod bearer;
mod connection;
pub mod dashboard;
mod error;
mod error_body;
mod memory;
mod runtime;
pub mod serve;
mod signal;
pub mod tls;

pub use bearer::bearer_matches;
pub use error::Error;
pub use error_body::{error_body, error_response};
pub use memory::limit_transparent_huge_pages;
pub use runtime::{default_worker_threads, runtime, MAX_WORKER_THREADS};
pub use serve::{serve, Handler, ServeLimits};
pub use signal::shutdown_signal;
pub use tls::TlsAcceptor;
