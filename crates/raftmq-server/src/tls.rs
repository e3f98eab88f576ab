//! TLS for the `tls` and `wss` listeners: server certificates from PEM files, optional or
//! required client certificates verified against a CA bundle, reload without restart, and the
//! identity of a verified client certificate for authentication. Also loads the certificates
//! of mutual TLS on the cluster port ([`ClusterTlsPem`]).

use crate::config::{CertIdentitySource, ClientAuth, TlsConfig, TlsVersion};
use crate::metrics::TLS_RELOADS_TOTAL;
use crate::x509;
use parking_lot::{Mutex, RwLock};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::{CryptoProvider, ring};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ServerConnection, WebPkiClientVerifier};
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tracing::{info, warn};

/// A problem loading the TLS configuration; names the configuration key at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key}: cannot read {}", path.display())]
    Read {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{key}: {} holds no {what}", path.display())]
    Empty {
        key: &'static str,
        path: PathBuf,
        what: &'static str,
    },
    #[error("{key}: {problem}")]
    Invalid { key: &'static str, problem: String },
    #[error("tls.cert_file: listener `{0}` needs a certificate but no [tls] section was given")]
    NotConfigured(&'static str),
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        key,
        path: path.to_owned(),
        source,
    })
}

fn certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(key, path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            key,
            problem: format!("{}: {e}", path.display()),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            key,
            path: path.to_owned(),
            what: "PEM certificate",
        });
    }
    Ok(certs)
}

/// The CA certificates in the PEM file at `path` (the setting `key`), as trust anchors.
fn root_store(key: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in certs(key, path)? {
        roots.add(ca).map_err(|e| TlsError::Invalid {
            key,
            problem: format!("{}: {e}", path.display()),
        })?;
    }
    Ok(roots)
}

fn private_key(key: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(key, path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| TlsError::Invalid {
            key,
            problem: format!("{}: {e}", path.display()),
        })?
        .ok_or_else(|| TlsError::Empty {
            key,
            path: path.to_owned(),
            what: "PEM private key",
        })
}

/// Builds a rustls server configuration from the files named by `settings`.
fn build(settings: &TlsConfig) -> Result<ServerConfig, TlsError> {
    let cert_file = settings.cert_file.as_deref().ok_or(TlsError::Invalid {
        key: "tls.cert_file",
        problem: "required when listeners.tls or listeners.wss is set".into(),
    })?;
    let key_file = settings.key_file.as_deref().ok_or(TlsError::Invalid {
        key: "tls.key_file",
        problem: "required when listeners.tls or listeners.wss is set".into(),
    })?;
    let chain = certs("tls.cert_file", cert_file)?;
    let key = private_key("tls.key_file", key_file)?;
    let provider: Arc<CryptoProvider> = Arc::new(ring::default_provider());
    let versions: &[&'static rustls::SupportedProtocolVersion] = match settings.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| TlsError::Invalid {
            key: "tls.min_version",
            problem: e.to_string(),
        })?;
    let builder = match settings.client_auth {
        ClientAuth::None => builder.with_no_client_auth(),
        mode => {
            let ca_file = settings.ca_file.as_deref().ok_or(TlsError::Invalid {
                key: "tls.ca_file",
                problem: "required when client_auth is \"optional\" or \"required\"".into(),
            })?;
            let roots = root_store("tls.ca_file", ca_file)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if mode == ClientAuth::Optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier.build().map_err(|e| TlsError::Invalid {
                key: "tls.ca_file",
                problem: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Invalid {
            key: "tls.key_file",
            problem: format!("does not match tls.cert_file: {e}"),
        })
}

/// The PEM files of mutual TLS on the cluster port, read and checked: this node's certificate
/// chain and key, and the CA certificates every peer's certificate must chain to.
#[derive(Clone)]
pub struct ClusterTlsPem {
    /// Certificate chain, leaf first.
    pub cert: Vec<u8>,
    /// Private key of the leaf certificate.
    pub key: Vec<u8>,
    /// CA certificates.
    pub ca: Vec<u8>,
}

impl std::fmt::Debug for ClusterTlsPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterTlsPem").finish_non_exhaustive()
    }
}

/// How long a peer gets to finish the TLS handshake on the cluster port.
const CLUSTER_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl ClusterTlsPem {
    /// Reads `cluster.tls_cert_file`, `cluster.tls_key_file` and `cluster.tls_ca_file` and
    /// checks them as the MQTT listener's files are checked (PEM of the right kind, key
    /// matching the certificate, usable CA certificates); errors name the key at fault.
    pub fn load(cert_file: &Path, key_file: &Path, ca_file: &Path) -> Result<Self, TlsError> {
        let chain = certs("cluster.tls_cert_file", cert_file)?;
        let key = private_key("cluster.tls_key_file", key_file)?;
        let roots = root_store("cluster.tls_ca_file", ca_file)?;
        let provider: Arc<CryptoProvider> = Arc::new(ring::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| TlsError::Invalid {
                    key: "cluster.tls_ca_file",
                    problem: e.to_string(),
                })?;
        ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Invalid {
                key: "cluster.tls_cert_file",
                problem: e.to_string(),
            })?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Invalid {
                key: "cluster.tls_key_file",
                problem: format!("does not match cluster.tls_cert_file: {e}"),
            })?;
        Ok(ClusterTlsPem {
            cert: read("cluster.tls_cert_file", cert_file)?,
            key: read("cluster.tls_key_file", key_file)?,
            ca: read("cluster.tls_ca_file", ca_file)?,
        })
    }

    /// The cluster endpoint's TLS: this node's certificate, and a client certificate that
    /// chains to the CA required of every peer.
    pub(crate) fn server_config(&self) -> tonic::transport::ServerTlsConfig {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(Certificate::from_pem(&self.ca))
            .client_auth_optional(false)
            .timeout(CLUSTER_HANDSHAKE_TIMEOUT)
    }
}

/// What identifies a version of a file: modification time and size.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// The current TLS server configuration, swapped in place when the files change.
pub struct TlsState {
    settings: TlsConfig,
    current: RwLock<Arc<ServerConfig>>,
    stamps: Mutex<Vec<Stamp>>,
}

impl TlsState {
    /// Loads the certificates named by `settings`.
    pub fn load(settings: &TlsConfig) -> Result<TlsState, TlsError> {
        let state = TlsState {
            settings: settings.clone(),
            current: RwLock::new(Arc::new(build(settings)?)),
            stamps: Mutex::new(Vec::new()),
        };
        *state.stamps.lock() = state.stamps_now();
        Ok(state)
    }

    fn files(&self) -> impl Iterator<Item = &PathBuf> {
        [
            &self.settings.cert_file,
            &self.settings.key_file,
            &self.settings.ca_file,
        ]
        .into_iter()
        .flatten()
    }

    fn stamps_now(&self) -> Vec<Stamp> {
        self.files().map(|p| stamp(p)).collect()
    }

    /// An acceptor for a new connection, with the current certificates.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().clone())
    }

    /// Reloads the files if they changed since the last load (`force`: in any case). A failed
    /// reload keeps the certificates in use.
    pub fn reload(&self, force: bool) {
        let now = self.stamps_now();
        if !force && *self.stamps.lock() == now {
            return;
        }
        *self.stamps.lock() = now;
        match build(&self.settings) {
            Ok(config) => {
                *self.current.write() = Arc::new(config);
                ::metrics::counter!(TLS_RELOADS_TOTAL, "result" => "ok").increment(1);
                info!("reloaded TLS certificates");
            }
            Err(e) => {
                ::metrics::counter!(TLS_RELOADS_TOTAL, "result" => "error").increment(1);
                let mut error = e.to_string();
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    error = format!("{error}: {c}");
                    cause = c.source();
                }
                warn!(%error, "TLS certificates not reloaded; keeping the previous ones");
            }
        }
    }

    /// The identity of the client's verified certificate, as configured by `tls.identity`.
    pub fn identity(&self, conn: &ServerConnection) -> Option<String> {
        let leaf = conn.peer_certificates()?.first()?;
        match self.settings.identity {
            CertIdentitySource::None => None,
            CertIdentitySource::Cn => x509::subject_cn(leaf.as_ref()),
            CertIdentitySource::Subject => x509::subject_string(leaf.as_ref()),
        }
    }

    /// Reloads when the files change (checked every `tls.reload_interval`) and on SIGHUP,
    /// until `stop`.
    pub async fn reload_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let interval = self.settings.reload_interval.0;
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(if interval.is_zero() {
            Duration::from_secs(3600)
        } else {
            interval
        });
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick(), if !interval.is_zero() => self.reload(false),
                Some(()) = async {
                    match hangup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    info!("SIGHUP: reloading TLS certificates");
                    self.reload(true);
                }
                _ = stop.changed() => return,
            }
        }
    }
}
