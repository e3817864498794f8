//! `basalt-tls`: encryption in transit.
//!
//! Owns everything between a TCP socket and the bytes basalt's protocols read and write:
//!
//! - [`Connector`] (the dialing side) and [`Acceptor`] (the listening side) turn a TCP
//!   connection into a [`Stream`], TLS 1.3/1.2 through rustls (ring provider) or plain text
//!   when TLS is off. Servers are verified against the cluster CA and the address dialed
//!   (an IP address or DNS name in the certificate's subject alternative names).
//! - [`channel`] gives tonic a lazily connected gRPC channel that dials through a
//!   [`Connector`], and [`Stream`] implements tonic's `Connected`, so a server fed with
//!   accepted [`Stream`]s serves gRPC over TLS; the data-path messenger reads and writes the
//!   same [`Stream`]s.
//! - [`files`]: reading PEM certificates and keys; [`gen`]: making a cluster CA and the
//!   certificates it signs (`basalt cluster up`, `basalt tls ...`, the test harness), in the
//!   file layout QEMU's `tls-creds-x509` and libnbd's `tls-certificates=DIR` read.
//!
//! **Why TLS rather than a home-made AEAD**: rustls is audited, and QEMU and libnbd speak
//! TLS for NBD anyway, so one mechanism and one set of certificate files covers both. Who a
//! peer *is* (cephx-style authentication and caps) is not decided here: daemon ports verify
//! the server's certificate only; NBD can also require and check client certificates.
//!
//! **A plain-text client on a TLS port** gets one line of text saying TLS is required
//! ([`PLAIN_TEXT_REFUSAL`]) and the connection closes; a TLS client dialing a plain-text
//! port gets [`TlsError::NotTls`].

pub mod files;
pub mod gen;
mod grpc;
mod stream;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[cfg(test)]
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

pub use grpc::{channel, incoming, log_refused};
pub use stream::{ReadHalf, Stream, WriteHalf};

/// The first byte of every TLS connection (a handshake record).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What a TLS port writes to a client that spoke plain text, before closing. Starts with
/// `basalt: ` so basalt's own clients recognize it and say so.
pub const PLAIN_TEXT_REFUSAL: &[u8] =
    b"basalt: this port requires TLS; set [tls] enabled = true and ca_file in the client's cluster.toml\n";

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no usable {what} (expected PEM)")]
    Empty { what: &'static str, path: PathBuf },
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS set-up failed: {0}")]
    Config(String),
    #[error("cannot generate a certificate: {0}")]
    Generate(String),
    #[error("{addr} is not a valid address to verify a certificate against")]
    BadServerName { addr: String },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("{addr} does not speak TLS (is TLS off on that daemon, [tls] enabled = false?)")]
    NotTls { addr: String },
    #[error("TLS handshake with {addr} failed: {why}")]
    Handshake { addr: String, why: String },
    #[error("TLS handshake with {addr} took longer than {HANDSHAKE_TIMEOUT:?}")]
    HandshakeTimeout { addr: String },
    #[error("a plain-text client on a TLS port was refused")]
    PlainTextRefused,
}

impl TlsError {
    /// Whether this is about the connection (refused, reset, timed out) rather than about
    /// certificates or configuration: another attempt may succeed.
    pub fn is_connection_failure(&self) -> bool {
        matches!(
            self,
            TlsError::Connect { .. } | TlsError::HandshakeTimeout { .. }
        ) || matches!(self, TlsError::Handshake { why, .. } if why.contains("os error"))
    }
}

/// The dialing side: plain text, or TLS verifying servers against a CA.
#[derive(Clone)]
pub struct Connector {
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.tls.is_some() {
            "Connector(tls)"
        } else {
            "Connector(plain)"
        })
    }
}

/// rustls on *ring* (smaller and quicker to build than aws-lc-rs). rustls 0.23.48 deprecated
/// the ring provider because ring has no post-quantum key exchange; X25519 and the NIST
/// curves remain, which is what QEMU's and libnbd's GnuTLS offer too.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Connector {
    /// Plain text (TLS off).
    pub fn plain() -> Connector {
        Connector { tls: None }
    }

    /// TLS, trusting servers whose certificate `ca_file` signed; presenting `identity`
    /// (certificate, key) when a server asks for a client certificate.
    pub fn tls(ca_file: &Path, identity: Option<(&Path, &Path)>) -> Result<Connector, TlsError> {
        let roots = files::root_store(ca_file)?;
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots);
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => builder
                .with_client_auth_cert(files::certs(cert)?, files::private_key(key)?)
                .map_err(|e| TlsError::BadFile {
                    path: cert.to_path_buf(),
                    message: format!("certificate and key do not go together: {e}"),
                })?,
        };
        Ok(Connector {
            tls: Some(Arc::new(config)),
        })
    }

    /// What `[tls]` of a cluster config asks of clients: TLS against its CA, or plain text.
    pub fn for_cluster(section: &basalt_config::TlsSection) -> Result<Connector, TlsError> {
        if !section.enabled {
            return Ok(Connector::plain());
        }
        Connector::tls(&section.ca_path(), None)
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Opens a TCP connection to `addr` (`host:port`) with `TCP_NODELAY` and, with TLS,
    /// completes the handshake (bounded by [`HANDSHAKE_TIMEOUT`]).
    pub async fn connect(&self, addr: &str) -> Result<Stream, TlsError> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| TlsError::Connect {
                addr: addr.to_string(),
                source,
            })?;
        // Small frames (a 4 KiB write, a reply) must not wait for the peer's delayed ACK.
        let _ = tcp.set_nodelay(true);
        self.wrap(addr, tcp).await
    }

    /// Wraps an open TCP connection to `addr` (the name the server's certificate must carry).
    pub async fn wrap(&self, addr: &str, tcp: TcpStream) -> Result<Stream, TlsError> {
        let Some(config) = &self.tls else {
            return Ok(Stream::plain(tcp));
        };
        let name = server_name(addr)?;
        let connector = tokio_rustls::TlsConnector::from(config.clone());
        let handshake = connector.connect(name, tcp);
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Err(_) => Err(TlsError::HandshakeTimeout {
                addr: addr.to_string(),
            }),
            Ok(Ok(tls)) => Ok(Stream::client_tls(tls)),
            Ok(Err(e)) => Err(classify_client_error(addr, e)),
        }
    }
}

/// A plain-text server answers our ClientHello with something that is not a TLS record;
/// one of ours answers with the refusal line, which rustls reports the same way.
fn classify_client_error(addr: &str, e: std::io::Error) -> TlsError {
    let text = e.to_string();
    if text.contains("InvalidContentType") || text.contains("corrupt message") {
        TlsError::NotTls {
            addr: addr.to_string(),
        }
    } else {
        TlsError::Handshake {
            addr: addr.to_string(),
            why: text,
        }
    }
}

/// The name a server's certificate must carry: the host part of `addr` (`host:port`,
/// `[v6]:port`).
fn server_name(addr: &str) -> Result<ServerName<'static>, TlsError> {
    let bad = || TlsError::BadServerName {
        addr: addr.to_string(),
    };
    let host = match addr.rsplit_once(':') {
        Some((h, port)) if port.parse::<u16>().is_ok() => h,
        _ => addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(host.to_string()).map_err(|_| bad())
}

/// The listening side: plain text, or TLS with this daemon's certificate.
#[derive(Clone)]
pub struct Acceptor {
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.tls.is_some() {
            "Acceptor(tls)"
        } else {
            "Acceptor(plain)"
        })
    }
}

impl Acceptor {
    pub fn plain() -> Acceptor {
        Acceptor { tls: None }
    }

    /// TLS with `cert_file` (the chain, leaf first) and `key_file`; clients are not asked for
    /// certificates (who they are is authentication's business, above TLS).
    pub fn tls(cert_file: &Path, key_file: &Path) -> Result<Acceptor, TlsError> {
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(files::certs(cert_file)?, files::private_key(key_file)?)
            .map_err(|e| TlsError::BadFile {
                path: cert_file.to_path_buf(),
                message: format!("certificate and key do not go together: {e}"),
            })?;
        Ok(Acceptor::from_config(Arc::new(config)))
    }

    /// A daemon's acceptor as its flags and `[tls]` say: plain text when TLS is off; else
    /// the certificate and key given on the command line, or those of `[tls]`.
    pub fn for_daemon(
        section: &basalt_config::TlsSection,
        cert_flag: Option<&Path>,
        key_flag: Option<&Path>,
    ) -> Result<Acceptor, TlsError> {
        if !section.enabled {
            return Ok(Acceptor::plain());
        }
        let cert = cert_flag
            .map(Path::to_path_buf)
            .or(section.cert_file.clone());
        let key = key_flag.map(Path::to_path_buf).or(section.key_file.clone());
        match (cert, key) {
            (Some(c), Some(k)) => Acceptor::tls(&c, &k),
            _ => Err(TlsError::Config(
                "TLS is on ([tls] enabled) but this daemon has no certificate: pass --tls-cert \
                 FILE --tls-key FILE (or set [tls] cert_file and key_file); `basalt tls issue` \
                 makes them, or set [tls] enabled = false on every host"
                    .into(),
            )),
        }
    }

    /// An acceptor with a ready rustls configuration (NBD's, which may verify clients).
    pub fn from_config(config: Arc<rustls::ServerConfig>) -> Acceptor {
        Acceptor { tls: Some(config) }
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Takes an accepted connection through the TLS handshake (bounded by
    /// [`HANDSHAKE_TIMEOUT`]). A client whose first byte is not a TLS record gets
    /// [`PLAIN_TEXT_REFUSAL`] and [`TlsError::PlainTextRefused`].
    pub async fn accept(&self, tcp: TcpStream) -> Result<Stream, TlsError> {
        let Some(config) = &self.tls else {
            return Ok(Stream::plain(tcp));
        };
        let peer = tcp
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "a client".into());
        let handshake = async {
            let mut first = [0u8; 1];
            let n = tcp
                .peek(&mut first)
                .await
                .map_err(|source| TlsError::Connect {
                    addr: peer.clone(),
                    source,
                })?;
            if n == 1 && first[0] != TLS_HANDSHAKE_RECORD {
                let mut tcp = tcp;
                let _ = tcp.write_all(PLAIN_TEXT_REFUSAL).await;
                let _ = tcp.shutdown().await;
                return Err(TlsError::PlainTextRefused);
            }
            tokio_rustls::TlsAcceptor::from(config.clone())
                .accept(tcp)
                .await
                .map(Stream::server_tls)
                .map_err(|e| TlsError::Handshake {
                    addr: peer.clone(),
                    why: e.to_string(),
                })
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(r) => r,
            Err(_) => Err(TlsError::HandshakeTimeout { addr: peer }),
        }
    }
}

/// The rustls configuration of an NBD server from a directory in QEMU's `tls-creds-x509`
/// layout: `server-cert.pem`, `server-key.pem`, and `ca-cert.pem`, against which a client
/// certificate is verified when the client presents one. A client without one still
/// completes the handshake (as with QEMU's `verify-peer=off`); the gateway's export rules
/// decide what such a client may open.
pub fn nbd_server_config(dir: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let roots = files::root_store(&dir.join(gen::CA_CERT))?;
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
    let cert_file = dir.join(gen::SERVER_CERT);
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            files::certs(&cert_file)?,
            files::private_key(&dir.join(gen::SERVER_KEY))?,
        )
        .map_err(|e| TlsError::BadFile {
            path: cert_file,
            message: format!("certificate and key do not go together: {e}"),
        })?;
    Ok(Arc::new(config))
}

/// The TLS flags of a daemon that serves basalt's protocols (monitor, OSD).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DaemonTlsArgs {
    /// This daemon's certificate (PEM, leaf first), signed by the cluster CA and naming the
    /// address it listens on. Default: `[tls] cert_file`. Unused when `[tls] enabled = false`.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM). Default: `[tls] key_file`.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl DaemonTlsArgs {
    /// The acceptor these flags and `[tls]` ask for.
    pub fn acceptor(&self, section: &basalt_config::TlsSection) -> Result<Acceptor, TlsError> {
        Acceptor::for_daemon(section, self.tls_cert.as_deref(), self.tls_key.as_deref())
    }
}

/// The common name (CN) of a DER certificate's subject, if it has one: how the NBD gateway
/// names a client for its export rules.
pub fn common_name(cert_der: &[u8]) -> Option<String> {
    files::subject_common_name(cert_der)
}

/// Paths resolved against a directory unless already absolute.
pub fn resolve(dir: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

#[cfg(test)]
mod tests;
