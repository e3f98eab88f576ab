//! Authentication and authorization for the broker (the `[auth]` section): a password file of
//! Argon2id hashes, client-certificate identities, anonymous access, an ACL file and an HTTP
//! callout, with a cache of recent decisions. Files are reloaded when they change (or on
//! demand, e.g. SIGHUP) without touching connected clients; a bad file keeps the old one.
//!
//! [`Auth`] implements the core's synchronous [`Authenticator`] trait: what it can decide at
//! once (anonymous, certificate identity, a cached decision) it answers directly; a password
//! hash to check or a callout to make is answered with [`AuthDecision::Pending`], a future that
//! the connection task awaits. Hashing runs on the blocking pool, at most
//! `auth.max_concurrent_hashes` at a time, so a reconnect storm cannot starve the async workers.

pub mod cache;
pub mod callout;
pub mod jwt;
pub mod passwd;
pub mod scram;

use crate::metrics::{
    AUTH_CACHE_LOOKUPS_TOTAL, AUTH_CALLOUTS_TOTAL, AUTH_RELOADS_TOTAL, AUTH_TOKENS_TOTAL,
};
use cache::DecisionCache;
use callout::{AuthCallout, HttpCallout};
use jwt::{Jwks, JwtRules, JwtSecret};
use metrics::counter;
use parking_lot::{Mutex, RwLock};
use passwd::PasswordFile;
use raftmq_codec::ReasonCode;
use raftmq_core::acl::Acl;
use raftmq_core::auth::{
    Access, AuthDecision, AuthExchange, AuthRequest, Authenticator, Authorizer, ConnectInfo,
    Principal,
};
use raftmq_core::config::{ConfigProblem, DurationStr};
use scram::{Mechanism, ScramStore};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{Notify, Semaphore};
use tracing::{debug, info, warn};

/// Longest `auth.callout_timeout` (a connection waits at most this long for any decision).
pub const MAX_CALLOUT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest `auth.jwt_leeway`.
pub const MAX_JWT_LEEWAY: Duration = Duration::from_secs(300);

/// Authentication and authorization settings (the `[auth]` section).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Accept clients without a user name. Unset: allowed only when no password file and no
    /// callout are configured (a fresh install is a local development broker).
    pub allow_anonymous: Option<bool>,
    /// Password file (`username:argon2id-hash` lines, see `raftmq passwd`).
    pub password_file: Option<PathBuf>,
    /// ACL file; unset allows everything to every authenticated client.
    pub acl_file: Option<PathBuf>,
    /// Use the identity of a verified client certificate as the user name (the TLS listener
    /// provides it); such clients need no password.
    pub use_cert_identity: bool,
    /// How often the password and ACL files are checked for changes ("0s": only on SIGHUP).
    pub reload_interval: DurationStr,
    /// Most authentication decisions remembered (0 disables the cache).
    pub cache_size: usize,
    /// How long a remembered decision is reused.
    pub cache_ttl: DurationStr,
    /// Most password hashes verified at once (each takes ~20 MiB and tens of milliseconds).
    pub max_concurrent_hashes: usize,
    /// `http://host:port/path` of an external authentication service, asked about user names
    /// that are not in the password file.
    pub callout_url: Option<String>,
    /// How long the callout may take before the client is refused.
    pub callout_timeout: DurationStr,
    /// File holding the shared secret of HS256/HS384/HS512 tokens (at least 32 bytes; trailing
    /// white space is not part of it). A CONNECT password shaped like a JWT is then a token.
    pub jwt_secret_file: Option<PathBuf>,
    /// JWKS document with the public keys of RS*/PS*/ES*/EdDSA tokens.
    pub jwt_jwks_file: Option<PathBuf>,
    /// The token claim that names the user (`%u` in ACL rules).
    pub jwt_username_claim: String,
    /// The token claim with per-token permissions (`{"pub": [filters], "sub": [filters]}`);
    /// unset: tokens carry no permissions and the ACL file applies.
    pub jwt_acl_claim: Option<String>,
    /// Tolerance for the clocks of token issuers when checking `exp` and `nbf`.
    pub jwt_leeway: DurationStr,
    /// Required `aud` claim, if set.
    pub jwt_audience: Option<String>,
    /// Required `iss` claim, if set.
    pub jwt_issuer: Option<String>,
    /// SCRAM credentials file (`raftmq passwd --scram`): enables MQTT 5 enhanced
    /// authentication with the methods SCRAM-SHA-256 and SCRAM-SHA-512.
    pub scram_file: Option<PathBuf>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            allow_anonymous: None,
            password_file: None,
            acl_file: None,
            use_cert_identity: false,
            reload_interval: DurationStr(Duration::from_secs(5)),
            cache_size: 10_000,
            cache_ttl: DurationStr(Duration::from_secs(300)),
            max_concurrent_hashes: 2,
            callout_url: None,
            callout_timeout: DurationStr(Duration::from_secs(2)),
            jwt_secret_file: None,
            jwt_jwks_file: None,
            jwt_username_claim: "sub".to_owned(),
            jwt_acl_claim: None,
            jwt_leeway: DurationStr(Duration::ZERO),
            jwt_audience: None,
            jwt_issuer: None,
            scram_file: None,
        }
    }
}

impl AuthConfig {
    /// Whether clients without a user name are accepted (see [`Self::allow_anonymous`]).
    pub fn anonymous_allowed(&self) -> bool {
        self.allow_anonymous.unwrap_or(!self.has_credential_store())
    }

    /// Whether any way of checking credentials is configured (besides certificates).
    fn has_credential_store(&self) -> bool {
        self.password_file.is_some()
            || self.callout_url.is_some()
            || self.jwt_enabled()
            || self.scram_file.is_some()
    }

    /// Whether CONNECT passwords shaped like JWTs are validated as tokens.
    pub fn jwt_enabled(&self) -> bool {
        self.jwt_secret_file.is_some() || self.jwt_jwks_file.is_some()
    }

    /// Every problem with the values, keys prefixed with `prefix`.
    pub fn validate(&self, prefix: &str) -> Vec<ConfigProblem> {
        let mut out = Vec::new();
        let mut bad = |key: &str, problem: String| {
            out.push(ConfigProblem {
                key: format!("{prefix}{key}"),
                problem,
            })
        };
        if self.allow_anonymous == Some(false)
            && !self.has_credential_store()
            && !self.use_cert_identity
        {
            bad(
                "allow_anonymous",
                "false with no password_file, callout_url, jwt_secret_file, jwt_jwks_file, \
                 scram_file or use_cert_identity would refuse every client"
                    .into(),
            );
        }
        if self.jwt_username_claim.is_empty() {
            bad("jwt_username_claim", "must not be empty".into());
        }
        if self.jwt_acl_claim.as_deref() == Some("") {
            bad(
                "jwt_acl_claim",
                "must not be empty (leave it out to disable)".into(),
            );
        }
        if self.jwt_leeway.0 > MAX_JWT_LEEWAY {
            bad(
                "jwt_leeway",
                format!("at most {}s", MAX_JWT_LEEWAY.as_secs()),
            );
        }
        if let Some(url) = &self.callout_url
            && let Err(e) = HttpCallout::new(url)
        {
            bad("callout_url", e.to_string());
        }
        if self.callout_timeout.0.is_zero() || self.callout_timeout.0 > MAX_CALLOUT_TIMEOUT {
            bad(
                "callout_timeout",
                format!("must be between 1ms and {}s", MAX_CALLOUT_TIMEOUT.as_secs()),
            );
        }
        if self.max_concurrent_hashes == 0 {
            bad("max_concurrent_hashes", "must be at least 1".into());
        }
        for (key, path) in [
            ("password_file", &self.password_file),
            ("acl_file", &self.acl_file),
            ("jwt_secret_file", &self.jwt_secret_file),
            ("jwt_jwks_file", &self.jwt_jwks_file),
            ("scram_file", &self.scram_file),
        ] {
            if let Some(p) = path
                && p.as_os_str().is_empty()
            {
                bad(key, "must not be empty (leave it out to disable)".into());
            }
        }
        out
    }
}

/// A file that could not be loaded, naming its key and path.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{key}: cannot read {}: {source}", path.display())]
    Read {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{key}: {}: {message}", path.display())]
    Invalid {
        key: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error(transparent)]
    Callout(#[from] callout::CalloutError),
}

/// Modification time and length of a file as last loaded.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Reloads the file at `path` (if configured) when `force` or when it changed since `last`:
/// `load` reads and parses it, `install` puts the result in place. `None` when nothing was
/// due; a failed load keeps the previous version. Counts the attempt under `file`.
fn reload_file<T>(
    file: &'static str,
    path: Option<&Path>,
    last: &mut Stamp,
    force: bool,
    load: impl FnOnce(&Path) -> Result<T, AuthError>,
    install: impl FnOnce(&Path, T),
) -> Option<Result<(), AuthError>> {
    let path = path?;
    let now = stamp(path);
    if !force && now == *last {
        return None;
    }
    *last = now;
    let outcome = load(path).map(|loaded| install(path, loaded));
    let result = if outcome.is_ok() { "ok" } else { "error" };
    counter!(AUTH_RELOADS_TOTAL, "file" => file, "result" => result).increment(1);
    Some(outcome)
}

const PASSWORD_FILE_KEY: &str = "auth.password_file";
const ACL_FILE_KEY: &str = "auth.acl_file";
const JWT_SECRET_FILE_KEY: &str = "auth.jwt_secret_file";
const JWT_JWKS_FILE_KEY: &str = "auth.jwt_jwks_file";
const SCRAM_FILE_KEY: &str = "auth.scram_file";

fn read(key: &'static str, path: &Path) -> Result<String, AuthError> {
    std::fs::read_to_string(path).map_err(|source| AuthError::Read {
        key,
        path: path.to_owned(),
        source,
    })
}

/// Reads the file at `path` (the setting `key`) and parses it with `parse`.
fn load<T, E: std::fmt::Display>(
    key: &'static str,
    path: &Path,
    parse: impl FnOnce(&str) -> Result<T, E>,
) -> Result<T, AuthError> {
    parse(&read(key, path)?).map_err(|e| AuthError::Invalid {
        key,
        path: path.to_owned(),
        message: e.to_string(),
    })
}

fn load_passwords(path: &Path) -> Result<PasswordFile, AuthError> {
    load(PASSWORD_FILE_KEY, path, PasswordFile::parse)
}

fn load_acl(path: &Path) -> Result<Acl, AuthError> {
    load(ACL_FILE_KEY, path, Acl::parse)
}

fn load_jwt_secret(path: &Path) -> Result<JwtSecret, AuthError> {
    let key = JWT_SECRET_FILE_KEY;
    let bytes = std::fs::read(path).map_err(|source| AuthError::Read {
        key,
        path: path.to_owned(),
        source,
    })?;
    JwtSecret::parse(&bytes).map_err(|message| AuthError::Invalid {
        key,
        path: path.to_owned(),
        message,
    })
}

fn load_jwks(path: &Path) -> Result<Jwks, AuthError> {
    load(JWT_JWKS_FILE_KEY, path, Jwks::parse)
}

fn load_scram(path: &Path) -> Result<ScramStore, AuthError> {
    load(SCRAM_FILE_KEY, path, ScramStore::parse)
}

/// Loads the file at `path`, if configured.
fn load_optional<T>(
    path: Option<&Path>,
    load: impl FnOnce(&Path) -> Result<T, AuthError>,
) -> Result<Option<Arc<T>>, AuthError> {
    path.map(|p| load(p).map(Arc::new)).transpose()
}

/// Modification stamps of the files as last loaded.
#[derive(Default)]
struct Stamps {
    password: Stamp,
    acl: Stamp,
    jwt_secret: Stamp,
    jwks: Stamp,
    scram: Stamp,
}

/// The broker's authenticator and authorizer; see the module documentation.
pub struct Auth {
    config: AuthConfig,
    anonymous: bool,
    passwords: RwLock<Option<Arc<PasswordFile>>>,
    acl: RwLock<Option<Arc<Acl>>>,
    /// Whether `acl` is in `mode message` (read per batch of deliveries, without the lock).
    acl_per_message: std::sync::atomic::AtomicBool,
    jwt_secret: RwLock<Option<Arc<JwtSecret>>>,
    jwks: RwLock<Option<Arc<Jwks>>>,
    jwt_rules: JwtRules,
    scram: RwLock<Option<Arc<ScramStore>>>,
    stamps: Mutex<Stamps>,
    cache: Arc<DecisionCache>,
    hashing: Arc<Semaphore>,
    callout: Option<Arc<dyn AuthCallout>>,
    reload_now: Notify,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// Loads the configured files (an error names the file and line) and sets up the callout.
    pub fn load(config: &AuthConfig) -> Result<Auth, AuthError> {
        let callout = match &config.callout_url {
            Some(url) => Some(Arc::new(HttpCallout::new(url)?) as Arc<dyn AuthCallout>),
            None => None,
        };
        Self::with_callout(config, callout)
    }

    /// Like [`Self::load`] with another callout implementation (or none).
    pub fn with_callout(
        config: &AuthConfig,
        callout: Option<Arc<dyn AuthCallout>>,
    ) -> Result<Auth, AuthError> {
        let passwords = match &config.password_file {
            Some(p) => Some(Arc::new(load_passwords(p)?)),
            None => None,
        };
        let acl = match &config.acl_file {
            Some(p) => Some(Arc::new(load_acl(p)?)),
            None => None,
        };
        let acl_per_message = acl.as_deref().is_some_and(per_message);
        let jwt_secret = load_optional(config.jwt_secret_file.as_deref(), load_jwt_secret)?;
        let jwks = load_optional(config.jwt_jwks_file.as_deref(), load_jwks)?;
        let scram = load_optional(config.scram_file.as_deref(), load_scram)?;
        let stamp_of = |p: &Option<PathBuf>| p.as_deref().and_then(stamp);
        let stamps = Stamps {
            password: stamp_of(&config.password_file),
            acl: stamp_of(&config.acl_file),
            jwt_secret: stamp_of(&config.jwt_secret_file),
            jwks: stamp_of(&config.jwt_jwks_file),
            scram: stamp_of(&config.scram_file),
        };
        Ok(Auth {
            anonymous: config.anonymous_allowed(),
            passwords: RwLock::new(passwords),
            acl: RwLock::new(acl),
            acl_per_message: acl_per_message.into(),
            jwt_secret: RwLock::new(jwt_secret),
            jwks: RwLock::new(jwks),
            jwt_rules: JwtRules {
                username_claim: config.jwt_username_claim.clone(),
                acl_claim: config.jwt_acl_claim.clone(),
                leeway: config.jwt_leeway.0,
                audience: config.jwt_audience.clone(),
                issuer: config.jwt_issuer.clone(),
            },
            scram: RwLock::new(scram),
            stamps: Mutex::new(stamps),
            cache: Arc::new(DecisionCache::new(config.cache_size, config.cache_ttl.0)),
            hashing: Arc::new(Semaphore::new(config.max_concurrent_hashes.max(1))),
            callout,
            reload_now: Notify::new(),
            config: config.clone(),
        })
    }

    /// Whether clients without credentials are accepted.
    pub fn allows_anonymous(&self) -> bool {
        self.anonymous
    }

    /// Number of users in the password file.
    pub fn user_count(&self) -> usize {
        self.passwords.read().as_ref().map_or(0, |p| p.len())
    }

    /// Number of keys in the JWKS file.
    pub fn jwks_key_count(&self) -> usize {
        self.jwks.read().as_ref().map_or(0, |k| k.len())
    }

    /// Number of users in the SCRAM credentials file.
    pub fn scram_user_count(&self) -> usize {
        self.scram.read().as_ref().map_or(0, |s| s.len())
    }

    /// Validates a token given as the CONNECT password.
    fn token_check(&self, token: &[u8], client_id: &str) -> AuthDecision {
        let refusal = ReasonCode::BAD_USER_NAME_OR_PASSWORD;
        let Ok(token) = std::str::from_utf8(token) else {
            return AuthDecision::Deny(refusal);
        };
        let secret = self.jwt_secret.read().clone();
        let jwks = self.jwks.read().clone();
        match jwt::validate(token, secret.as_deref(), jwks.as_deref(), &self.jwt_rules) {
            Ok(t) => {
                counter!(AUTH_TOKENS_TOTAL, "result" => "valid").increment(1);
                // The wall-clock expiry as an instant of the monotonic clock the connection
                // uses; already past (within the leeway) means now.
                let left = t
                    .valid_until
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                let now = Instant::now();
                AuthDecision::Allow(Principal {
                    username: Some(t.username),
                    client_id: client_id.to_owned(),
                    acl: t.acl.map(Arc::new),
                    valid_until: Some(now.checked_add(left).unwrap_or(now)),
                })
            }
            Err(e) => {
                counter!(AUTH_TOKENS_TOTAL, "result" => "invalid").increment(1);
                debug!(client_id, "token refused: {e}");
                AuthDecision::Deny(refusal)
            }
        }
    }

    /// Rereads the files that changed since they were loaded (every configured file when
    /// `force`). A file that fails to load is reported and the previous version kept.
    /// Returns what was reloaded and the errors.
    pub fn reload(&self, force: bool) -> (usize, Vec<AuthError>) {
        let mut reloaded = 0;
        let mut errors = Vec::new();
        let mut stamps = self.stamps.lock();
        let outcomes = [
            reload_file(
                "password",
                self.config.password_file.as_deref(),
                &mut stamps.password,
                force,
                load_passwords,
                |path, p| {
                    info!(file = %path.display(), users = p.len(), "password file reloaded");
                    *self.passwords.write() = Some(Arc::new(p));
                    self.cache.clear();
                },
            ),
            reload_file(
                "acl",
                self.config.acl_file.as_deref(),
                &mut stamps.acl,
                force,
                load_acl,
                |path, a| {
                    info!(file = %path.display(), rules = a.len(), "ACL file reloaded");
                    self.acl_per_message
                        .store(per_message(&a), std::sync::atomic::Ordering::Relaxed);
                    *self.acl.write() = Some(Arc::new(a));
                },
            ),
            reload_file(
                "jwt_secret",
                self.config.jwt_secret_file.as_deref(),
                &mut stamps.jwt_secret,
                force,
                load_jwt_secret,
                |path, s| {
                    info!(file = %path.display(), "JWT secret reloaded");
                    *self.jwt_secret.write() = Some(Arc::new(s));
                },
            ),
            reload_file(
                "jwks",
                self.config.jwt_jwks_file.as_deref(),
                &mut stamps.jwks,
                force,
                load_jwks,
                |path, k| {
                    info!(file = %path.display(), keys = k.len(), "JWKS reloaded");
                    *self.jwks.write() = Some(Arc::new(k));
                },
            ),
            reload_file(
                "scram",
                self.config.scram_file.as_deref(),
                &mut stamps.scram,
                force,
                load_scram,
                |path, s| {
                    info!(file = %path.display(), users = s.len(), "SCRAM credentials reloaded");
                    *self.scram.write() = Some(Arc::new(s));
                },
            ),
        ];
        for outcome in outcomes.into_iter().flatten() {
            match outcome {
                Ok(()) => reloaded += 1,
                Err(e) => errors.push(e),
            }
        }
        for e in &errors {
            warn!("{e}; keeping the previous version");
        }
        (reloaded, errors)
    }

    /// Asks the watcher ([`Self::watch`]) to reload every file now (e.g. on SIGHUP).
    pub fn request_reload(&self) {
        self.reload_now.notify_one();
    }

    /// Reloads files when they change (polling every `auth.reload_interval`) or when
    /// [`Self::request_reload`] is called. Runs until the task is aborted.
    pub async fn watch(self: Arc<Self>) {
        let interval = self.config.reload_interval.0;
        loop {
            let force = tokio::select! {
                _ = self.reload_now.notified() => true,
                _ = async {
                    if interval.is_zero() {
                        std::future::pending::<()>().await
                    } else {
                        tokio::time::sleep(interval).await
                    }
                } => false,
            };
            let this = self.clone();
            // File reads are blocking I/O: off the async workers.
            let _ = tokio::task::spawn_blocking(move || this.reload(force)).await;
        }
    }

    fn password_check(
        &self,
        hash: String,
        user: &str,
        password: &[u8],
        principal: Principal,
    ) -> AuthDecision {
        let refusal = ReasonCode::BAD_USER_NAME_OR_PASSWORD;
        let key = self.cache.key("password", &[user.as_bytes(), password]);
        if let Some((ok, _)) = self.cached(&key) {
            return verdict(ok, principal, refusal);
        }
        let cache = self.cache.clone();
        let hashing = self.hashing.clone();
        let password = password.to_vec();
        AuthDecision::Pending(Box::pin(async move {
            // Bounded concurrency: a storm queues here instead of occupying every core.
            let Ok(_permit) = hashing.acquire_owned().await else {
                return Err(ReasonCode::SERVER_UNAVAILABLE);
            };
            let ok = tokio::task::spawn_blocking(move || passwd::verify_password(&hash, &password))
                .await
                .map_err(|_| ReasonCode::SERVER_UNAVAILABLE)?;
            cache.insert(key, (ok, None), Instant::now());
            if ok { Ok(principal) } else { Err(refusal) }
        }))
    }

    fn callout_check(
        &self,
        callout: Arc<dyn AuthCallout>,
        info: &ConnectInfo<'_>,
        principal: Principal,
    ) -> AuthDecision {
        let password: &[u8] = info.password.map_or(&[], |p| &p[..]);
        let key = self.cache.key(
            "callout",
            &[
                info.username.unwrap_or("").as_bytes(),
                password,
                info.client_id.as_bytes(),
            ],
        );
        let refusal = if info.password.is_some() {
            ReasonCode::BAD_USER_NAME_OR_PASSWORD
        } else {
            ReasonCode::NOT_AUTHORIZED
        };
        if let Some((ok, acl)) = self.cached(&key) {
            return verdict(ok, Principal { acl, ..principal }, refusal);
        }
        let cache = self.cache.clone();
        let timeout = self.config.callout_timeout.0;
        let request = AuthRequest::from(info);
        AuthDecision::Pending(Box::pin(async move {
            match tokio::time::timeout(timeout, callout.check(request)).await {
                Ok(Ok(answer)) => {
                    let ok = answer.allow;
                    let result = if ok { "allow" } else { "deny" };
                    counter!(AUTH_CALLOUTS_TOTAL, "result" => result).increment(1);
                    let acl = answer.acl.map(Arc::new);
                    cache.insert(key, (ok, acl.clone()), Instant::now());
                    if ok {
                        Ok(Principal { acl, ..principal })
                    } else {
                        Err(refusal)
                    }
                }
                Ok(Err(e)) => {
                    counter!(AUTH_CALLOUTS_TOTAL, "result" => "error").increment(1);
                    warn!("authentication callout failed: {e}");
                    Err(ReasonCode::NOT_AUTHORIZED)
                }
                Err(_) => {
                    counter!(AUTH_CALLOUTS_TOTAL, "result" => "timeout").increment(1);
                    warn!("authentication callout timed out after {timeout:?}");
                    Err(ReasonCode::NOT_AUTHORIZED)
                }
            }
        }))
    }

    fn cached(&self, key: &[u8; 32]) -> Option<cache::Decision> {
        let hit = self.cache.get(key, Instant::now());
        let result = if hit.is_some() { "hit" } else { "miss" };
        counter!(AUTH_CACHE_LOOKUPS_TOTAL, "result" => result).increment(1);
        hit
    }
}

fn verdict(ok: bool, principal: Principal, refusal: ReasonCode) -> AuthDecision {
    if ok {
        AuthDecision::Allow(principal)
    } else {
        AuthDecision::Deny(refusal)
    }
}

impl Authenticator for Auth {
    fn authenticate(&self, info: &ConnectInfo<'_>) -> AuthDecision {
        let principal = |username: Option<&str>| Principal {
            username: username.map(str::to_owned),
            client_id: info.client_id.to_owned(),
            acl: None,
            valid_until: None,
        };
        // 1. A verified client certificate names the user.
        if self.config.use_cert_identity
            && let Some(identity) = info.cert_identity
        {
            return AuthDecision::Allow(principal(Some(identity)));
        }
        // 2. A user of the password file.
        let hash = info.username.and_then(|user| {
            self.passwords
                .read()
                .as_ref()
                .and_then(|p| p.get(user).map(str::to_owned))
        });
        if let (Some(hash), Some(user)) = (hash, info.username) {
            return match info.password {
                Some(pw) => self.password_check(hash, user, pw, principal(Some(user))),
                None => AuthDecision::Deny(ReasonCode::BAD_USER_NAME_OR_PASSWORD),
            };
        }
        // 3. A password shaped like a JWT, when tokens are configured: the token alone decides
        // (a user name, if sent, is ignored: the token's claim names the user).
        if self.config.jwt_enabled()
            && let Some(pw) = info.password
            && jwt::looks_like_jwt(pw)
        {
            return self.token_check(pw, info.client_id);
        }
        let Some(user) = info.username else {
            // 4. No user name: anonymous, if allowed.
            return if self.anonymous {
                AuthDecision::Allow(principal(None))
            } else {
                AuthDecision::Deny(ReasonCode::NOT_AUTHORIZED)
            };
        };
        match &self.callout {
            // 5. Anyone else: the callout, if one is configured.
            Some(callout) => self.callout_check(callout.clone(), info, principal(Some(user))),
            // 6. No credential store at all: the name is only a label, like anonymous.
            None if self.anonymous && !self.config.has_credential_store() => {
                AuthDecision::Allow(principal(Some(user)))
            }
            // 7. An unknown user when credentials are checked.
            None => AuthDecision::Deny(ReasonCode::BAD_USER_NAME_OR_PASSWORD),
        }
    }

    fn start_exchange(
        &self,
        method: &str,
        info: &ConnectInfo<'_>,
    ) -> Option<Box<dyn AuthExchange>> {
        let mechanism = Mechanism::from_name(method)?;
        let store = self.scram.read().clone()?;
        Some(Box::new(scram::ServerExchange::new(
            mechanism,
            store,
            info.client_id,
        )))
    }
}

impl Authorizer for Auth {
    fn authorize(&self, principal: &Principal, access: Access<'_>) -> bool {
        // Rules given with this connection's authentication (callout) come first and alone.
        if let Some(acl) = &principal.acl {
            return acl.check(principal, access);
        }
        match &*self.acl.read() {
            Some(acl) => acl.check(principal, access),
            None => true,
        }
    }

    fn checks_delivery(&self, principal: &Principal) -> bool {
        match &principal.acl {
            Some(acl) => per_message(acl),
            None => self
                .acl_per_message
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

/// Whether `acl` checks each delivery (`mode message`).
fn per_message(acl: &Acl) -> bool {
    acl.mode() == raftmq_core::acl::AclMode::Message
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::io::Write as _;

    fn info<'a>(
        user: Option<&'a str>,
        password: Option<&'a Bytes>,
        cert: Option<&'a str>,
    ) -> ConnectInfo<'a> {
        ConnectInfo {
            client_id: "c1",
            username: user,
            password,
            peer_addr: None,
            cert_identity: cert,
        }
    }

    async fn decide(auth: &Auth, info: &ConnectInfo<'_>) -> Result<Principal, ReasonCode> {
        match auth.authenticate(info) {
            AuthDecision::Allow(p) => Ok(p),
            AuthDecision::Deny(c) => Err(c),
            AuthDecision::Pending(f) => tokio::time::timeout(Duration::from_secs(10), f)
                .await
                .expect("decision in time"),
        }
    }

    fn password_file(users: &[(&str, &str)]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        for (u, p) in users {
            let hash = passwd::hash_password(p.as_bytes()).expect("hash");
            writeln!(f, "{u}:{hash}").expect("write");
        }
        f
    }

    #[test]
    fn a_fresh_install_allows_anonymous_a_password_file_does_not() {
        assert!(AuthConfig::default().anonymous_allowed());
        let with_file = AuthConfig {
            password_file: Some("/etc/raftmq/passwd".into()),
            ..AuthConfig::default()
        };
        assert!(!with_file.anonymous_allowed());
        let explicit = AuthConfig {
            allow_anonymous: Some(true),
            ..with_file
        };
        assert!(explicit.anonymous_allowed());
        let nobody = AuthConfig {
            allow_anonymous: Some(false),
            ..AuthConfig::default()
        };
        let problems = nobody.validate("auth.");
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].key, "auth.allow_anonymous");
        let slow = AuthConfig {
            callout_timeout: DurationStr(Duration::from_secs(30)),
            callout_url: Some("https://auth".into()),
            ..AuthConfig::default()
        };
        let keys: Vec<String> = slow.validate("auth.").into_iter().map(|p| p.key).collect();
        assert_eq!(keys, ["auth.callout_url", "auth.callout_timeout"]);
    }

    #[tokio::test]
    async fn cert_identity_becomes_the_user_name_when_enabled() {
        let file = password_file(&[("alice", "pw")]);
        let config = AuthConfig {
            password_file: Some(file.path().to_owned()),
            use_cert_identity: true,
            ..AuthConfig::default()
        };
        let auth = Auth::load(&config).expect("load");
        // The certificate wins over whatever user name the client sends.
        let p = decide(&auth, &info(Some("mallory"), None, Some("device-7")))
            .await
            .expect("accepted");
        assert_eq!(p.username.as_deref(), Some("device-7"));
        assert_eq!(p.client_id, "c1");
        // No certificate: the password file applies.
        assert_eq!(
            decide(&auth, &info(None, None, None)).await,
            Err(ReasonCode::NOT_AUTHORIZED)
        );

        let off = Auth::load(&AuthConfig {
            use_cert_identity: false,
            ..config
        })
        .expect("load");
        assert_eq!(
            decide(&off, &info(None, None, Some("device-7"))).await,
            Err(ReasonCode::NOT_AUTHORIZED)
        );
    }

    #[tokio::test]
    async fn password_file_decides_and_the_cache_answers_repeats() {
        let file = password_file(&[("alice", "pw")]);
        let auth = Auth::load(&AuthConfig {
            password_file: Some(file.path().to_owned()),
            ..AuthConfig::default()
        })
        .expect("load");
        let good = Bytes::from_static(b"pw");
        let bad = Bytes::from_static(b"nope");
        assert!(matches!(
            auth.authenticate(&info(Some("alice"), Some(&good), None)),
            AuthDecision::Pending(_)
        ));
        let p = decide(&auth, &info(Some("alice"), Some(&good), None))
            .await
            .expect("good password");
        assert_eq!(p.username.as_deref(), Some("alice"));
        // Now cached: answered at once.
        assert!(matches!(
            auth.authenticate(&info(Some("alice"), Some(&good), None)),
            AuthDecision::Allow(_)
        ));
        assert_eq!(
            decide(&auth, &info(Some("alice"), Some(&bad), None)).await,
            Err(ReasonCode::BAD_USER_NAME_OR_PASSWORD)
        );
        assert_eq!(
            decide(&auth, &info(Some("alice"), None, None)).await,
            Err(ReasonCode::BAD_USER_NAME_OR_PASSWORD)
        );
        assert_eq!(
            decide(&auth, &info(Some("bob"), Some(&good), None)).await,
            Err(ReasonCode::BAD_USER_NAME_OR_PASSWORD)
        );
    }

    #[test]
    fn a_bad_file_on_reload_keeps_the_old_one_and_names_the_line() {
        let file = password_file(&[("alice", "pw")]);
        let auth = Auth::load(&AuthConfig {
            password_file: Some(file.path().to_owned()),
            ..AuthConfig::default()
        })
        .expect("load");
        assert_eq!(auth.user_count(), 1);
        std::fs::write(file.path(), "# ok\nalice-without-hash\n").expect("write");
        let (reloaded, errors) = auth.reload(true);
        assert_eq!(reloaded, 0);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("line 2"), "{}", errors[0]);
        assert_eq!(auth.user_count(), 1);
        // Unchanged since the failed attempt: not retried until it changes again.
        assert_eq!(auth.reload(false).0, 0);
    }

    #[test]
    fn missing_or_bad_files_fail_loading_with_their_name() {
        let err = Auth::load(&AuthConfig {
            acl_file: Some("/nonexistent/raftmq.acl".into()),
            ..AuthConfig::default()
        })
        .expect_err("missing file");
        assert!(
            err.to_string()
                .starts_with("auth.acl_file: cannot read /nonexistent/raftmq.acl"),
            "{err}"
        );
        let mut acl = tempfile::NamedTempFile::new().expect("temp");
        writeln!(acl, "allow publish a\nallow bogus b").expect("write");
        let err = Auth::load(&AuthConfig {
            acl_file: Some(acl.path().to_owned()),
            ..AuthConfig::default()
        })
        .expect_err("bad acl");
        assert!(err.to_string().starts_with("auth.acl_file: "), "{err}");
        assert!(err.to_string().contains("line 2"), "{err}");
    }

    #[test]
    fn deliveries_are_checked_while_the_acl_file_is_in_message_mode() {
        let mut file = tempfile::NamedTempFile::new().expect("temp");
        writeln!(file, "mode message\nallow subscribe #").expect("write");
        let auth = Auth::load(&AuthConfig {
            acl_file: Some(file.path().to_owned()),
            ..AuthConfig::default()
        })
        .expect("valid");
        let p = Principal {
            username: None,
            client_id: "c".to_owned(),
            acl: None,
            valid_until: None,
        };
        assert!(auth.checks_delivery(&p));
        std::fs::write(file.path(), "allow subscribe #\n").expect("rewrite");
        let (reloaded, errors) = auth.reload(true);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(reloaded, 1);
        assert!(
            !auth.checks_delivery(&p),
            "back to filter mode after the reload"
        );
        // A connection's own rules (from the callout) decide for it.
        let own = Principal {
            acl: Some(Arc::new(Acl::parse("mode message\n").expect("valid"))),
            ..p
        };
        assert!(auth.checks_delivery(&own));
    }

    fn claims(user: &str, exp_in: i64) -> serde_json::Value {
        serde_json::json!({"sub": user, "exp": jwt::unix_now().saturating_add_signed(exp_in)})
    }

    #[tokio::test]
    async fn jwks_reload_swaps_the_keys_and_a_bad_file_keeps_the_old_ones() {
        use jwt::testing::{ec_key, es256};
        let (k1, jwk1) = ec_key("k1");
        let (k2, jwk2) = ec_key("k2");
        let file = tempfile::NamedTempFile::new().expect("temp");
        let write = |keys: serde_json::Value| {
            std::fs::write(file.path(), serde_json::json!({ "keys": keys }).to_string())
                .expect("write")
        };
        write(serde_json::json!([jwk1]));
        let auth = Auth::load(&AuthConfig {
            jwt_jwks_file: Some(file.path().to_owned()),
            ..AuthConfig::default()
        })
        .expect("load");
        assert!(
            !auth.allows_anonymous(),
            "JWT keys turn anonymous access off"
        );
        let t1 = Bytes::from(es256(&k1, Some("k1"), &claims("d1", 60)));
        let t2 = Bytes::from(es256(&k2, Some("k2"), &claims("d2", 60)));
        let before = Instant::now();
        let p = decide(&auth, &info(None, Some(&t1), None))
            .await
            .expect("k1");
        assert_eq!(p.username.as_deref(), Some("d1"));
        let until = p.valid_until.expect("the token's expiry");
        assert!(
            until > before + Duration::from_secs(55) && until < before + Duration::from_secs(62)
        );
        assert_eq!(
            decide(&auth, &info(None, Some(&t2), None)).await,
            Err(ReasonCode::BAD_USER_NAME_OR_PASSWORD)
        );
        write(serde_json::json!([jwk2]));
        let (reloaded, errors) = auth.reload(true);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(reloaded, 1);
        assert_eq!(auth.jwks_key_count(), 1);
        decide(&auth, &info(None, Some(&t2), None))
            .await
            .expect("k2 after the reload");
        assert!(decide(&auth, &info(None, Some(&t1), None)).await.is_err());
        // A broken JWKS is refused and the keys in use stay.
        std::fs::write(file.path(), "{\"keys\": [{\"kty\": \"RSA\"}]}").expect("write");
        let (reloaded, errors) = auth.reload(true);
        assert_eq!(reloaded, 0);
        assert!(
            errors[0].to_string().starts_with("auth.jwt_jwks_file: "),
            "{}",
            errors[0]
        );
        decide(&auth, &info(None, Some(&t2), None))
            .await
            .expect("old keys kept");
    }

    #[tokio::test]
    async fn the_password_file_comes_before_tokens_and_tokens_before_the_anonymous_rule() {
        let secret = jwt::testing::secret();
        let mut secret_file = tempfile::NamedTempFile::new().expect("temp");
        secret_file.write_all(&secret).expect("write");
        writeln!(secret_file).expect("a trailing newline is not part of the secret");
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims("tok", 60),
            &jsonwebtoken::EncodingKey::from_secret(&secret),
        )
        .expect("encode");
        let token = Bytes::from(token);
        let users = password_file(&[("alice", "pw")]);
        let auth = Auth::load(&AuthConfig {
            password_file: Some(users.path().to_owned()),
            jwt_secret_file: Some(secret_file.path().to_owned()),
            ..AuthConfig::default()
        })
        .expect("load");
        // alice is in the password file: her password is checked there, even token-shaped.
        assert_eq!(
            decide(&auth, &info(Some("alice"), Some(&token), None)).await,
            Err(ReasonCode::BAD_USER_NAME_OR_PASSWORD)
        );
        // Anyone else (with or without a user name) presenting a token is the token's user.
        for user in [Some("bob"), None] {
            let p = decide(&auth, &info(user, Some(&token), None))
                .await
                .expect("token");
            assert_eq!(p.username.as_deref(), Some("tok"));
        }
        let not_a_token = Bytes::from_static(b"pw");
        assert_eq!(
            decide(&auth, &info(Some("bob"), Some(&not_a_token), None)).await,
            Err(ReasonCode::BAD_USER_NAME_OR_PASSWORD)
        );
        assert!(
            auth.start_exchange("SCRAM-SHA-256", &info(None, None, None))
                .is_none()
        );
    }

    #[test]
    fn scram_methods_are_offered_only_with_a_credentials_file() {
        let c = scram::Credential::generate(Mechanism::Sha256, b"pw").expect("salt");
        let mut file = tempfile::NamedTempFile::new().expect("temp");
        writeln!(file, "carol:{}", c.to_text()).expect("write");
        let auth = Auth::load(&AuthConfig {
            scram_file: Some(file.path().to_owned()),
            ..AuthConfig::default()
        })
        .expect("load");
        assert_eq!(auth.scram_user_count(), 1);
        assert!(!auth.allows_anonymous());
        let who = info(None, None, None);
        assert!(auth.start_exchange("SCRAM-SHA-256", &who).is_some());
        assert!(auth.start_exchange("SCRAM-SHA-512", &who).is_some());
        assert!(auth.start_exchange("SCRAM-SHA-1", &who).is_none());
        assert!(auth.start_exchange("scram-sha-256", &who).is_none());
        std::fs::write(file.path(), "carol:$argon2id$nope\n").expect("write");
        let (_, errors) = auth.reload(true);
        assert_eq!(errors.len(), 1);
        assert_eq!(auth.scram_user_count(), 1, "the old credentials stay");
    }
}
