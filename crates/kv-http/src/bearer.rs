//! The bearer-token check of `Authorization` headers: the scheme matched case-insensitively
//! (RFC 7235 section 2.1), the token compared in constant time.

use http::{header, HeaderMap};
use subtle::ConstantTimeEq;

/// True when `headers` carry `Authorization: Bearer <token>`. The scheme may be in any case and
/// be followed by one or more spaces; the token itself takes the same time to compare wherever
/// its first difference is.
pub fn bearer_matches(headers: &HeaderMap, token: &str) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return false;
    };
    let bytes = value.as_bytes();
    let Some(space) = bytes.iter().position(|&b| b == b' ') else {
        return false;
    };
    let (scheme, rest) = bytes.split_at(space);
    let presented = trim_spaces(rest);
    scheme.eq_ignore_ascii_case(b"bearer")
        && !presented.is_empty()
        && bool::from(presented.ct_eq(token.as_bytes()))
}

fn trim_spaces(mut bytes: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = bytes {
        bytes = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = bytes {
        bytes = rest;
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn with_auth(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn the_scheme_is_case_insensitive() {
        for value in [
            "Bearer s3cret",
            "bearer s3cret",
            "BEARER s3cret",
            "bEaReR  s3cret",
        ] {
            assert!(bearer_matches(&with_auth(value), "s3cret"), "{value}");
        }
    }

    #[test]
    fn wrong_missing_or_malformed_credentials_fail() {
        assert!(!bearer_matches(&HeaderMap::new(), "s3cret"));
        for value in [
            "Bearer s3cre",
            "Bearer s3cret2",
            "Basic s3cret",
            "Bearer",
            "Bearer ",
            "s3cret",
            "Bearers3cret",
            "Bearer s3cret extra",
        ] {
            assert!(!bearer_matches(&with_auth(value), "s3cret"), "{value}");
        }
    }
}
