//! The one error type of kvctl, and the exit code each kind maps to (documented in README and
//! `kvctl --help`; scripts rely on them).

use serde_json::Value;

/// Exit codes.
pub mod code {
    /// Success.
    pub const OK: u8 = 0;
    /// The key (or node) does not exist.
    pub const NOT_FOUND: u8 = 1;
    /// Bad input or usage: a bad argument, an unreadable file, a 400 or 413 from the server.
    pub const BAD_INPUT: u8 = 2;
    /// A precondition failed: 412 (`--if-match`, `--if-absent`) or 409 (a version conflict).
    pub const PRECONDITION: u8 = 3;
    /// Unavailable: 503, 504, 507, or no connection (refused, timed out).
    pub const UNAVAILABLE: u8 = 4;
    /// Not allowed: 401 or 403 (a missing or wrong token).
    pub const AUTH: u8 = 5;
    /// Any other server error (500, an unexpected answer), or problems `doctor` found.
    pub const OTHER: u8 = 6;
}

/// Everything that ends a kvctl command with a non-zero exit code.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// A bad argument, file or value, found before anything was sent.
    #[error("{0}")]
    Usage(String),
    /// The server answered with an error status.
    #[error("{method} {url}: {status} {code}: {message}")]
    Http {
        /// HTTP method.
        method: String,
        /// The URL asked.
        url: String,
        /// HTTP status.
        status: u16,
        /// The `error` member of the JSON body (or `http_<status>`).
        code: String,
        /// The `message` member (or the body's text).
        message: String,
        /// The whole JSON body (for `--json`).
        body: Box<Value>,
    },
    /// No answer: connection refused, DNS, TLS or a timeout.
    #[error("{url}: {message}")]
    Transport {
        /// The URL asked.
        url: String,
        /// What failed.
        message: String,
    },
    /// A local file or program failed.
    #[error("{0}")]
    Io(String),
    /// A command found problems it has already reported (e.g. `doctor`, `status`); carries
    /// the exit code.
    #[error("{message}")]
    Reported {
        /// Exit code.
        code: u8,
        /// One line for stderr.
        message: String,
    },
}

impl CtlError {
    /// The exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Usage(_) => code::BAD_INPUT,
            CtlError::Http { status, .. } => status_code(*status),
            CtlError::Transport { .. } => code::UNAVAILABLE,
            CtlError::Io(_) => code::BAD_INPUT,
            CtlError::Reported { code, .. } => *code,
        }
    }

    /// The error as JSON for `--json` (stderr stays human).
    pub fn to_json(&self) -> Value {
        match self {
            CtlError::Http {
                status, code, body, ..
            } => serde_json::json!({
                "ok": false,
                "status": status,
                "error": code,
                "message": self.to_string(),
                "body": body,
                "exit_code": self.exit_code(),
            }),
            _ => serde_json::json!({
                "ok": false,
                "error": self.kind(),
                "message": self.to_string(),
                "exit_code": self.exit_code(),
            }),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            CtlError::Usage(_) => "usage",
            CtlError::Http { .. } => "http",
            CtlError::Transport { .. } => "unavailable",
            CtlError::Io(_) => "io",
            CtlError::Reported { .. } => "reported",
        }
    }
}

/// The exit code of an HTTP status (2xx is 0).
pub fn status_code(status: u16) -> u8 {
    match status {
        200..=299 => code::OK,
        404 => code::NOT_FOUND,
        400 | 405 | 413 | 414 | 431 => code::BAD_INPUT,
        409 | 412 => code::PRECONDITION,
        401 | 403 => code::AUTH,
        503 | 504 | 507 | 502 => code::UNAVAILABLE,
        _ => code::OTHER,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_the_documented_codes() {
        assert_eq!(status_code(200), 0);
        assert_eq!(status_code(404), 1);
        assert_eq!(status_code(400), 2);
        assert_eq!(status_code(413), 2);
        assert_eq!(status_code(412), 3);
        assert_eq!(status_code(409), 3);
        assert_eq!(status_code(503), 4);
        assert_eq!(status_code(504), 4);
        assert_eq!(status_code(507), 4);
        assert_eq!(status_code(401), 5);
        assert_eq!(status_code(403), 5);
        assert_eq!(status_code(500), 6);
        let transport = CtlError::Transport {
            url: "http://x".into(),
            message: "refused".into(),
        };
        assert_eq!(transport.exit_code(), 4);
        assert_eq!(CtlError::Usage("bad".into()).exit_code(), 2);
    }
}
