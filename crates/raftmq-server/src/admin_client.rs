//! A small HTTP/1.1 client for the admin API, used by `raftmq ctl` (this crate is the only one
//! that opens sockets). Plain `http://` only; one request per connection.

use serde_json::Value;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Why an admin request failed; the messages are meant for the operator.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    #[error("invalid URL `{url}`: {reason}")]
    BadUrl { url: String, reason: &'static str },
    #[error("cannot connect to {url} (is raftmq running with its HTTP endpoint there?)")]
    Connect {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url} did not answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("talking to {url}")]
    Io {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url} sent a response that is not HTTP/JSON: {reason}")]
    BadResponse { url: String, reason: String },
    #[error(
        "{url}: the admin token is missing; pass --token or set RAFTMQ_ADMIN_TOKEN ({message})"
    )]
    TokenMissing { url: String, message: String },
    #[error("{url}: the admin token was refused ({message})")]
    TokenWrong { url: String, message: String },
    #[error("{method} {url}: HTTP {status}: {message}")]
    Api {
        method: String,
        url: String,
        status: u16,
        message: String,
    },
}

/// Where the admin API is and how to authenticate.
#[derive(Clone, Debug)]
pub struct AdminClient {
    /// `host:port` to connect to.
    authority: String,
    /// Path prefix from the URL (without a trailing `/`).
    base_path: String,
    base_url: String,
    token: Option<String>,
    timeout: Duration,
}

impl AdminClient {
    /// A client for `url` (`http://host:port[/prefix]`), sending `token` as a bearer token.
    pub fn new(url: &str, token: Option<String>) -> Result<AdminClient, AdminClientError> {
        let bad = |reason| AdminClientError::BadUrl {
            url: url.to_owned(),
            reason,
        };
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| bad("only http:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(bad("no host"));
        }
        let authority = if authority.rsplit_once(':').is_some_and(|(_, p)| {
            !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()) && !p.contains(']')
        }) {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        Ok(AdminClient {
            authority,
            base_path: path.trim_end_matches('/').to_owned(),
            base_url: url.trim_end_matches('/').to_owned(),
            token: token.filter(|t| !t.is_empty()),
            timeout: Duration::from_secs(90),
        })
    }

    /// The base URL (for messages).
    pub fn url(&self) -> &str {
        &self.base_url
    }

    /// Sets how long one request may take (default 90 s: adding a node waits for it to catch up).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub async fn get(&self, path: &str) -> Result<Value, AdminClientError> {
        self.request("GET", path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, AdminClientError> {
        self.request("POST", path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<Value, AdminClientError> {
        self.request("DELETE", path, None).await
    }

    /// Sends one request (`path` starts with `/`, already percent-encoded) and returns the JSON
    /// body of a 2xx answer; any other answer is an error carrying the server's message.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, AdminClientError> {
        let url = format!("{}{path}", self.base_url);
        match tokio::time::timeout(self.timeout, self.exchange(method, path, body, &url)).await {
            Ok(result) => result,
            Err(_) => Err(AdminClientError::Timeout {
                url,
                timeout: self.timeout,
            }),
        }
    }

    async fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        url: &str,
    ) -> Result<Value, AdminClientError> {
        let io = |source| AdminClientError::Io {
            url: url.to_owned(),
            source,
        };
        let mut stream = TcpStream::connect(&self.authority)
            .await
            .map_err(|source| AdminClientError::Connect {
                url: self.base_url.clone(),
                source,
            })?;
        let body = body.map(Value::to_string).unwrap_or_default();
        let mut req = format!(
            "{method} {}{path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAccept: application/json\r\n",
            self.base_path, self.authority
        );
        if let Some(token) = &self.token {
            req.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        if !body.is_empty() || method == "POST" {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(&body);
        stream.write_all(req.as_bytes()).await.map_err(io)?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.map_err(io)?;
        let (status, text) =
            parse_response(&raw).map_err(|reason| AdminClientError::BadResponse {
                url: url.to_owned(),
                reason,
            })?;
        let json: Option<Value> = serde_json::from_str(&text).ok();
        let message = json
            .as_ref()
            .and_then(|v| v.get("error"))
            .and_then(Value::as_str)
            .map_or_else(|| text.trim().to_owned(), str::to_owned);
        match status {
            200..=299 => json.ok_or_else(|| AdminClientError::BadResponse {
                url: url.to_owned(),
                reason: format!("body is not JSON: {}", text.trim()),
            }),
            401 if self.token.is_none() => Err(AdminClientError::TokenMissing {
                url: url.to_owned(),
                message,
            }),
            401 => Err(AdminClientError::TokenWrong {
                url: url.to_owned(),
                message,
            }),
            status => Err(AdminClientError::Api {
                method: method.to_owned(),
                url: url.to_owned(),
                status,
                message,
            }),
        }
    }
}

/// Splits an HTTP/1.1 response into its status and (de-chunked) body text.
fn parse_response(raw: &[u8]) -> Result<(u16, String), String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line `{status_line}`"))?;
    let chunked = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding")
                && v.to_ascii_lowercase().contains("chunked")
        })
    });
    let mut body = &raw[end + 4..];
    let bytes = if chunked {
        let mut out = Vec::new();
        loop {
            let line_end = body
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or("truncated chunk")?;
            let size = std::str::from_utf8(&body[..line_end])
                .ok()
                .and_then(|s| {
                    usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok()
                })
                .ok_or("bad chunk size")?;
            body = &body[line_end + 2..];
            if size == 0 {
                break;
            }
            let chunk = body.get(..size).ok_or("truncated chunk")?;
            out.extend_from_slice(chunk);
            body = body.get(size + 2..).unwrap_or_default();
        }
        out
    } else {
        body.to_vec()
    };
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

/// Percent-encodes one path segment (or, with `keep_slash`, a path such as a topic name).
pub fn encode_path(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(b))
            }
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_parsed_or_refused() {
        let c = AdminClient::new("http://127.0.0.1:9100/", None).expect("valid");
        assert_eq!(
            (c.authority.as_str(), c.base_path.as_str()),
            ("127.0.0.1:9100", "")
        );
        let c = AdminClient::new("http://broker/admin/", Some(String::new())).expect("valid");
        assert_eq!(
            (c.authority.as_str(), c.base_path.as_str()),
            ("broker:80", "/admin")
        );
        assert!(c.token.is_none());
        assert!(AdminClient::new("https://x:1", None).is_err());
        assert!(AdminClient::new("http://", None).is_err());
    }

    #[test]
    fn responses_are_parsed_with_and_without_chunking() {
        let plain = b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(plain), Ok((404, "{}".to_owned())));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked), Ok((200, "{\"a\":1}".to_owned())));
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn path_encoding_escapes_reserved_bytes() {
        assert_eq!(encode_path("a b/c#", true), "a%20b/c%23");
        assert_eq!(encode_path("a/b", false), "a%2Fb");
    }
}
