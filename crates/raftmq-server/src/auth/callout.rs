//! External authentication: an HTTP service asked whether a client may connect.
//!
//! The broker POSTs a JSON object to the configured `http://` URL:
//!
//! ```json
//! {"client_id": "dev-1", "username": "alice", "password": "secret",
//!  "peer": "10.0.0.7:51234", "cert_identity": null}
//! ```
//!
//! (`password` is the UTF-8 text of the CONNECT password, invalid bytes replaced; absent
//! fields are `null`) and expects `200` with `{"allow": true}` or `{"allow": false}`. An
//! acceptance may carry rules for that connection in the ACL file syntax, which then replace the
//! ACL file for it: `{"allow": true, "acl": ["allow pubsub devices/%c/#"]}`. Any other status,
//! an unreadable body or ACL, a connection error or no answer within the timeout is an error:
//! the client is refused (CONNACK 0x87 Not authorized / 3.1.1: 5) and the error is not cached.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Request;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use raftmq_core::acl::Acl;
use raftmq_core::auth::AuthRequest;
use std::future::Future;
use std::pin::Pin;
use tokio::net::TcpStream;

/// Largest response body read from the service.
const MAX_RESPONSE: usize = 64 * 1024;

/// Why a callout gave no decision.
#[derive(Debug, thiserror::Error)]
pub enum CalloutError {
    #[error("invalid callout URL `{0}`: {1}")]
    Url(String, &'static str),
    #[error("cannot reach the authentication service: {0}")]
    Connect(#[source] std::io::Error),
    #[error("HTTP error talking to the authentication service: {0}")]
    Http(#[source] hyper::Error),
    #[error("the authentication service answered HTTP {0}")]
    Status(u16),
    #[error("unreadable answer from the authentication service: {0}")]
    Body(String),
}

/// What the service decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CalloutAnswer {
    pub allow: bool,
    /// Rules for this connection (replacing the ACL file for it), if the service gave any.
    pub acl: Option<Acl>,
}

/// The decision future of a callout.
pub type CalloutFuture = Pin<Box<dyn Future<Output = Result<CalloutAnswer, CalloutError>> + Send>>;

/// Something that decides, asynchronously, whether a client may connect. The broker bounds
/// every call with `auth.callout_timeout` and caches definite answers.
pub trait AuthCallout: Send + Sync + 'static {
    fn check(&self, request: AuthRequest) -> CalloutFuture;
}

/// The HTTP/1.1 callout (plain `http://` URLs; put a TLS-terminating sidecar in front of a
/// remote service).
#[derive(Clone, Debug)]
pub struct HttpCallout {
    authority: String,
    path: String,
}

impl HttpCallout {
    /// A callout to `url` (`http://host:port/path`).
    pub fn new(url: &str) -> Result<Self, CalloutError> {
        let bad = |why| CalloutError::Url(url.to_owned(), why);
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| bad("only http:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(bad("expected http://host:port/path"));
        }
        let authority = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_owned()
        } else if authority.contains(':') && !authority.ends_with(']') {
            return Err(bad("invalid port"));
        } else {
            format!("{authority}:80")
        };
        Ok(HttpCallout {
            authority,
            path: path.to_owned(),
        })
    }
}

#[derive(serde::Serialize)]
struct Body<'a> {
    client_id: &'a str,
    username: Option<&'a str>,
    password: Option<String>,
    peer: Option<String>,
    cert_identity: Option<&'a str>,
}

#[derive(serde::Deserialize)]
struct Answer {
    allow: bool,
    #[serde(default)]
    acl: Option<Vec<String>>,
}

impl Answer {
    fn parse(bytes: &[u8]) -> Result<CalloutAnswer, CalloutError> {
        let answer: Answer =
            serde_json::from_slice(bytes).map_err(|e| CalloutError::Body(e.to_string()))?;
        let acl = match answer.acl {
            Some(lines) if answer.allow => Some(
                Acl::parse(&lines.join("\n"))
                    .map_err(|e| CalloutError::Body(format!("acl rule {e}")))?,
            ),
            _ => None,
        };
        Ok(CalloutAnswer {
            allow: answer.allow,
            acl,
        })
    }
}

impl AuthCallout for HttpCallout {
    fn check(&self, request: AuthRequest) -> CalloutFuture {
        let this = self.clone();
        Box::pin(async move { this.post(&request).await })
    }
}

impl HttpCallout {
    async fn post(&self, request: &AuthRequest) -> Result<CalloutAnswer, CalloutError> {
        let body = Body {
            client_id: &request.client_id,
            username: request.username.as_deref(),
            password: request
                .password
                .as_ref()
                .map(|p| String::from_utf8_lossy(p).into_owned()),
            peer: request.peer_addr.map(|a| a.to_string()),
            cert_identity: request.cert_identity.as_deref(),
        };
        let json = serde_json::to_vec(&body).map_err(|e| CalloutError::Body(e.to_string()))?;
        let stream = TcpStream::connect(&self.authority)
            .await
            .map_err(CalloutError::Connect)?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(CalloutError::Http)?;
        // Drives the connection; aborted when the exchange ends or this future is dropped
        // (on timeout), so a slow service never leaves a task behind.
        let _driver = AbortOnDrop(tokio::spawn(conn));
        let req = Request::post(self.path.as_str())
            .header(HOST, self.authority.as_str())
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(json)))
            .map_err(|e| CalloutError::Body(e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(CalloutError::Http)?;
        let status = resp.status().as_u16();
        let bytes = Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| CalloutError::Body(e.to_string()))?
            .to_bytes();
        if status != 200 {
            return Err(CalloutError::Status(status));
        }
        Answer::parse(&bytes)
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_parsed_with_their_rules() {
        let a = Answer::parse(br#"{"allow": false}"#).expect("answer");
        assert_eq!((a.allow, a.acl), (false, None));
        let a =
            Answer::parse(br#"{"allow": true, "acl": ["allow publish a/%c"]}"#).expect("answer");
        assert!(a.allow);
        assert_eq!(a.acl.map(|acl| acl.len()), Some(1));
        let e = Answer::parse(br#"{"allow": true, "acl": ["allow publish a", "nonsense"]}"#)
            .expect_err("bad rule");
        assert!(e.to_string().contains("line 2"), "{e}");
        assert!(Answer::parse(b"yes").is_err());
        assert!(Answer::parse(br#"{"allowed": true}"#).is_err());
    }

    #[test]
    fn urls_are_checked() {
        let c = HttpCallout::new("http://auth.local:8080/mqtt/auth").expect("url");
        assert_eq!(c.authority, "auth.local:8080");
        assert_eq!(c.path, "/mqtt/auth");
        let c = HttpCallout::new("http://127.0.0.1").expect("url");
        assert_eq!(c.authority, "127.0.0.1:80");
        assert_eq!(c.path, "/");
        for bad in [
            "https://x/",
            "ftp://x",
            "http:///p",
            "http://u@x/",
            "http://x:port/",
        ] {
            assert!(HttpCallout::new(bad).is_err(), "{bad}");
        }
    }
}
