//! SCRAM (RFC 5802, with SHA-256 per RFC 7677 and SHA-512) for MQTT 5 enhanced authentication:
//! the Authentication Method is `SCRAM-SHA-256` or `SCRAM-SHA-512`, the Authentication Data of
//! CONNECT is the client-first message, the server answers AUTH 0x18 with its server-first
//! message, the client's AUTH carries client-final, and CONNACK carries server-final.
//!
//! The server stores, per user and mechanism, the salt, the iteration count and the two keys
//! derived from the password (`StoredKey`, `ServerKey`), never the password: the credentials
//! file (`auth.scram_file`, written by `raftmq passwd --scram`) has one `user:credentials`
//! line per user, the credentials being one or more space-separated entries in the format of
//! RFC 5803, `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64). The server
//! side of an exchange does two HMACs and a hash: no key derivation.
//!
//! Not supported: channel binding (`p=` in the GS2 header is refused; `y` and `n` are
//! accepted), an authorization identity different from the user, and SASLprep: user names and
//! passwords are compared as UTF-8 bytes (ASCII ones are unaffected).
//!
//! Primitives: `ring` (HMAC, SHA-2, PBKDF2, random nonces; the broker already links it for
//! TLS), `subtle` for the constant-time comparison, `base64`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use raftmq_codec::ReasonCode;
use raftmq_core::auth::{AuthExchange, ExchangeStep, Principal};
use ring::rand::SecureRandom as _;
use ring::{digest, hmac, pbkdf2};
use std::num::NonZeroU32;
use std::sync::Arc;
use subtle::ConstantTimeEq as _;

use super::passwd::{PasswdError, PasswordFile};

/// Iterations `raftmq passwd --scram` uses (RFC 7677's minimum; the client pays them at each
/// connection, the server never does).
pub const DEFAULT_ITERATIONS: u32 = 4096;
/// Fewest iterations accepted in a credentials file.
pub const MIN_ITERATIONS: u32 = 4096;
/// Most iterations accepted (a client must be able to afford them).
pub const MAX_ITERATIONS: u32 = 10_000_000;

/// A SCRAM hash function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    Sha256,
    Sha512,
}

impl Mechanism {
    pub const ALL: [Mechanism; 2] = [Mechanism::Sha256, Mechanism::Sha512];

    /// The MQTT Authentication Method (the SASL mechanism name).
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Sha256 => "SCRAM-SHA-256",
            Mechanism::Sha512 => "SCRAM-SHA-512",
        }
    }

    /// The mechanism named `name`.
    pub fn from_name(name: &str) -> Option<Mechanism> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    fn hmac(self) -> hmac::Algorithm {
        match self {
            Mechanism::Sha256 => hmac::HMAC_SHA256,
            Mechanism::Sha512 => hmac::HMAC_SHA512,
        }
    }

    fn digest(self) -> &'static digest::Algorithm {
        match self {
            Mechanism::Sha256 => &digest::SHA256,
            Mechanism::Sha512 => &digest::SHA512,
        }
    }

    fn pbkdf2(self) -> pbkdf2::Algorithm {
        match self {
            Mechanism::Sha256 => pbkdf2::PBKDF2_HMAC_SHA256,
            Mechanism::Sha512 => pbkdf2::PBKDF2_HMAC_SHA512,
        }
    }

    fn len(self) -> usize {
        self.digest().output_len()
    }

    fn mac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        hmac::sign(&hmac::Key::new(self.hmac(), key), data)
            .as_ref()
            .to_vec()
    }

    fn hash(self, data: &[u8]) -> Vec<u8> {
        digest::digest(self.digest(), data).as_ref().to_vec()
    }

    /// `SaltedPassword` (RFC 5802 §3: `Hi(password, salt, i)`, i.e. PBKDF2).
    fn salted_password(self, password: &[u8], salt: &[u8], iterations: NonZeroU32) -> Vec<u8> {
        let mut out = vec![0; self.len()];
        pbkdf2::derive(self.pbkdf2(), iterations, salt, password, &mut out);
        out
    }
}

/// What the server keeps of one user's password for one mechanism.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credential {
    pub mechanism: Mechanism,
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

impl Credential {
    /// Derives the stored credential from a password (what `raftmq passwd --scram` does).
    pub fn derive(mechanism: Mechanism, password: &[u8], salt: &[u8], iterations: u32) -> Self {
        let i = NonZeroU32::new(iterations).unwrap_or(NonZeroU32::MIN);
        let salted = mechanism.salted_password(password, salt, i);
        let client_key = mechanism.mac(&salted, b"Client Key");
        Credential {
            mechanism,
            iterations: i.get(),
            salt: salt.to_vec(),
            stored_key: mechanism.hash(&client_key),
            server_key: mechanism.mac(&salted, b"Server Key"),
        }
    }

    /// Derives with a fresh random 16-byte salt and [`DEFAULT_ITERATIONS`].
    pub fn generate(mechanism: Mechanism, password: &[u8]) -> Result<Self, String> {
        let mut salt = [0u8; 16];
        ring::rand::SystemRandom::new()
            .fill(&mut salt)
            .map_err(|_| "no randomness for the salt".to_owned())?;
        Ok(Self::derive(mechanism, password, &salt, DEFAULT_ITERATIONS))
    }

    /// RFC 5803 text: `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn to_text(&self) -> String {
        format!(
            "{}${}:{}${}:{}",
            self.mechanism.name(),
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(&self.stored_key),
            B64.encode(&self.server_key)
        )
    }

    /// Parses [`Self::to_text`]'s format.
    pub fn parse(text: &str) -> Result<Credential, String> {
        let mut parts = text.split('$');
        let (Some(name), Some(salting), Some(keys), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(
                "expected `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`".into(),
            );
        };
        let mechanism = Mechanism::from_name(name).ok_or_else(|| {
            format!("unknown mechanism `{name}`: expected SCRAM-SHA-256 or SCRAM-SHA-512")
        })?;
        let (iterations, salt) = salting
            .split_once(':')
            .ok_or("expected `<iterations>:<salt>`")?;
        let iterations: u32 = iterations
            .parse()
            .map_err(|_| format!("iterations `{iterations}`: not a number"))?;
        if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&iterations) {
            return Err(format!(
                "iterations {iterations}: must be between {MIN_ITERATIONS} and {MAX_ITERATIONS}"
            ));
        }
        let decode = |what: &str, s: &str| {
            B64.decode(s)
                .map_err(|e| format!("{what}: not base64 ({e})"))
        };
        let salt = decode("salt", salt)?;
        if salt.is_empty() {
            return Err("the salt is empty".into());
        }
        let (stored, server) = keys
            .split_once(':')
            .ok_or("expected `<StoredKey>:<ServerKey>`")?;
        let stored_key = decode("StoredKey", stored)?;
        let server_key = decode("ServerKey", server)?;
        if stored_key.len() != mechanism.len() || server_key.len() != mechanism.len() {
            return Err(format!(
                "{} keys are {} bytes long",
                mechanism.name(),
                mechanism.len()
            ));
        }
        Ok(Credential {
            mechanism,
            iterations,
            salt,
            stored_key,
            server_key,
        })
    }
}

/// Parses the credentials of one user (space-separated [`Credential`]s, at most one per
/// mechanism).
pub fn parse_credentials(text: &str) -> Result<Vec<Credential>, String> {
    let mut out: Vec<Credential> = Vec::new();
    for word in text.split_whitespace() {
        let c = Credential::parse(word)?;
        if out.iter().any(|o| o.mechanism == c.mechanism) {
            return Err(format!("{} appears twice", c.mechanism.name()));
        }
        out.push(c);
    }
    if out.is_empty() {
        return Err("no credentials".into());
    }
    Ok(out)
}

/// Formats the credentials of one user for the file.
pub fn format_credentials(credentials: &[Credential]) -> String {
    credentials
        .iter()
        .map(Credential::to_text)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Parses a SCRAM credentials file (`user:credentials` lines, see the module documentation).
pub fn parse_file(text: &str) -> Result<PasswordFile, PasswdError> {
    PasswordFile::parse_with(text, |value| parse_credentials(value).map(|_| ()))
}

/// The parsed credentials of every user, as the server uses them.
#[derive(Debug, Default)]
pub struct ScramStore {
    users: ahash::HashMap<String, Vec<Credential>>,
    /// Key of the stand-in salts given for unknown users (random per process), so that an
    /// unknown user gets the same answer each time and cannot be told from a known one before
    /// the proof fails.
    decoy_key: Vec<u8>,
}

impl ScramStore {
    /// Parses a credentials file.
    pub fn parse(text: &str) -> Result<ScramStore, PasswdError> {
        let file = parse_file(text)?;
        let mut users = ahash::HashMap::default();
        for (user, value) in file.entries() {
            // Checked by `parse_file`.
            if let Ok(c) = parse_credentials(value) {
                users.insert(user.to_owned(), c);
            }
        }
        let mut decoy_key = vec![0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut decoy_key)
            .map_err(|_| PasswdError {
                line: 0,
                message: "no randomness".into(),
            })?;
        Ok(ScramStore { users, decoy_key })
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether there are no users.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    fn lookup(&self, mechanism: Mechanism, user: &str) -> Option<&Credential> {
        self.users
            .get(user)?
            .iter()
            .find(|c| c.mechanism == mechanism)
    }

    /// A credential no password matches, with a salt that depends only on `user`.
    fn decoy(&self, mechanism: Mechanism, user: &str) -> Credential {
        let salt = Mechanism::Sha256.mac(&self.decoy_key, user.as_bytes());
        let mut keys = Mechanism::Sha512.mac(&self.decoy_key, b"decoy keys");
        keys.truncate(mechanism.len());
        Credential {
            mechanism,
            iterations: DEFAULT_ITERATIONS,
            salt: salt[..16].to_vec(),
            // A StoredKey that is a hash output nobody knows the input of.
            stored_key: keys.clone(),
            server_key: keys,
        }
    }
}

/// Why an exchange failed (logged at debug level; the client only sees the reason code).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported")]
    ChannelBinding,
    #[error("an authorization identity is not supported")]
    AuthzId,
    #[error("the nonce does not continue the server's")]
    Nonce,
    #[error("the client proof is wrong")]
    Proof,
}

enum State {
    /// Waiting for client-first.
    Start,
    /// Sent server-first; waiting for client-final.
    SentFirst {
        user: String,
        known: bool,
        credential: Credential,
        /// client-first-bare "," server-first, the start of the AuthMessage.
        messages: String,
        nonce: String,
        gs2_header: String,
    },
    Done,
}

/// The server's side of one SCRAM exchange.
pub struct ServerExchange {
    mechanism: Mechanism,
    store: Arc<ScramStore>,
    client_id: String,
    /// The server's part of the nonce (fixed only by tests).
    server_nonce: Option<String>,
    state: State,
}

impl ServerExchange {
    pub fn new(mechanism: Mechanism, store: Arc<ScramStore>, client_id: &str) -> Self {
        ServerExchange {
            mechanism,
            store,
            client_id: client_id.to_owned(),
            server_nonce: None,
            state: State::Start,
        }
    }

    /// Uses `nonce` as the server's nonce part (test vectors).
    pub fn with_server_nonce(mut self, nonce: &str) -> Self {
        self.server_nonce = Some(nonce.to_owned());
        self
    }

    /// Answers client-first with server-first.
    pub fn server_first(&mut self, client_first: &[u8]) -> Result<String, ScramError> {
        let text = std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("UTF-8"))?;
        // gs2-header: cbind-flag "," [authzid] ","
        let mut parts = text.splitn(3, ',');
        let (Some(cbind), Some(authzid), Some(bare)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(ScramError::Malformed("GS2 header"));
        };
        match cbind {
            "n" | "y" => {}
            c if c.starts_with("p=") => return Err(ScramError::ChannelBinding),
            _ => return Err(ScramError::Malformed("channel binding flag")),
        }
        if !authzid.is_empty() {
            return Err(ScramError::AuthzId);
        }
        let mut attrs = bare.split(',');
        if bare.starts_with("m=") {
            return Err(ScramError::Malformed("mandatory extension"));
        }
        let user = attrs
            .next()
            .and_then(|a| a.strip_prefix("n="))
            .ok_or(ScramError::Malformed("user name"))?;
        let user = decode_saslname(user).ok_or(ScramError::Malformed("user name"))?;
        let client_nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .filter(|n| valid_nonce(n))
            .ok_or(ScramError::Malformed("nonce"))?;
        let server_nonce = match &self.server_nonce {
            Some(n) => n.clone(),
            None => random_nonce(),
        };
        let nonce = format!("{client_nonce}{server_nonce}");
        let (credential, known) = match self.store.lookup(self.mechanism, &user) {
            Some(c) => (c.clone(), true),
            None => (self.store.decoy(self.mechanism, &user), false),
        };
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&credential.salt),
            credential.iterations
        );
        self.state = State::SentFirst {
            user,
            known,
            credential,
            messages: format!("{bare},{server_first}"),
            nonce,
            gs2_header: format!("{cbind},{authzid},"),
        };
        Ok(server_first)
    }

    /// Checks client-final; answers server-final and the authenticated user.
    pub fn server_final(&mut self, client_final: &[u8]) -> Result<(String, String), ScramError> {
        let State::SentFirst {
            user,
            known,
            credential,
            messages,
            nonce,
            gs2_header,
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(ScramError::Malformed("unexpected message"));
        };
        let text = std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("UTF-8"))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("proof"))?;
        let mut attrs = without_proof.split(',');
        let binding = attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or(ScramError::Malformed("channel binding"))?;
        if B64.decode(binding).ok().as_deref() != Some(gs2_header.as_bytes()) {
            return Err(ScramError::ChannelBinding);
        }
        let their_nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(ScramError::Malformed("nonce"))?;
        if their_nonce != nonce {
            return Err(ScramError::Nonce);
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| ScramError::Malformed("proof"))?;
        let m = credential.mechanism;
        if proof.len() != m.len() {
            return Err(ScramError::Proof);
        }
        let auth_message = format!("{messages},{without_proof}");
        let client_signature = m.mac(&credential.stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof
            .iter()
            .zip(&client_signature)
            .map(|(p, s)| p ^ s)
            .collect();
        let matches: bool = m.hash(&client_key).ct_eq(&credential.stored_key).into();
        if !(matches && known) {
            return Err(ScramError::Proof);
        }
        let server_signature = m.mac(&credential.server_key, auth_message.as_bytes());
        Ok((user, format!("v={}", B64.encode(server_signature))))
    }
}

impl AuthExchange for ServerExchange {
    fn step(&mut self, data: Option<&[u8]>) -> ExchangeStep {
        let data = data.unwrap_or_default();
        let failed = |e: ScramError| {
            tracing::debug!("SCRAM authentication failed: {e}");
            ExchangeStep::Failure(ReasonCode::NOT_AUTHORIZED)
        };
        match self.state {
            State::Start => match self.server_first(data) {
                Ok(first) => ExchangeStep::Continue(Bytes::from(first)),
                Err(e) => failed(e),
            },
            State::SentFirst { .. } => match self.server_final(data) {
                Ok((user, last)) => ExchangeStep::Success {
                    principal: Principal {
                        username: Some(user),
                        client_id: self.client_id.clone(),
                        acl: None,
                        valid_until: None,
                    },
                    data: Some(Bytes::from(last)),
                },
                Err(e) => failed(e),
            },
            State::Done => failed(ScramError::Malformed("exchange already finished")),
        }
    }
}

/// Printable ASCII except `,` (RFC 5802 §7).
fn valid_nonce(n: &str) -> bool {
    !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

fn random_nonce() -> String {
    let mut bytes = [0u8; 18];
    // Without randomness the nonce is still unique to nothing: fail closed with a nonce no
    // client will continue (the exchange then fails at the nonce check).
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        return ",".to_owned();
    }
    B64.encode(bytes)
}

/// `saslname` with `=2C` and `=3D` decoded; `None` for any other `=` or an empty name.
fn decode_saslname(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 3)?;
        out.push(match code {
            "2C" => ',',
            "3D" => '=',
            _ => return None,
        });
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    (!out.is_empty()).then_some(out)
}

/// `user` as a `saslname` (`,` and `=` escaped).
pub fn encode_saslname(user: &str) -> String {
    user.replace('=', "=3D").replace(',', "=2C")
}

/// The client's side of an exchange: for tests and tools (the broker never uses it).
pub struct ClientExchange {
    mechanism: Mechanism,
    password: Vec<u8>,
    first_bare: String,
    nonce: String,
    server_signature: Option<Vec<u8>>,
}

impl ClientExchange {
    /// Starts an exchange as `user` with the client nonce `nonce` (printable, no `,`).
    pub fn new(mechanism: Mechanism, user: &str, password: &[u8], nonce: &str) -> Self {
        ClientExchange {
            mechanism,
            password: password.to_vec(),
            first_bare: format!("n={},r={nonce}", encode_saslname(user)),
            nonce: nonce.to_owned(),
            server_signature: None,
        }
    }

    /// client-first (GS2 header `n,,`: no channel binding).
    pub fn client_first(&self) -> String {
        format!("n,,{}", self.first_bare)
    }

    /// Answers server-first with client-final.
    pub fn client_final(&mut self, server_first: &[u8]) -> Result<String, String> {
        let text = std::str::from_utf8(server_first).map_err(|e| e.to_string())?;
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for attr in text.split(',') {
            match attr.split_at_checked(2) {
                Some(("r=", v)) => nonce = Some(v),
                Some(("s=", v)) => salt = Some(B64.decode(v).map_err(|e| e.to_string())?),
                Some(("i=", v)) => iterations = v.parse::<u32>().ok(),
                _ => {}
            }
        }
        let (Some(nonce), Some(salt), Some(iterations)) = (nonce, salt, iterations) else {
            return Err(format!("incomplete server-first `{text}`"));
        };
        if !nonce.starts_with(&self.nonce) {
            return Err("the server's nonce does not extend ours".into());
        }
        let m = self.mechanism;
        let i = NonZeroU32::new(iterations).ok_or("zero iterations")?;
        let salted = m.salted_password(&self.password, &salt, i);
        let client_key = m.mac(&salted, b"Client Key");
        let stored_key = m.hash(&client_key);
        let without_proof = format!("c={},r={nonce}", B64.encode("n,,"));
        let auth_message = format!("{},{text},{without_proof}", self.first_bare);
        let signature = m.mac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&signature)
            .map(|(k, s)| k ^ s)
            .collect();
        let server_key = m.mac(&salted, b"Server Key");
        self.server_signature = Some(m.mac(&server_key, auth_message.as_bytes()));
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Whether server-final proves the server knows the credentials.
    pub fn verify_server_final(&self, server_final: &[u8]) -> bool {
        let Some(expected) = &self.server_signature else {
            return false;
        };
        let Some(v) = server_final.strip_prefix(b"v=") else {
            return false;
        };
        B64.decode(v).ok().as_ref() == Some(expected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 7677 §3: SCRAM-SHA-256, user "user", password "pencil".
    const CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                                p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc7677_store() -> Arc<ScramStore> {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").expect("base64");
        let c = Credential::derive(Mechanism::Sha256, b"pencil", &salt, 4096);
        let text = format!("user:{}\n", c.to_text());
        Arc::new(ScramStore::parse(&text).expect("valid file"))
    }

    #[test]
    fn server_reproduces_the_rfc_7677_exchange() {
        let mut server = ServerExchange::new(Mechanism::Sha256, rfc7677_store(), "c1")
            .with_server_nonce(SERVER_NONCE);
        assert_eq!(
            server.server_first(CLIENT_FIRST.as_bytes()).as_deref(),
            Ok(SERVER_FIRST)
        );
        let (user, last) = server
            .server_final(CLIENT_FINAL.as_bytes())
            .expect("the RFC's proof is accepted");
        assert_eq!(user, "user");
        assert_eq!(last, SERVER_FINAL);
    }

    #[test]
    fn client_reproduces_the_rfc_7677_exchange() {
        let mut client =
            ClientExchange::new(Mechanism::Sha256, "user", b"pencil", "rOprNGfwEbeRWgbNEkqO");
        assert_eq!(client.client_first(), CLIENT_FIRST);
        assert_eq!(
            client.client_final(SERVER_FIRST.as_bytes()).as_deref(),
            Ok(CLIENT_FINAL)
        );
        assert!(client.verify_server_final(SERVER_FINAL.as_bytes()));
        assert!(!client.verify_server_final(b"v=AAAA"));
    }

    #[test]
    fn both_mechanisms_round_trip_and_a_wrong_password_fails() {
        for m in Mechanism::ALL {
            let c = Credential::generate(m, b"s3cret").expect("salt");
            assert_eq!(Credential::parse(&c.to_text()), Ok(c.clone()));
            let store =
                Arc::new(ScramStore::parse(&format!("alice:{}\n", c.to_text())).expect("file"));
            for (password, ok) in [(&b"s3cret"[..], true), (b"s3cret!", false)] {
                let mut server = ServerExchange::new(m, store.clone(), "c");
                let mut client = ClientExchange::new(m, "alice", password, "abc");
                let first = server
                    .server_first(client.client_first().as_bytes())
                    .expect("server-first");
                let last = client.client_final(first.as_bytes()).expect("client-final");
                match server.server_final(last.as_bytes()) {
                    Ok((user, server_final)) => {
                        assert!(ok, "{m:?}: a wrong password was accepted");
                        assert_eq!(user, "alice");
                        assert!(client.verify_server_final(server_final.as_bytes()));
                    }
                    Err(e) => {
                        assert!(!ok, "{m:?}: {e}");
                        assert_eq!(e, ScramError::Proof);
                    }
                }
            }
        }
    }

    #[test]
    fn unknown_users_get_a_stable_decoy_salt_and_fail_at_the_proof() {
        let store = rfc7677_store();
        let first = |user: &str| {
            let mut s =
                ServerExchange::new(Mechanism::Sha256, store.clone(), "c").with_server_nonce("x");
            s.server_first(format!("n,,n={user},r=abc").as_bytes())
                .expect("answered like a known user")
        };
        assert_eq!(first("mallory"), first("mallory"));
        assert_ne!(first("mallory"), first("eve"));
        let mut server = ServerExchange::new(Mechanism::Sha256, store.clone(), "c");
        let mut client = ClientExchange::new(Mechanism::Sha256, "mallory", b"pencil", "abc");
        let f = server
            .server_first(client.client_first().as_bytes())
            .expect("first");
        let last = client.client_final(f.as_bytes()).expect("final");
        assert_eq!(server.server_final(last.as_bytes()), Err(ScramError::Proof));
        // A user with credentials for the other mechanism only is unknown to this one.
        let mut server = ServerExchange::new(Mechanism::Sha512, store, "c");
        let mut client = ClientExchange::new(Mechanism::Sha512, "user", b"pencil", "abc");
        let f = server
            .server_first(client.client_first().as_bytes())
            .expect("first");
        let last = client.client_final(f.as_bytes()).expect("final");
        assert_eq!(server.server_final(last.as_bytes()), Err(ScramError::Proof));
    }

    #[test]
    fn malformed_and_unsupported_messages_are_refused_without_panicking() {
        let store = rfc7677_store();
        for (client_first, want) in [
            ("", ScramError::Malformed("GS2 header")),
            ("n,,", ScramError::Malformed("user name")),
            ("n,,n=user", ScramError::Malformed("nonce")),
            ("n,,n=us=41r,r=abc", ScramError::Malformed("user name")),
            ("n,,n=user,r=a b", ScramError::Malformed("nonce")),
            ("p=tls-unique,,n=user,r=abc", ScramError::ChannelBinding),
            ("n,a=admin,n=user,r=abc", ScramError::AuthzId),
            (
                "x,,n=user,r=abc",
                ScramError::Malformed("channel binding flag"),
            ),
            (
                "n,,m=ext,n=user,r=abc",
                ScramError::Malformed("mandatory extension"),
            ),
        ] {
            let mut s = ServerExchange::new(Mechanism::Sha256, store.clone(), "c");
            assert_eq!(
                s.server_first(client_first.as_bytes()),
                Err(want),
                "{client_first}"
            );
        }
        let final_of = |client_final: &str| {
            let mut s = ServerExchange::new(Mechanism::Sha256, store.clone(), "c")
                .with_server_nonce(SERVER_NONCE);
            s.server_first(CLIENT_FIRST.as_bytes()).expect("first");
            s.server_final(client_final.as_bytes())
        };
        assert_eq!(final_of("c=biws,r=x"), Err(ScramError::Malformed("proof")));
        assert_eq!(
            final_of(&CLIENT_FINAL.replace("c=biws", "c=eSws")),
            Err(ScramError::ChannelBinding)
        );
        assert_eq!(
            final_of(&CLIENT_FINAL.replace("$k0,", "$k1,")),
            Err(ScramError::Nonce)
        );
        assert_eq!(
            final_of(&CLIENT_FINAL.replace("p=dHz", "p=eHz")),
            Err(ScramError::Proof)
        );
        assert_eq!(final_of("c=biws,r=x,p=???"), Err(ScramError::Nonce));
        // A step after the end fails instead of starting over.
        let mut s = ServerExchange::new(Mechanism::Sha256, store, "c");
        assert!(matches!(s.step(Some(b"garbage")), ExchangeStep::Failure(_)));
        assert!(matches!(s.step(Some(b"garbage")), ExchangeStep::Failure(_)));
    }

    #[test]
    fn credentials_file_lines_are_checked() {
        let c = Credential::generate(Mechanism::Sha256, b"pw").expect("salt");
        let d = Credential::generate(Mechanism::Sha512, b"pw").expect("salt");
        let ok = format!("# comment\nalice:{} {}\n", c.to_text(), d.to_text());
        assert_eq!(ScramStore::parse(&ok).expect("valid").len(), 1);
        for (bad, needle) in [
            (format!("alice:{} {}\n", c.to_text(), c.to_text()), "twice"),
            (
                "alice:SCRAM-SHA-1$4096:YQ==$YQ==:YQ==\n".to_owned(),
                "unknown mechanism",
            ),
            (
                "alice:SCRAM-SHA-256$10:YQ==$YQ==:YQ==\n".to_owned(),
                "iterations",
            ),
            (
                "alice:SCRAM-SHA-256$4096:YQ==$YQ==:YQ==\n".to_owned(),
                "32 bytes",
            ),
            (
                "alice:$argon2id$v=19$m=1,t=1,p=1$x$y\n".to_owned(),
                "line 1",
            ),
        ] {
            let err = ScramStore::parse(&bad).expect_err("refused").to_string();
            assert!(err.contains(needle), "{err}");
        }
    }
}
