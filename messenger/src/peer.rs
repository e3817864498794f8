//! The requesting side: one persistent connection to one address, shared by every caller.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use basalt_tls::Connector;
use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::FramedRead;

use basalt_auth::TicketCell;

use crate::auth::{read_verdict, write_authorizer};
use crate::frame::{Frame, FrameCodec, Kind, BANNER};
use crate::write::{write_frames, Outgoing};

/// Why a call got no reply. Callers branch on [`CallError::is_connection_failure`].
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CallError {
    /// No connection could be made (refused, unreachable, timed out, not a messenger):
    /// the request was not sent.
    #[error("cannot connect to {addr}: {why}")]
    Connect { addr: String, why: String },
    /// The connection broke after the request was queued and before its reply: it may or
    /// may not have been applied. Resend it with the same request id.
    #[error("connection to {addr} broke before the reply ({why}); the request may or may not have been applied")]
    Disconnected { addr: String, why: String },
    /// The peer could not handle the request (unknown message type, undecodable payload).
    #[error("{addr} could not handle the request: {why}")]
    Refused { addr: String, why: String },
    #[error("a {len}-byte request exceeds the messenger's {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    /// The connection's auth exchange failed (no ticket yet, a ticket the peer refused, or
    /// a peer that could not prove it holds the service secret): nothing was sent.
    #[error("{addr} and this client could not authenticate each other: {why}")]
    Unauthenticated { addr: String, why: String },
}

impl CallError {
    /// Whether the peer could not be reached or the connection broke: another attempt
    /// (after a map change, to the same or another peer) may succeed.
    pub fn is_connection_failure(&self) -> bool {
        matches!(
            self,
            CallError::Connect { .. } | CallError::Disconnected { .. }
        )
    }
}

type ReplySender = oneshot::Sender<Result<Frame, CallError>>;

/// Requests waiting for replies on one connection.
#[derive(Default)]
struct Waiting {
    /// Set once the connection broke: later calls fail at once and open a new one.
    broken: Option<String>,
    by_id: HashMap<u64, ReplySender>,
}

/// One live connection.
struct Link {
    queue: mpsc::UnboundedSender<Outgoing>,
    waiting: Arc<Mutex<Waiting>>,
    next_id: AtomicU64,
}

fn lock(w: &Mutex<Waiting>) -> std::sync::MutexGuard<'_, Waiting> {
    // A panic while holding this lock leaves only a map of senders behind: still usable.
    w.lock().unwrap_or_else(|p| p.into_inner())
}

/// Fails every waiting request and refuses new ones on this connection.
fn break_link(waiting: &Mutex<Waiting>, addr: &str, why: String) {
    let drained: Vec<ReplySender> = {
        let mut w = lock(waiting);
        if w.broken.is_none() {
            w.broken = Some(why.clone());
        }
        w.by_id.drain().map(|(_, s)| s).collect()
    };
    for s in drained {
        let _ = s.send(Err(CallError::Disconnected {
            addr: addr.to_string(),
            why: why.clone(),
        }));
    }
}

/// Removes a request from the waiting map if its caller gives up (timeout, cancellation),
/// so an unanswered request on a live connection does not stay there forever.
struct Forget<'a> {
    waiting: &'a Mutex<Waiting>,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        lock(self.waiting).by_id.remove(&self.id);
    }
}

impl Link {
    fn is_broken(&self) -> bool {
        lock(&self.waiting).broken.is_some()
    }

    async fn connect(
        addr: &str,
        connector: &Connector,
        timeout: Duration,
        max_payload: usize,
        ticket: &TicketCell,
    ) -> Result<Link, CallError> {
        let fail = |why: String| CallError::Connect {
            addr: addr.to_string(),
            why,
        };
        let unauthenticated = |why: String| CallError::Unauthenticated {
            addr: addr.to_string(),
            why,
        };
        let Some((authorizer, session_key)) = ticket.authorizer() else {
            return Err(unauthenticated(
                "no osd ticket yet (not authenticated with the monitors)".into(),
            ));
        };
        let opened = async {
            // TCP_NODELAY (the connector sets it): one small frame per 4 KiB write, which
            // Nagle would hold for the peer's delayed ACK.
            let mut s = connector.connect(addr).await.map_err(|e| e.to_string())?;
            let exchange = async {
                s.write_all(BANNER).await?;
                s.flush().await?;
                let mut answer = [0u8; BANNER.len()];
                s.read_exact(&mut answer).await?;
                if &answer != BANNER {
                    return Ok((answer, None));
                }
                write_authorizer(&mut s, &authorizer).await?;
                s.flush().await?;
                let verdict = read_verdict(&mut s).await?;
                Ok::<_, std::io::Error>((answer, Some(verdict)))
            };
            match exchange.await {
                Ok((answer, verdict)) => Ok((s, answer, verdict)),
                Err(e) => Err(e.to_string()),
            }
        };
        let (mut stream, answer, verdict) = tokio::time::timeout(timeout, opened)
            .await
            .map_err(|_| fail(format!("no answer within {timeout:?}")))?
            .map_err(fail)?;
        if &answer != BANNER {
            if basalt_tls::PLAIN_TEXT_REFUSAL.starts_with(&answer) {
                let mut rest = Vec::new();
                let _ = tokio::time::timeout(timeout, stream.read_to_end(&mut rest)).await;
                let said = String::from_utf8_lossy(&answer).into_owned()
                    + String::from_utf8_lossy(&rest).trim_end();
                return Err(fail(format!("the peer refused plain text: {said}")));
            }
            return Err(fail(
                "the peer does not speak the basalt messenger (an older daemon?)".into(),
            ));
        }
        match verdict {
            Some(Ok(proof)) => authorizer
                .check_reply(&session_key, &proof)
                .map_err(|e| unauthenticated(e.to_string()))?,
            Some(Err(why)) => return Err(unauthenticated(why)),
            None => return Err(unauthenticated("no verdict".into())),
        }
        let (read, write) = stream.into_split();
        let (queue, outgoing) = mpsc::unbounded_channel();
        let waiting = Arc::new(Mutex::new(Waiting::default()));
        let w = waiting.clone();
        let a = addr.to_string();
        tokio::spawn(async move {
            if let Err(e) = write_frames(write, outgoing).await {
                break_link(&w, &a, format!("write failed: {e}"));
            }
        });
        let w = waiting.clone();
        let a = addr.to_string();
        tokio::spawn(async move {
            let mut frames = FramedRead::new(read, FrameCodec::new(max_payload));
            let why = loop {
                match frames.next().await {
                    None => break "closed by the peer".to_string(),
                    Some(Err(e)) => break e.to_string(),
                    Some(Ok(f)) => {
                        let Some(s) = lock(&w).by_id.remove(&f.id) else {
                            // Its caller gave up; the reply is dropped.
                            continue;
                        };
                        let r = match f.kind {
                            Kind::Reply => Ok(f),
                            Kind::Error => Err(CallError::Refused {
                                addr: a.clone(),
                                why: String::from_utf8_lossy(&f.payload).into_owned(),
                            }),
                            Kind::Request => {
                                break "the peer sent a request on a client connection".into()
                            }
                        };
                        let _ = s.send(r);
                    }
                }
            };
            tracing::debug!(peer = %a, why = %why, "messenger connection ended");
            break_link(&w, &a, why);
        });
        Ok(Link {
            queue,
            waiting,
            next_id: AtomicU64::new(1),
        })
    }

    async fn call(&self, addr: &str, tag: u8, payload: Bytes) -> Result<Bytes, CallError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut w = lock(&self.waiting);
            if let Some(why) = &w.broken {
                return Err(CallError::Connect {
                    addr: addr.to_string(),
                    why: why.clone(),
                });
            }
            w.by_id.insert(id, tx);
        }
        let _forget = Forget {
            waiting: &self.waiting,
            id,
        };
        let disconnected = |why: &str| CallError::Disconnected {
            addr: addr.to_string(),
            why: why.to_string(),
        };
        self.queue
            .send(Outgoing::new(Kind::Request, tag, id, payload))
            .map_err(|_| disconnected("the connection's writer has stopped"))?;
        match rx.await {
            Ok(r) => r.map(|f| f.payload),
            Err(_) => Err(disconnected("the connection's reader has stopped")),
        }
    }
}

/// A peer's address and the connection to it, opened on first use and reopened after it
/// breaks. Cheap to share (`Arc<Peer>`); every caller's requests are pipelined on the one
/// connection.
pub struct Peer {
    addr: String,
    connector: Connector,
    connect_timeout: Duration,
    max_payload: usize,
    /// The caller's `osd` ticket: each new connection presents an authorizer from it.
    ticket: Arc<TicketCell>,
    link: tokio::sync::Mutex<Option<Arc<Link>>>,
}

impl Peer {
    /// A peer at `addr` (`host:port`), dialed through `connector` (TLS or plain text);
    /// nothing is connected until the first call, which authenticates with an authorizer
    /// from `ticket`.
    pub fn new(
        addr: &str,
        connector: Connector,
        connect_timeout: Duration,
        max_payload: usize,
        ticket: Arc<TicketCell>,
    ) -> Peer {
        Peer {
            addr: addr.to_string(),
            connector,
            connect_timeout,
            max_payload,
            ticket,
            link: tokio::sync::Mutex::new(None),
        }
    }

    /// Sends a `tag` request and waits for its reply's payload. Unbounded in time: callers
    /// bound it (dropping the future forgets the request).
    pub async fn call(&self, tag: u8, payload: Bytes) -> Result<Bytes, CallError> {
        if payload.len() > self.max_payload {
            return Err(CallError::TooLarge {
                len: payload.len(),
                max: self.max_payload,
            });
        }
        let link = self.link().await?;
        link.call(&self.addr, tag, payload).await
    }

    /// The live connection, or a new one. Callers arriving while one is being opened wait
    /// for it rather than open their own.
    async fn link(&self) -> Result<Arc<Link>, CallError> {
        let mut slot = self.link.lock().await;
        if let Some(l) = slot.as_ref().filter(|l| !l.is_broken()) {
            return Ok(l.clone());
        }
        *slot = None;
        let l = Arc::new(
            Link::connect(
                &self.addr,
                &self.connector,
                self.connect_timeout,
                self.max_payload,
                &self.ticket,
            )
            .await?,
        );
        *slot = Some(l.clone());
        Ok(l)
    }
}
