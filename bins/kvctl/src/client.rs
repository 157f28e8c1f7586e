//! HTTP to the LB or a node: a blocking reqwest client with the bearer token, the CA of
//! `--cacert`, and answers turned into JSON or a [`CtlError`].

use crate::error::CtlError;
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use reqwest::blocking::{Client, RequestBuilder, Response};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// What is escaped in a key's path segment; `/` is kept (keys may hold slashes).
const KEY_ESCAPE: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'?')
    .add(b'<')
    .add(b'>')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'\\')
    .add(b'^')
    .add(b'|')
    .add(b'[')
    .add(b']');

/// What escapes a query parameter's value.
const QUERY_ESCAPE: &AsciiSet = &KEY_ESCAPE.add(b'&').add(b'=').add(b'+').add(b'/');

/// A key as a `/v1/...` path.
pub fn key_path(key: &str) -> String {
    format!("/v1/{}", utf8_percent_encode(key, KEY_ESCAPE))
}

/// A query parameter's value, escaped.
pub fn query_value(value: &str) -> String {
    utf8_percent_encode(value, QUERY_ESCAPE).to_string()
}

/// A status code with its JSON body (`Null` when the body is not JSON) and headers.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Parsed body.
    pub json: Value,
    /// Raw body.
    pub text: String,
}

/// The connection settings every command shares.
#[derive(Debug, Clone)]
pub struct Http {
    client: Client,
    /// The LB's or a node's base URL, without a trailing slash.
    pub base: String,
    token: Option<String>,
    cacert: Option<Vec<u8>>,
}

impl Http {
    /// A client for `base` with `timeout` per request.
    pub fn new(
        base: &str,
        token: Option<String>,
        cacert: Option<&Path>,
        timeout: Duration,
    ) -> Result<Http, CtlError> {
        let base = base.trim_end_matches('/').to_owned();
        let parsed = reqwest::Url::parse(&base)
            .map_err(|e| CtlError::Usage(format!("--url {base}: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(CtlError::Usage(format!(
                "--url {base}: expected http://host:port or https://host:port"
            )));
        }
        let cacert = match cacert {
            Some(path) => Some(
                std::fs::read(path)
                    .map_err(|e| CtlError::Usage(format!("--cacert {}: {e}", path.display())))?,
            ),
            None => None,
        };
        let client = build_client(cacert.as_deref(), Some(timeout))?;
        Ok(Http {
            client,
            base,
            token: token.filter(|t| !t.is_empty()),
            cacert,
        })
    }

    /// The same settings for another base URL (a node named by the cluster).
    pub fn at(&self, base: &str) -> Http {
        Http {
            base: base.trim_end_matches('/').to_owned(),
            ..self.clone()
        }
    }

    /// The same settings with no overall deadline (downloads).
    pub fn without_timeout(&self) -> Result<Http, CtlError> {
        Ok(Http {
            client: build_client(self.cacert.as_deref(), None)?,
            ..self.clone()
        })
    }

    /// True when a token is configured.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// A request to `base` + `path`, with the token unless `anonymous`.
    pub fn request(&self, method: &str, path: &str, anonymous: bool) -> RequestBuilder {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap_or(reqwest::Method::GET);
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let (Some(token), false) = (&self.token, anonymous) {
            request = request.bearer_auth(token);
        }
        request
    }

    /// Sends and collects the answer, whatever its status; `Err` only when nothing came back.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        request: RequestBuilder,
    ) -> Result<Answer, CtlError> {
        let url = format!("{}{path}", self.base);
        let response = request.send().map_err(|e| transport(&url, &e))?;
        read_answer(method, &url, response)
    }

    /// Sends; a non-2xx answer is an error.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, CtlError> {
        let mut request = self.request(method, path, false);
        if let Some(body) = body {
            request = request.body(body.to_string());
        }
        let answer = self.send(method, path, request)?;
        ok_or_error(method, &format!("{}{path}", self.base), answer)
    }

    /// `GET path` without the token (public routes: `/`, `/health`, `/metrics`).
    pub fn get_public(&self, path: &str) -> Result<Answer, CtlError> {
        let request = self.request("GET", path, true);
        self.send("GET", path, request)
    }

    /// The raw response of `GET path` (streamed downloads).
    pub fn get_stream(&self, path: &str) -> Result<Response, CtlError> {
        let url = format!("{}{path}", self.base);
        let response = self
            .request("GET", path, false)
            .send()
            .map_err(|e| transport(&url, &e))?;
        if response.status().is_success() {
            Ok(response)
        } else {
            let answer = read_answer("GET", &url, response)?;
            Err(http_error("GET", &url, answer))
        }
    }
}

fn build_client(cacert: Option<&[u8]>, timeout: Option<Duration>) -> Result<Client, CtlError> {
    let mut builder = Client::builder()
        .connect_timeout(Duration::from_secs(3))
        .timeout(timeout);
    if let Some(pem) = cacert {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| CtlError::Usage(format!("--cacert: not a PEM certificate: {e}")))?;
        if certs.is_empty() {
            return Err(CtlError::Usage(
                "--cacert: no certificate in the file".into(),
            ));
        }
        builder = builder.tls_built_in_root_certs(false);
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder
        .build()
        .map_err(|e| CtlError::Usage(format!("cannot set up the HTTP client: {e}")))
}

fn read_answer(_method: &str, url: &str, response: Response) -> Result<Answer, CtlError> {
    let status = response.status().as_u16();
    let text = response.text().map_err(|e| transport(url, &e))?;
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Ok(Answer { status, json, text })
}

/// The body of a 2xx answer, or the error it carries.
pub fn ok_or_error(method: &str, url: &str, answer: Answer) -> Result<Value, CtlError> {
    if (200..300).contains(&answer.status) {
        Ok(answer.json)
    } else {
        Err(http_error(method, url, answer))
    }
}

/// An error answer as a [`CtlError::Http`].
pub fn http_error(method: &str, url: &str, answer: Answer) -> CtlError {
    let code = answer.json["error"]
        .as_str()
        .map_or_else(|| format!("http_{}", answer.status), str::to_owned);
    let message = answer.json["message"].as_str().map_or_else(
        || answer.text.chars().take(300).collect::<String>(),
        str::to_owned,
    );
    CtlError::Http {
        method: method.to_owned(),
        url: url.to_owned(),
        status: answer.status,
        code,
        message,
        body: Box::new(answer.json),
    }
}

/// A transport failure, with the cause chain (reqwest's top message alone says little).
pub fn transport(url: &str, e: &reqwest::Error) -> CtlError {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    CtlError::Transport {
        url: url.to_owned(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_slashes_and_escape_the_rest() {
        assert_eq!(key_path("users/42/name"), "/v1/users/42/name");
        assert_eq!(key_path("a b?c#d%"), "/v1/a%20b%3Fc%23d%25");
        assert_eq!(key_path("é"), "/v1/%C3%A9");
        assert_eq!(query_value("a/b&c=d"), "a%2Fb%26c%3Dd");
    }

    #[test]
    fn bad_urls_are_usage_errors() {
        let timeout = Duration::from_secs(1);
        for url in ["localhost:9000", "ftp://x", "not a url"] {
            let e = Http::new(url, None, None, timeout).err();
            assert!(matches!(e, Some(CtlError::Usage(_))), "{url}: {e:?}");
        }
        let http = Http::new("http://127.0.0.1:9000/", Some(String::new()), None, timeout);
        let http = http.ok();
        assert_eq!(
            http.as_ref().map(|h| h.base.as_str()),
            Some("http://127.0.0.1:9000")
        );
        assert_eq!(http.map(|h| h.has_token()), Some(false));
    }
}
