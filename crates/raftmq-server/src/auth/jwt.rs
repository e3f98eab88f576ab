//! JSON Web Tokens as CONNECT passwords: HS256/384/512 with a shared secret
//! (`auth.jwt_secret_file`) and RS256/384/512, PS256/384/512, ES256/384 and EdDSA with the
//! public keys of a JWKS document (`auth.jwt_jwks_file`).
//!
//! The header's `alg` picks the key set: an HMAC algorithm only ever meets the secret, any other
//! only the JWKS keys (whose family, and `alg` when the key states one, must match), so a token
//! signed with HMAC over a public key is refused. `none` is not an algorithm the library knows:
//! such a token fails to parse. `exp` is required; `exp` and `nbf` are checked with
//! `auth.jwt_leeway`; `aud` and `iss` when configured. Signature checks are done by the
//! `jsonwebtoken` crate (ring underneath).

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use raftmq_core::acl::Acl;
use serde_json::Value;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The shared secret of the HMAC algorithms.
pub struct JwtSecret(DecodingKey);

impl std::fmt::Debug for JwtSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwtSecret(..)")
    }
}

/// Fewest bytes accepted in a secret file (RFC 7518 §3.2: a key at least as long as the hash
/// output; 32 bytes for HS256).
pub const MIN_SECRET_LEN: usize = 32;

impl JwtSecret {
    /// The secret is the file's bytes without trailing white space (a final newline).
    pub fn parse(bytes: &[u8]) -> Result<JwtSecret, String> {
        let end = bytes
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        let secret = &bytes[..end];
        if secret.len() < MIN_SECRET_LEN {
            return Err(format!(
                "the secret has {} bytes; at least {MIN_SECRET_LEN} are needed",
                secret.len()
            ));
        }
        Ok(JwtSecret(DecodingKey::from_secret(secret)))
    }
}

/// One public key of the JWKS.
struct PublicKey {
    kid: Option<String>,
    /// The algorithm the key is restricted to, when the JWK says.
    alg: Option<Algorithm>,
    key: DecodingKey,
}

/// The public keys of a JWKS document.
pub struct Jwks(Vec<PublicKey>);

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Jwks({} keys)", self.0.len())
    }
}

impl Jwks {
    /// Parses a JWKS document (`{"keys": [...]}`). Symmetric (`oct`) keys are refused: a
    /// shared secret belongs in `auth.jwt_secret_file`.
    pub fn parse(text: &str) -> Result<Jwks, String> {
        let set: JwkSet = serde_json::from_str(text).map_err(|e| format!("not a JWKS: {e}"))?;
        let mut keys = Vec::with_capacity(set.keys.len());
        for (i, jwk) in set.keys.iter().enumerate() {
            let name = jwk
                .common
                .key_id
                .clone()
                .unwrap_or_else(|| format!("#{}", i + 1));
            if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
                return Err(format!(
                    "key {name}: symmetric keys belong in auth.jwt_secret_file"
                ));
            }
            let alg = match jwk.common.key_algorithm {
                None => None,
                Some(a) => Some(signing_algorithm(a).ok_or_else(|| {
                    format!("key {name}: `alg` {a:?} is not a signature algorithm")
                })?),
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {name}: {e}"))?;
            keys.push(PublicKey {
                kid: jwk.common.key_id.clone(),
                alg,
                key,
            });
        }
        if keys.is_empty() {
            return Err("the key set is empty".into());
        }
        Ok(Jwks(keys))
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no keys (never, once parsed).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn signing_algorithm(a: KeyAlgorithm) -> Option<Algorithm> {
    Some(match a {
        KeyAlgorithm::HS256 => Algorithm::HS256,
        KeyAlgorithm::HS384 => Algorithm::HS384,
        KeyAlgorithm::HS512 => Algorithm::HS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

/// How tokens are validated (from the `auth.jwt_*` settings).
#[derive(Clone, Debug)]
pub struct JwtRules {
    /// The claim naming the user (`%u` in ACL rules).
    pub username_claim: String,
    /// The claim with per-token permissions, if any.
    pub acl_claim: Option<String>,
    /// Tolerance for `exp` and `nbf`.
    pub leeway: Duration,
    /// Required `aud`, if any.
    pub audience: Option<String>,
    /// Required `iss`, if any.
    pub issuer: Option<String>,
}

/// A valid token's content.
#[derive(Debug)]
pub struct Token {
    pub username: String,
    /// The token's `exp` plus the leeway: when a connection using it is closed.
    pub valid_until: SystemTime,
    /// Permissions from the ACL claim, when configured and present.
    pub acl: Option<Acl>,
}

/// Latest expiry a connection is given (seconds since the epoch, year ~2514).
const MAX_EXP: u64 = 1 << 34;

/// Why a token was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("algorithm {0:?} has no configured key")]
    NoKey(Algorithm),
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("claim `{0}` is missing or not a non-empty string")]
    Username(String),
    #[error("claim `{claim}`: {message}")]
    Acl { claim: String, message: String },
}

/// Whether `password` has the shape of a compact JWS (three base64url parts separated by
/// dots): such a password is a token when JWT authentication is configured.
pub fn looks_like_jwt(password: &[u8]) -> bool {
    let parts: Vec<&[u8]> = password.split(|b| *b == b'.').collect();
    parts.len() == 3
        && parts[..2].iter().all(|p| !p.is_empty())
        && parts.iter().all(|p| {
            p.iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        })
}

/// Validates `token` with the secret and the JWKS keys (either may be absent).
pub fn validate(
    token: &str,
    secret: Option<&JwtSecret>,
    jwks: Option<&Jwks>,
    rules: &JwtRules,
) -> Result<Token, JwtError> {
    let header =
        jsonwebtoken::decode_header(token).map_err(|e| JwtError::Malformed(e.to_string()))?;
    let alg = header.alg;
    let mut validation = Validation::new(alg);
    validation.leeway = rules.leeway.as_secs();
    validation.validate_nbf = true;
    validation.set_required_spec_claims(&["exp"]);
    match &rules.audience {
        Some(aud) => validation.set_audience(&[aud]),
        None => validation.validate_aud = false,
    }
    if let Some(iss) = &rules.issuer {
        validation.set_issuer(&[iss]);
    }
    let hmac = matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512);
    let candidates: Vec<&DecodingKey> = if hmac {
        secret.map(|s| &s.0).into_iter().collect()
    } else {
        jwks.map_or(Vec::new(), |set| {
            set.0
                .iter()
                .filter(|k| header.kid.is_none() || k.kid == header.kid)
                .filter(|k| k.alg.is_none_or(|a| a == alg))
                .map(|k| &k.key)
                .collect()
        })
    };
    if candidates.is_empty() {
        return Err(JwtError::NoKey(alg));
    }
    let mut last = None;
    let mut claims = None;
    for key in candidates {
        match jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, key, &validation) {
            Ok(data) => {
                claims = Some(data.claims);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let Some(claims) = claims else {
        return Err(JwtError::Invalid(
            last.map_or_else(String::new, |e| e.to_string()),
        ));
    };
    let username = claims
        .get(&rules.username_claim)
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
        .ok_or_else(|| JwtError::Username(rules.username_claim.clone()))?
        .to_owned();
    // Checked by the validation: present and a number.
    let exp = claims.get("exp").and_then(Value::as_f64).unwrap_or(0.0);
    // Saturating, and capped at year ~2514: a huge `exp` must not overflow the clock types.
    let until = (exp.max(0.0) as u64).saturating_add(rules.leeway.as_secs());
    let valid_until = UNIX_EPOCH + Duration::from_secs(until.min(MAX_EXP));
    let acl = match &rules.acl_claim {
        Some(name) => match claims.get(name) {
            None => None,
            Some(value) => Some(acl_from_claim(value).map_err(|message| JwtError::Acl {
                claim: name.clone(),
                message,
            })?),
        },
        None => None,
    };
    Ok(Token {
        username,
        valid_until,
        acl,
    })
}

/// `{"pub": [filters], "sub": [filters]}` as an ACL (a missing list allows nothing).
fn acl_from_claim(value: &Value) -> Result<Acl, String> {
    let Value::Object(map) = value else {
        return Err("expected an object {\"pub\": [...], \"sub\": [...]}".into());
    };
    if let Some(other) = map.keys().find(|k| *k != "pub" && *k != "sub") {
        return Err(format!("unknown key `{other}`: expected `pub` or `sub`"));
    }
    let list = |key: &str| -> Result<Vec<&str>, String> {
        match map.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| {
                    i.as_str()
                        .ok_or_else(|| format!("`{key}`: every filter must be a string"))
                })
                .collect(),
            Some(_) => Err(format!("`{key}` must be a list of topic filters")),
        }
    };
    let (publish, subscribe) = (list("pub")?, list("sub")?);
    Acl::from_permissions(&publish, &subscribe).map_err(|e| e.to_string())
}

/// Seconds since the epoch, for tests and token makers.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
pub(crate) mod testing {
    //! Keys and tokens made by the tests themselves.
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    use serde_json::{Value, json};

    /// A random secret made by the test (ring's generator; base64 text, as the docs
    /// recommend, so that no trailing byte is white space): nothing checked in.
    pub fn secret() -> Vec<u8> {
        use ring::rand::SecureRandom as _;
        let mut s = vec![0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut s)
            .expect("random");
        B64URL.encode(s).into_bytes()
    }

    /// A fresh P-256 key pair: (PKCS#8 for signing, its public JWK).
    pub fn ec_key(kid: &str) -> (Vec<u8>, Value) {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let public = pair.public_key_raw();
        // Uncompressed point: 0x04 || x || y.
        assert_eq!(public.len(), 65);
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256",
            "x": B64URL.encode(&public[1..33]), "y": B64URL.encode(&public[33..]),
        });
        (pair.serialize_der(), jwk)
    }

    pub fn es256(pkcs8: &[u8], kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = kid.map(str::to_owned);
        encode(&header, claims, &EncodingKey::from_ec_der(pkcs8)).expect("encode")
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{ec_key, es256, secret};
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use raftmq_codec::QoS;
    use raftmq_core::auth::{Access, Principal};
    use serde_json::json;

    fn rules() -> JwtRules {
        JwtRules {
            username_claim: "sub".into(),
            acl_claim: Some("mqtt".into()),
            leeway: Duration::ZERO,
            audience: None,
            issuer: None,
        }
    }

    fn hs(alg: Algorithm, key: &[u8], claims: &Value) -> String {
        encode(&Header::new(alg), claims, &EncodingKey::from_secret(key)).expect("encode")
    }

    fn in_secs(secs: i64) -> u64 {
        unix_now().saturating_add_signed(secs)
    }

    #[test]
    fn hmac_tokens_validate_with_the_secret_only() {
        let key = secret();
        let s = JwtSecret::parse(&key).expect("secret");
        let claims = json!({"sub": "alice", "exp": in_secs(60)});
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let t = validate(&hs(alg, &key, &claims), Some(&s), None, &rules()).expect("valid");
            assert_eq!(t.username, "alice");
            assert!(t.valid_until > SystemTime::now());
            assert!(t.acl.is_none());
        }
        // Wrong key.
        let other = JwtSecret::parse(&secret()).expect("secret");
        let token = hs(Algorithm::HS256, &key, &claims);
        assert!(matches!(
            validate(&token, Some(&other), None, &rules()),
            Err(JwtError::Invalid(_))
        ));
        // No secret configured: an HMAC token has no key.
        assert_eq!(
            validate(&token, None, None, &rules()).map(|t| t.username),
            Err(JwtError::NoKey(Algorithm::HS256))
        );
        // A secret too short to be one.
        assert!(JwtSecret::parse(b"short\n").is_err());
    }

    #[test]
    fn expired_not_yet_valid_and_exp_less_tokens_are_refused() {
        let key = secret();
        let s = JwtSecret::parse(&key).expect("secret");
        let check = |claims: Value, rules: &JwtRules| {
            validate(&hs(Algorithm::HS256, &key, &claims), Some(&s), None, rules)
        };
        let expired = json!({"sub": "a", "exp": in_secs(-30)});
        let err = check(expired.clone(), &rules()).expect_err("expired");
        assert!(err.to_string().contains("Expired"), "{err}");
        let generous = JwtRules {
            leeway: Duration::from_secs(60),
            ..rules()
        };
        check(expired, &generous).expect("within the leeway");
        let early = json!({"sub": "a", "exp": in_secs(600), "nbf": in_secs(300)});
        let err = check(early, &rules()).expect_err("not yet valid");
        assert!(err.to_string().contains("Immature"), "{err}");
        let far = check(json!({"sub": "a", "exp": u64::MAX}), &generous).expect("far future");
        assert_eq!(far.valid_until, UNIX_EPOCH + Duration::from_secs(MAX_EXP));
        let forever = json!({"sub": "a"});
        assert!(check(forever, &rules()).is_err(), "exp is required");
        let nameless = json!({"name": "a", "exp": in_secs(60)});
        assert_eq!(
            check(nameless, &rules()).map(|t| t.username),
            Err(JwtError::Username("sub".into()))
        );
        let other_claim = JwtRules {
            username_claim: "name".into(),
            ..rules()
        };
        let named = json!({"name": "bob", "exp": in_secs(60)});
        assert_eq!(check(named, &other_claim).expect("valid").username, "bob");
        let audience = JwtRules {
            audience: Some("mqtt".into()),
            issuer: Some("https://idp".into()),
            ..rules()
        };
        let good = json!({"sub": "a", "exp": in_secs(60), "aud": "mqtt", "iss": "https://idp"});
        check(good, &audience).expect("audience and issuer match");
        let bad = json!({"sub": "a", "exp": in_secs(60), "aud": "web", "iss": "https://idp"});
        assert!(check(bad, &audience).is_err());
    }

    #[test]
    fn the_none_algorithm_and_garbage_are_refused() {
        let s = JwtSecret::parse(&secret()).expect("secret");
        let header = B64URL.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = B64URL.encode(json!({"sub": "a", "exp": in_secs(60)}).to_string());
        let unsigned = format!("{header}.{body}.");
        assert!(looks_like_jwt(unsigned.as_bytes()));
        assert!(matches!(
            validate(&unsigned, Some(&s), None, &rules()),
            Err(JwtError::Malformed(_))
        ));
        for garbage in ["", "a.b.c", "...", "eyJ.eyJ.sig"] {
            assert!(validate(garbage, Some(&s), None, &rules()).is_err());
        }
        assert!(!looks_like_jwt(b"hunter2"));
        assert!(!looks_like_jwt(b"a.b"));
        assert!(!looks_like_jwt(b"a b.c.d"));
    }

    #[test]
    fn jwks_keys_validate_by_kid_and_family_and_refuse_alg_confusion() {
        let (k1, jwk1) = ec_key("k1");
        let (k2, jwk2) = ec_key("k2");
        // An RSA public key (any modulus serves to verify against; nothing is signed with it).
        let modulus = B64URL.encode(secret().repeat(8));
        let rsa = json!({"kty": "RSA", "kid": "r1", "n": modulus, "e": "AQAB"});
        let text = json!({"keys": [jwk1, jwk2, rsa]}).to_string();
        let jwks = Jwks::parse(&text).expect("valid JWKS");
        assert_eq!(jwks.len(), 3);
        let claims = json!({"sub": "dev-1", "exp": in_secs(60)});
        for kid in [Some("k1"), None] {
            let t = validate(&es256(&k1, kid, &claims), None, Some(&jwks), &rules())
                .expect("signed by k1");
            assert_eq!(t.username, "dev-1");
        }
        validate(
            &es256(&k2, Some("k2"), &claims),
            None,
            Some(&jwks),
            &rules(),
        )
        .expect("k2");
        // Signed by k2 but naming k1: only k1 is tried.
        assert!(
            validate(
                &es256(&k2, Some("k1"), &claims),
                None,
                Some(&jwks),
                &rules()
            )
            .is_err()
        );
        // An unknown key.
        let (k3, _) = ec_key("k3");
        assert!(validate(&es256(&k3, None, &claims), None, Some(&jwks), &rules()).is_err());
        // Algorithm confusion: HMAC over the public key material (or the JWKS text) is never
        // checked against the JWKS keys.
        for forged_key in [text.as_bytes(), modulus.as_bytes()] {
            let mut header = Header::new(Algorithm::HS256);
            header.kid = Some("r1".into());
            let forged =
                encode(&header, &claims, &EncodingKey::from_secret(forged_key)).expect("encode");
            assert_eq!(
                validate(&forged, None, Some(&jwks), &rules()).map(|t| t.username),
                Err(JwtError::NoKey(Algorithm::HS256))
            );
        }
        // Symmetric keys and empty sets are not accepted in the JWKS file.
        let oct = json!({"keys": [{"kty": "oct", "k": B64URL.encode(secret())}]});
        assert!(Jwks::parse(&oct.to_string()).is_err());
        assert!(Jwks::parse(r#"{"keys": []}"#).is_err());
        assert!(Jwks::parse("not json").is_err());
    }

    #[test]
    fn the_acl_claim_becomes_the_connections_rules() {
        let key = secret();
        let s = JwtSecret::parse(&key).expect("secret");
        let claims = json!({
            "sub": "dev-9", "exp": in_secs(60),
            "mqtt": {"pub": ["devices/%u/#"], "sub": ["commands/%u/+", "broadcast/#"]},
        });
        let token = validate(
            &hs(Algorithm::HS256, &key, &claims),
            Some(&s),
            None,
            &rules(),
        )
        .expect("valid");
        let acl = token.acl.expect("rules from the claim");
        let me = Principal {
            username: Some("dev-9".into()),
            client_id: "c".into(),
            acl: None,
            valid_until: None,
        };
        let publish = |topic| Access::Publish {
            topic,
            qos: QoS::AtLeastOnce,
            retain: false,
        };
        let subscribe = |filter| Access::Subscribe {
            filter,
            qos: QoS::AtMostOnce,
        };
        assert!(acl.check(&me, publish("devices/dev-9/temp")));
        assert!(!acl.check(&me, publish("devices/dev-8/temp")));
        assert!(!acl.check(&me, publish("commands/dev-9/x")));
        assert!(acl.check(&me, subscribe("commands/dev-9/reboot")));
        assert!(acl.check(&me, subscribe("broadcast/#")));
        assert!(!acl.check(&me, subscribe("#")));
        for bad in [
            json!("pub"),
            json!({"pub": "a/#"}),
            json!({"pub": [1]}),
            json!({"pub": ["a/#/b"]}),
            json!({"publish": ["a"]}),
        ] {
            let claims = json!({"sub": "a", "exp": in_secs(60), "mqtt": bad});
            let err = validate(
                &hs(Algorithm::HS256, &key, &claims),
                Some(&s),
                None,
                &rules(),
            )
            .expect_err("bad claim refuses the token");
            assert!(matches!(err, JwtError::Acl { .. }), "{err}");
        }
    }
}
