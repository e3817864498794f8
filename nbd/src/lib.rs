//! `basalt-nbd`: basalt's NBD server, a library.
//!
//! It owns the NBD protocol (NetworkBlockDevice/nbd `doc/proto.md`) end to
//! end: fixed-newstyle negotiation (EXPORT_NAME, ABORT, LIST, INFO/GO with
//! block sizes, STRUCTURED_REPLY, LIST/SET_META_CONTEXT `base:allocation`),
//! and a pipelined transmission phase (READ, WRITE, FLUSH, FUA, TRIM,
//! WRITE_ZEROES with NO_HOLE/FAST_ZERO, BLOCK_STATUS, CACHE, DISC) with
//! simple or structured replies sent out of order. What it serves is
//! abstract: an [`ExportRegistry`] maps names to [`Export`]s; the block
//! image layer (`POOL/IMAGE` over the object store) implements them, and
//! [`MemExport`] is a sparse in-memory one for tests and benchmarks.
//!
//! Why in-house (DESIGN §5): the existing crates cannot serve QEMU well.
//! `nbd` 0.3 is a blocking `Read+Write+Seek` server that answers UNSUP to
//! GO/INFO and structured replies and has no TRIM; `tokio-nbd` is
//! GPL-2.0-or-later, runs one command at a time per connection and panics
//! (an unimplemented-panic) on STRUCTURED_REPLY / META_CONTEXT, which current
//! QEMU sends; the `nbdkit` crate writes plugins for the C nbdkit daemon,
//! putting a C process in the data path. The performance targets need
//! pipelining (many requests in flight per connection), which only our
//! own server gives.
//!
//! TLS: with an [`NbdTls`] the server offers `NBD_OPT_STARTTLS` (rustls), optionally
//! requiring it (every other option before it gets `NBD_REP_ERR_TLS_REQD`), and an
//! [`ExportAccess`] (e.g. [`ExportRules`]) restricts which exports each client certificate
//! may open and see in LIST. Without TLS, STARTTLS is answered ERR_UNSUP.
//!
//! This crate depends on no other basalt crate (nor RocksDB).
//!
//! Not implemented yet: extended headers (ERR_UNSUP; clients fall back to compact
//! headers), RESIZE.

mod access;
mod error;
mod export;
mod handshake;
pub mod metrics;
pub mod proto;
mod transmission;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

pub use access::{ExportAccess, ExportRules};
pub use error::NbdError;
pub use export::{Export, ExportRegistry, Extent, MemExport, MemRegistry, MEM_BLOCK};
pub use metrics::describe_metrics;

/// Bounds on what one client can make the server do.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest READ or WRITE payload (advertised as the maximum block
    /// size). Default 32 MiB, what interoperable clients assume.
    pub max_payload: u32,
    /// Requests executed concurrently per connection. Default 64 (QEMU
    /// keeps ≤ 16 in flight; libnbd/fio go deeper).
    pub max_in_flight: usize,
    /// Payload bytes (WRITE data received, READ data not yet sent) one
    /// connection may hold at once. Raised to `max_payload` if smaller.
    /// Default 128 MiB.
    pub max_buffered_bytes: u32,
    /// A WRITE larger than `max_payload` but at most this is read and
    /// discarded and answered EINVAL; a larger one closes the connection.
    /// Default 64 MiB.
    pub max_discard: u32,
    /// Largest option payload accepted during negotiation. Default 64 KiB.
    pub max_option_len: u32,
    /// Advertised minimum block size. Default 512. Not enforced: unaligned
    /// requests are served.
    pub min_block_size: u32,
    /// Advertised preferred block size. Default 4096.
    pub preferred_block_size: u32,
    /// Most descriptors in one BLOCK_STATUS reply (the client asks again
    /// for the rest). Default 65536.
    pub max_extents: usize,
    /// Time a client has to finish negotiation. Default 30 s.
    pub handshake_timeout: Duration,
    /// Connections served at once by [`NbdServer::serve`]; more are closed
    /// on accept. Default 1024.
    pub max_connections: usize,
    /// On shutdown, how long [`NbdServer::serve`] waits for connections to
    /// finish their in-flight requests before dropping them. Default 30 s.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload: 32 << 20,
            max_in_flight: 64,
            max_buffered_bytes: 128 << 20,
            max_discard: 64 << 20,
            max_option_len: 64 << 10,
            min_block_size: 512,
            preferred_block_size: 4096,
            max_extents: 65536,
            handshake_timeout: Duration::from_secs(30),
            max_connections: 1024,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

impl Limits {
    /// Makes the limits consistent (the server applies this): block sizes
    /// powers of two with min ≤ preferred ≤ max payload, at least one
    /// request in flight, a byte budget that fits one maximal request.
    pub fn normalized(mut self) -> Self {
        fn pow2(x: u32, lo: u32, hi: u32) -> u32 {
            x.clamp(lo, hi).next_power_of_two().min(hi)
        }
        self.min_block_size = pow2(self.min_block_size, 1, 64 << 10);
        self.max_payload = self.max_payload.max(self.min_block_size).max(64 << 10);
        self.preferred_block_size = pow2(
            self.preferred_block_size,
            self.min_block_size.max(512),
            32 << 20,
        )
        .min(self.max_payload);
        self.max_in_flight = self.max_in_flight.clamp(1, u32::MAX as usize >> 4);
        self.max_buffered_bytes = self.max_buffered_bytes.max(self.max_payload);
        self.max_discard = self.max_discard.max(self.max_payload);
        self.max_option_len = self.max_option_len.max(4 << 10);
        self.max_extents = self.max_extents.max(1);
        self.max_connections = self.max_connections.max(1);
        self
    }
}

/// TLS for NBD clients (`NBD_OPT_STARTTLS`).
#[derive(Clone)]
pub struct NbdTls {
    /// The server's certificate and key, and how client certificates are verified (QEMU's
    /// `tls-creds-x509` and libnbd present one when their directory holds one).
    pub config: Arc<rustls::ServerConfig>,
    /// Serve nothing before STARTTLS: other options get `NBD_REP_ERR_TLS_REQD`, and a
    /// plain-text client never reaches an export.
    pub required: bool,
    /// The name a client's certificate (DER) gives it for [`ExportAccess`], e.g. its
    /// subject CN.
    pub client_name: fn(&[u8]) -> Option<String>,
}

/// TLS and export access. The default: no TLS, every export open to every client.
#[derive(Clone, Default)]
pub struct Security {
    pub tls: Option<NbdTls>,
    /// Which exports a client may open and see in LIST; `None`: all.
    pub access: Option<Arc<dyn ExportAccess>>,
}

/// A negotiated connection, plain or encrypted.
enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// The NBD server. Cheap to clone; clones share the registry and the
/// shutdown signal.
#[derive(Clone)]
pub struct NbdServer {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Arc<dyn ExportRegistry>,
    limits: Limits,
    security: Security,
    shutdown: watch::Sender<bool>,
}

/// Keeps the open-connections gauge right however a connection ends.
struct ConnectionGauge;

impl ConnectionGauge {
    fn new() -> Self {
        ::metrics::gauge!(metrics::CONNECTIONS).increment(1.0);
        ::metrics::counter!(metrics::CONNECTIONS_TOTAL).increment(1);
        ConnectionGauge
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        ::metrics::gauge!(metrics::CONNECTIONS).decrement(1.0);
    }
}

impl NbdServer {
    pub fn new(registry: Arc<dyn ExportRegistry>, limits: Limits) -> Self {
        Self::with_security(registry, limits, Security::default())
    }

    /// A server with TLS and/or export access rules.
    pub fn with_security(
        registry: Arc<dyn ExportRegistry>,
        limits: Limits,
        security: Security,
    ) -> Self {
        let (shutdown, _) = watch::channel(false);
        NbdServer {
            inner: Arc::new(Inner {
                registry,
                limits: limits.normalized(),
                security,
                shutdown,
            }),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Accepts connections until `shutdown` completes, then stops
    /// accepting, lets every connection finish the requests it already
    /// read (replying to them, for up to `shutdown_grace`), closes them,
    /// and returns.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        tokio::pin!(shutdown);
        let mut conns = JoinSet::new();
        info!(addr = ?listener.local_addr().ok(), "NBD server listening");
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        if conns.len() >= self.inner.limits.max_connections {
                            warn!(%peer, limit = self.inner.limits.max_connections,
                                  "too many NBD connections; closing the new one");
                            drop(stream);
                            continue;
                        }
                        let this = self.clone();
                        conns.spawn(async move {
                            match this.handle_connection(stream).await {
                                Ok(()) => debug!(%peer, "NBD connection closed"),
                                Err(e) => warn!(%peer, error = %e, "NBD connection closed on error"),
                            }
                        });
                    }
                    Err(e) => {
                        // E.g. out of file descriptors: back off, keep serving.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(listener);
        self.shutdown();
        let drained = tokio::time::timeout(self.inner.limits.shutdown_grace, async {
            while conns.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                connections = conns.len(),
                grace = ?self.inner.limits.shutdown_grace,
                "NBD connections still busy after the grace period; dropping them"
            );
            conns.shutdown().await;
        }
        info!("NBD server stopped");
        Ok(())
    }

    /// Tells every connection to stop reading new requests, finish the
    /// ones in flight and close.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }

    /// Serves one client connection to its end: negotiation, then
    /// transmission. Returns an error if the client broke the protocol or
    /// the connection failed; the server itself is unaffected.
    pub async fn handle_connection(&self, stream: TcpStream) -> Result<(), NbdError> {
        let _gauge = ConnectionGauge::new();
        let peer = stream.peer_addr().ok();
        // Small replies must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let limits = &self.inner.limits;
        let mut shutdown = self.inner.shutdown.subscribe();
        if *shutdown.borrow() {
            return Ok(());
        }

        let negotiation = tokio::time::timeout(limits.handshake_timeout, self.negotiate(stream));
        let negotiated = tokio::select! {
            r = negotiation => match r {
                Ok(r) => r.inspect_err(|_| count_protocol_error())?,
                Err(_) => {
                    count_protocol_error();
                    return Err(NbdError::Protocol(format!(
                        "negotiation not finished within {:?}", limits.handshake_timeout
                    )));
                }
            },
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        };
        let Some((conn, neg)) = negotiated else {
            debug!(?peer, "client left during negotiation");
            return Ok(());
        };
        debug!(?peer, export = %neg.name, size = neg.size, tls = matches!(conn, Conn::Tls(_)),
               "client selected export");
        let served = match conn {
            Conn::Plain(tcp) => {
                let (r, w) = tcp.into_split();
                self.transmit(r, Box::new(w), neg, shutdown).await
            }
            Conn::Tls(tls) => {
                // One TLS session for both directions: the halves share it behind a lock.
                let (r, w) = tokio::io::split(*tls);
                self.transmit(r, Box::new(w), neg, shutdown).await
            }
        };
        served.inspect_err(|e| {
            if matches!(e, NbdError::Protocol(_)) {
                count_protocol_error();
            }
        })
    }

    async fn transmit<R: AsyncRead + Unpin + Send>(
        &self,
        r: R,
        w: transmission::BoxWriter,
        neg: handshake::Negotiated,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(), NbdError> {
        let mut reader = BufReader::with_capacity(256 << 10, r);
        let writer = BufWriter::with_capacity(256 << 10, w);
        transmission::run(&mut reader, writer, neg, &self.inner.limits, shutdown).await
    }

    /// Greeting and options, through STARTTLS when the client asks for it. Reads are
    /// unbuffered here, so nothing a client sends after STARTTLS in plain text can be taken
    /// for part of the encrypted session: it goes to the TLS handshake, which fails.
    async fn negotiate(
        &self,
        mut tcp: TcpStream,
    ) -> Result<Option<(Conn, handshake::Negotiated)>, NbdError> {
        use handshake::{Ctx, Step, TlsState};
        let registry = self.inner.registry.as_ref();
        let limits = &self.inner.limits;
        let access = self.inner.security.access.as_deref();
        let tls = self.inner.security.tls.as_ref();
        let flags = {
            let (mut r, mut w) = tokio::io::split(&mut tcp);
            match handshake::greet(&mut r, &mut w).await? {
                Some(f) => f,
                None => return Ok(None),
            }
        };
        let ctx = Ctx {
            tls: match tls {
                None => TlsState::NotOffered,
                Some(t) => TlsState::Offered {
                    required: t.required,
                },
            },
            client: None,
            access,
        };
        let step = {
            let (mut r, mut w) = tokio::io::split(&mut tcp);
            handshake::options(&mut r, &mut w, registry, limits, &ctx, flags).await?
        };
        let tls = match (step, tls) {
            (None, _) => return Ok(None),
            (Some(Step::Export(neg)), _) => return Ok(Some((Conn::Plain(tcp), neg))),
            (Some(Step::StartTls), Some(t)) => t,
            (Some(Step::StartTls), None) => {
                return Err(NbdError::Protocol(
                    "STARTTLS accepted without TLS configured".into(),
                ))
            }
        };
        let mut stream = tokio_rustls::TlsAcceptor::from(tls.config.clone())
            .accept(tcp)
            .await
            .map_err(|e| {
                // A client that does not trust our certificate (GnuTLS, as QEMU and libnbd
                // use it) hangs up without an alert: say what that usually means.
                let hint = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    " (the client hung up mid-handshake: does it trust the CA that signed \
                     this gateway's certificate, and does the certificate name the address \
                     it dialed?)"
                } else {
                    ""
                };
                NbdError::Protocol(format!("TLS handshake failed: {e}{hint}"))
            })?;
        let client = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|c| (tls.client_name)(c.as_ref()));
        debug!(client = ?client, "NBD client switched to TLS");
        let ctx = Ctx {
            tls: TlsState::Active,
            client: client.as_deref(),
            access,
        };
        let step = {
            let (mut r, mut w) = tokio::io::split(&mut stream);
            handshake::options(&mut r, &mut w, registry, limits, &ctx, flags).await?
        };
        match step {
            None => Ok(None),
            Some(Step::Export(neg)) => Ok(Some((Conn::Tls(Box::new(stream)), neg))),
            Some(Step::StartTls) => Err(NbdError::Protocol(
                "STARTTLS accepted on an encrypted connection".into(),
            )),
        }
    }
}

fn count_protocol_error() {
    ::metrics::counter!(metrics::PROTOCOL_ERRORS_TOTAL).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_normalize() {
        let d = Limits::default();
        let n = d.clone().normalized();
        assert_eq!(
            (n.min_block_size, n.preferred_block_size, n.max_payload),
            (512, 4096, 32 << 20)
        );
        assert_eq!(n.max_in_flight, d.max_in_flight);
        let odd = Limits {
            min_block_size: 1000,
            preferred_block_size: 3,
            max_payload: 100,
            max_in_flight: 0,
            max_buffered_bytes: 0,
            max_discard: 0,
            ..Limits::default()
        }
        .normalized();
        assert_eq!(odd.min_block_size, 1024);
        assert_eq!(odd.max_payload, 64 << 10);
        assert_eq!(odd.preferred_block_size, 1024);
        assert_eq!(odd.max_in_flight, 1);
        assert_eq!(odd.max_buffered_bytes, 64 << 10);
        assert_eq!(odd.max_discard, 64 << 10);
    }
}
