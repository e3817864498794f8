//! The transmission phase: one reader loop, one task per request, and a
//! combining reply sink.
//!
//! ```text
//!  socket ─▶ reader loop ──spawn──▶ request task ─┐  (≤ max_in_flight at once)
//!            (headers, WRITE        (Export call)  ├─▶ ReplySink ─▶ socket
//!             payloads, limits)     request task ─┘   (queue + writer lock)
//! ```
//!
//! Replies leave in completion order (NBD allows any order; the cookie
//! matches them up). A finished request queues its reply and, if the
//! socket's writer is free, writes it itself together with whatever else
//! is queued, then flushes once: no hand-off to a writer task at low queue
//! depth, one syscall for many replies at high queue depth. Memory is bounded per connection by two semaphores:
//! requests in flight, and payload bytes buffered (WRITE data read but not
//! yet applied, READ data not yet sent).

use std::any::Any;
use std::collections::{BTreeSet, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::handshake::Negotiated;
use crate::metrics::ConnMetrics;
use crate::proto::{self, *};
use crate::{Export, Limits, NbdError};

/// Orders FLUSH after writes: each write-like request (WRITE, TRIM,
/// WRITE_ZEROES) gets a sequence number when its header is read; a FLUSH
/// waits until every write-like request *received before it* on this
/// connection has completed, then calls [`Export::flush`].
///
/// The protocol only requires covering writes already replied to; we also
/// cover those still in flight when the FLUSH arrives, because clients
/// such as the Linux kernel send a flush as a barrier without waiting for
/// the replies of the writes before it.
#[derive(Default)]
pub(crate) struct WriteTracker {
    state: Mutex<TrackerState>,
    notify: Notify,
}

#[derive(Default)]
struct TrackerState {
    next: u64,
    in_flight: BTreeSet<u64>,
}

pub(crate) struct WriteGuard {
    tracker: Arc<WriteTracker>,
    seq: u64,
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        if let Ok(mut s) = self.tracker.state.lock() {
            s.in_flight.remove(&self.seq);
        }
        self.tracker.notify.notify_waiters();
    }
}

impl WriteTracker {
    pub(crate) fn begin(self: &Arc<Self>) -> WriteGuard {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let seq = s.next;
        s.next += 1;
        s.in_flight.insert(seq);
        WriteGuard {
            tracker: self.clone(),
            seq,
        }
    }

    /// A barrier position: every write begun so far is before it.
    pub(crate) fn barrier(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).next
    }

    fn clear_before(&self, barrier: u64) -> bool {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.in_flight.first().is_none_or(|&first| first >= barrier)
    }

    pub(crate) async fn wait(&self, barrier: u64) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.clear_before(barrier) {
                return;
            }
            notified.await;
        }
    }
}

/// Per-connection state shared by the request tasks.
struct Conn {
    export: Arc<dyn Export>,
    name: String,
    size: u64,
    read_only: bool,
    structured: bool,
    base_allocation: bool,
    max_payload: u32,
    max_extents: usize,
    tracker: Arc<WriteTracker>,
    metrics: ConnMetrics,
}

/// A reply ready to be written, with the resources it keeps reserved
/// until it is on the wire.
struct Reply {
    header: Bytes,
    data: Option<Bytes>,
    _permits: Permits,
}

struct Permits {
    _request: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

enum Ticket {
    None,
    /// Held only for its `Drop`, which releases waiting FLUSHes.
    Write(#[allow(dead_code)] WriteGuard),
    Flush(u64),
}

enum Success {
    Ack,
    Data(Bytes),
    Extents(Vec<(u32, u32)>),
}

/// Drives the transmission phase until DISC, EOF, a protocol error, the
/// writer failing, or server shutdown; in every case requests already
/// read are completed and answered before the connection is closed.
pub(crate) async fn run<R>(
    reader: &mut BufReader<R>,
    writer: BufWriter<BoxWriter>,
    neg: Negotiated,
    limits: &Limits,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin + Send,
{
    let conn = Arc::new(Conn {
        read_only: neg.export.read_only(),
        export: neg.export,
        metrics: ConnMetrics::new(&neg.name),
        name: neg.name,
        size: neg.size,
        structured: neg.structured,
        base_allocation: neg.base_allocation,
        max_payload: limits.max_payload,
        max_extents: limits.max_extents,
        tracker: Arc::new(WriteTracker::default()),
    });
    debug!(export = %conn.name, flags = neg.flags, structured = conn.structured, "transmission phase");

    let requests = Arc::new(Semaphore::new(limits.max_in_flight.max(1)));
    // Every single request must fit in the byte budget.
    let budget = limits.max_buffered_bytes.max(limits.max_payload);
    let bytes = Arc::new(Semaphore::new(budget as usize));

    let sink = Arc::new(ReplySink::new(writer));
    // Request tasks belong to the connection: if the connection task is
    // dropped (server shutdown grace expired), they are aborted with it and
    // release the socket.
    let mut tasks = JoinSet::new();

    let result: Result<(), NbdError> = loop {
        let stop = async {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        let next = next_request(reader, &conn, &requests, &bytes, limits);
        let item = tokio::select! {
            biased;
            _ = sink.dead_notify.notified() => break Ok(()),
            _ = stop => {
                debug!(export = %conn.name, "server shutting down: no new requests");
                break Ok(());
            }
            item = next => item,
        };
        match item {
            Ok(Next::Disconnect) => break Ok(()),
            Ok(Next::Immediate(req, err, permit)) => {
                // Answered without touching the export (e.g. an oversized
                // WRITE whose payload was discarded).
                let received = Instant::now();
                send_reply(&conn, &sink, req, Err(err), permit, None, received).await;
            }
            Ok(Next::Request(req, payload, permits)) => {
                let ticket = match req.typ {
                    CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => Ticket::Write(conn.tracker.begin()),
                    CMD_FLUSH => Ticket::Flush(conn.tracker.barrier()),
                    _ => Ticket::None,
                };
                let conn = conn.clone();
                let sink = sink.clone();
                let received = Instant::now();
                tasks.spawn(async move {
                    // An Export that panics fails its request with EIO;
                    // the connection and the server go on.
                    let result = CatchUnwind(Box::pin(execute(&conn, &req, payload, ticket)))
                        .await
                        .unwrap_or_else(|panic| {
                            let msg = panic_message(&panic);
                            warn!(export = %conn.name, op = command_name(req.typ), %msg, "export panicked");
                            Err(NbdError::Io(format!("export panicked: {msg}")))
                        });
                    let (request, bytes) = permits;
                    send_reply(&conn, &sink, req, result, request, bytes, received).await;
                });
            }
            Err(e) => break Err(e),
        }
        // Forget finished tasks (their results are unit).
        while tasks.try_join_next().is_some() {}
    };

    // Every request permit back means every reply was written (or
    // dropped because the socket failed).
    let _all = requests
        .acquire_many(limits.max_in_flight.max(1) as u32)
        .await;
    conn.export.disconnect().await;
    sink.close().await;
    result
}

enum Next {
    Disconnect,
    Request(
        Request,
        Option<Bytes>,
        (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
    ),
    Immediate(Request, NbdError, OwnedSemaphorePermit),
}

/// Reads one request header (and a WRITE's payload), taking the permits
/// that bound this connection's memory.
async fn next_request<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    conn: &Conn,
    requests: &Arc<Semaphore>,
    bytes: &Arc<Semaphore>,
    limits: &Limits,
) -> Result<Next, NbdError> {
    let mut hdr = [0u8; REQUEST_HEADER_LEN];
    match reader.read_exact(&mut hdr).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            debug!(export = %conn.name, "client closed the connection without NBD_CMD_DISC");
            return Ok(Next::Disconnect);
        }
        Err(e) => return Err(e.into()),
    }
    let req = parse_request(&hdr)
        .map_err(|m| NbdError::Protocol(format!("bad request magic {m:#010x}")))?;
    if req.typ == CMD_DISC {
        return Ok(Next::Disconnect);
    }
    // The semaphores are never closed, so acquire cannot fail.
    let request_permit = requests
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| NbdError::Shutdown("connection closing".into()))?;

    let payload_len = if req.typ == CMD_WRITE { req.length } else { 0 };
    if payload_len > conn.max_payload {
        // The header's length tells us exactly how much to skip, so the
        // stream stays in sync and reading the payload away is safe; we do
        // it with a fixed scratch buffer (memory stays bounded) and answer
        // EINVAL. Beyond `max_discard` bytes the length is more likely a
        // corrupt frame than a sloppy client: close instead of draining.
        if payload_len as u64 > limits.max_discard as u64 {
            return Err(NbdError::Protocol(format!(
                "WRITE payload of {payload_len} bytes exceeds the {}-byte limit",
                conn.max_payload
            )));
        }
        discard(reader, payload_len as u64).await?;
        let err = NbdError::Invalid(format!(
            "WRITE of {payload_len} bytes exceeds the maximum payload of {} bytes",
            conn.max_payload
        ));
        return Ok(Next::Immediate(req, err, request_permit));
    }

    // READ reserves budget for the data it will hold until it is sent.
    let reserve = match req.typ {
        CMD_WRITE => req.length,
        CMD_READ if req.length <= conn.max_payload => req.length,
        _ => 0,
    };
    let byte_permit = if reserve > 0 {
        Some(
            bytes
                .clone()
                .acquire_many_owned(reserve)
                .await
                .map_err(|_| NbdError::Shutdown("connection closing".into()))?,
        )
    } else {
        None
    };
    let payload = if req.typ == CMD_WRITE {
        Some(read_payload(reader, payload_len as usize).await?)
    } else {
        None
    };
    Ok(Next::Request(req, payload, (request_permit, byte_permit)))
}

async fn read_payload<R: AsyncRead + Unpin>(r: &mut R, len: usize) -> Result<Bytes, NbdError> {
    let mut buf = BytesMut::with_capacity(len);
    while buf.len() < len {
        let want = (len - buf.len()) as u64;
        let n = (&mut *r).take(want).read_buf(&mut buf).await?;
        if n == 0 {
            return Err(NbdError::Protocol(format!(
                "connection closed after {} of {len} WRITE payload bytes",
                buf.len()
            )));
        }
    }
    Ok(buf.freeze())
}

async fn discard<R: AsyncRead + Unpin>(r: &mut R, len: u64) -> Result<(), NbdError> {
    let copied = tokio::io::copy(&mut (&mut *r).take(len), &mut tokio::io::sink()).await?;
    if copied < len {
        return Err(NbdError::Protocol(
            "connection closed inside a WRITE payload".into(),
        ));
    }
    Ok(())
}

/// Checks flags, bounds and permissions before the export is called.
fn validate(conn: &Conn, req: &Request) -> Result<(), NbdError> {
    let op = command_name(req.typ);
    let allowed = CMD_FLAG_FUA
        | match req.typ {
            CMD_READ if conn.structured => CMD_FLAG_DF,
            CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => 0,
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            other => return Err(NbdError::Invalid(format!("unknown command {other}"))),
        };
    if req.flags & !allowed != 0 {
        return Err(NbdError::Invalid(format!(
            "flags {:#x} are not valid for {op}",
            req.flags & !allowed
        )));
    }
    let writes = matches!(req.typ, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && conn.read_only {
        return Err(NbdError::PermissionDenied(format!(
            "{op} on read-only export {:?}",
            conn.name
        )));
    }
    if req.typ == CMD_FLUSH {
        return Ok(());
    }
    let end = req.offset.checked_add(req.length as u64);
    if end.is_none_or(|e| e > conn.size) {
        let msg = format!(
            "{op} of {} bytes at offset {} goes past the end of the {}-byte export",
            req.length, req.offset, conn.size
        );
        // Writes past the end get ENOSPC, as proto.md recommends;
        // everything else EINVAL.
        return Err(if matches!(req.typ, CMD_WRITE | CMD_WRITE_ZEROES) {
            NbdError::NoSpace(msg)
        } else {
            NbdError::Invalid(msg)
        });
    }
    match req.typ {
        CMD_READ if req.length > conn.max_payload => Err(NbdError::Invalid(format!(
            "read of {} bytes exceeds the maximum payload of {} bytes",
            req.length, conn.max_payload
        ))),
        CMD_BLOCK_STATUS if !conn.base_allocation => Err(NbdError::Invalid(
            "block status without a negotiated base:allocation context".into(),
        )),
        CMD_BLOCK_STATUS if req.length == 0 => {
            Err(NbdError::Invalid("block status of zero bytes".into()))
        }
        _ => Ok(()),
    }
}

async fn execute(
    conn: &Conn,
    req: &Request,
    payload: Option<Bytes>,
    ticket: Ticket,
) -> Result<Success, NbdError> {
    validate(conn, req)?;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let e = &conn.export;
    let res = match req.typ {
        CMD_READ => {
            if req.length == 0 {
                return Ok(Success::Data(Bytes::new()));
            }
            let data = e.read(req.offset, req.length).await?;
            if data.len() != req.length as usize {
                return Err(NbdError::Io(format!(
                    "export returned {} bytes for a read of {}",
                    data.len(),
                    req.length
                )));
            }
            Success::Data(data)
        }
        CMD_WRITE => {
            let data = payload.unwrap_or_default();
            if !data.is_empty() {
                e.write(req.offset, data, fua).await?;
            }
            Success::Ack
        }
        CMD_FLUSH => {
            if let Ticket::Flush(barrier) = &ticket {
                conn.tracker.wait(*barrier).await;
            }
            e.flush().await?;
            Success::Ack
        }
        CMD_TRIM => {
            if req.length > 0 {
                e.trim(req.offset, req.length, fua).await?;
            }
            Success::Ack
        }
        CMD_WRITE_ZEROES => {
            if req.length > 0 {
                let may_trim = req.flags & CMD_FLAG_NO_HOLE == 0;
                let fast = req.flags & CMD_FLAG_FAST_ZERO != 0;
                e.write_zeroes(req.offset, req.length, fua, may_trim, fast)
                    .await?;
            }
            Success::Ack
        }
        // A hint; nothing to prefetch into.
        CMD_CACHE => Success::Ack,
        CMD_BLOCK_STATUS => {
            let extents = e.block_status(req.offset, req.length).await?;
            let req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
            let ext = proto::normalize_extents(
                extents.iter().map(|x| (x.length, x.flags)),
                req.length,
                req_one,
                conn.max_extents,
            );
            if ext.is_empty() {
                return Err(NbdError::Io("export returned no extents".into()));
            }
            Success::Extents(ext)
        }
        other => return Err(NbdError::Invalid(format!("unknown command {other}"))),
    };
    // The write guard (if any) is dropped here, after the export call
    // completed: a later FLUSH may proceed.
    drop(ticket);
    Ok(res)
}

async fn send_reply(
    conn: &Conn,
    sink: &ReplySink,
    req: Request,
    result: Result<Success, NbdError>,
    request_permit: OwnedSemaphorePermit,
    byte_permit: Option<OwnedSemaphorePermit>,
    received: Instant,
) {
    let mut header = BytesMut::with_capacity(64);
    let mut data = None;
    let ok = result.is_ok();
    let (mut read_bytes, mut written_bytes) = (0u64, 0u64);
    match result {
        Ok(Success::Ack) => {
            encode_simple_reply(&mut header, req.cookie, 0);
            if req.typ == CMD_WRITE {
                written_bytes = req.length as u64;
            }
        }
        Ok(Success::Data(bytes)) => {
            read_bytes = bytes.len() as u64;
            if !conn.structured {
                encode_simple_reply(&mut header, req.cookie, 0);
                data = Some(bytes);
            } else if bytes.is_empty() {
                encode_none_done(&mut header, req.cookie);
            } else if bytes.iter().all(|&b| b == 0) {
                // One hole chunk instead of the zeroes (also fine with DF:
                // it is still a single content chunk).
                encode_offset_hole(
                    &mut header,
                    req.cookie,
                    true,
                    req.offset,
                    bytes.len() as u32,
                );
            } else {
                encode_offset_data_header(
                    &mut header,
                    req.cookie,
                    true,
                    req.offset,
                    bytes.len() as u32,
                );
                data = Some(bytes);
            }
        }
        Ok(Success::Extents(ext)) => {
            encode_block_status(&mut header, req.cookie, META_BASE_ALLOCATION_ID, &ext);
        }
        Err(e) => {
            // Backend failures matter to an operator; bad requests are the
            // client's business (both are counted in the metrics).
            if matches!(e, NbdError::Io(_) | NbdError::NoMemory(_)) {
                warn!(export = %conn.name, op = command_name(req.typ), offset = req.offset,
                      length = req.length, error = %e, "request failed");
            } else {
                debug!(export = %conn.name, op = command_name(req.typ), offset = req.offset,
                       length = req.length, error = %e, "request failed");
            }
            if conn.structured {
                encode_error_chunk(&mut header, req.cookie, e.errno(), &e.to_string());
            } else {
                encode_simple_reply(&mut header, req.cookie, e.errno());
            }
        }
    }
    conn.metrics.record(
        req.typ,
        received.elapsed().as_secs_f64(),
        ok,
        read_bytes,
        written_bytes,
    );
    let reply = Reply {
        header: header.freeze(),
        data,
        _permits: Permits {
            _request: request_permit,
            _bytes: byte_permit,
        },
    };
    sink.submit(reply).await;
}

/// Turns a panic while polling the inner future into an `Err`.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.get_mut().0.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

fn panic_message(p: &Box<dyn Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

/// The socket's write side, shared by the request tasks.
///
/// Whoever submits a reply queues it, then tries to take the writer: the
/// holder writes everything queued, flushes, releases, and looks at the
/// queue once more. A submitter that finds the writer busy just returns,
/// and the holder's final look picks its reply up (it queued before its
/// `try_lock` failed, and the holder looks after releasing), so no reply is
/// stranded. Each reply keeps its permits until it is written, so the
/// request semaphore also counts replies not yet on the wire.
struct ReplySink {
    queue: Mutex<VecDeque<Reply>>,
    writer: tokio::sync::Mutex<BufWriter<BoxWriter>>,
    dead: AtomicBool,
    dead_notify: Notify,
}

pub(crate) type BoxWriter = Box<dyn AsyncWrite + Unpin + Send>;

impl ReplySink {
    fn new(w: BufWriter<BoxWriter>) -> Self {
        ReplySink {
            queue: Mutex::new(VecDeque::new()),
            writer: tokio::sync::Mutex::new(w),
            dead: AtomicBool::new(false),
            dead_notify: Notify::new(),
        }
    }

    fn take_queued(&self) -> VecDeque<Reply> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()))
    }

    async fn submit(&self, reply: Reply) {
        if self.dead.load(Ordering::Acquire) {
            return; // dropping the reply releases its permits
        }
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(reply);
        loop {
            let Ok(mut w) = self.writer.try_lock() else {
                return;
            };
            if let Err(e) = Self::drain(&mut w, || self.take_queued()).await {
                debug!(error = %e, "writing replies failed");
                self.dead.store(true, Ordering::Release);
                drop(self.take_queued());
                self.dead_notify.notify_one();
                return;
            }
            drop(w);
            if self
                .queue
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
            {
                return;
            }
        }
    }

    async fn drain(
        w: &mut BufWriter<BoxWriter>,
        mut take: impl FnMut() -> VecDeque<Reply>,
    ) -> std::io::Result<()> {
        loop {
            let batch = take();
            if batch.is_empty() {
                break;
            }
            for reply in batch {
                w.write_all(&reply.header).await?;
                if let Some(d) = &reply.data {
                    w.write_all(d).await?;
                }
            }
        }
        w.flush().await
    }

    /// After every reply has been submitted: flush and half-close.
    async fn close(&self) {
        let mut w = self.writer.lock().await;
        let queued = self.take_queued();
        if !self.dead.load(Ordering::Acquire) {
            let mut once = Some(queued);
            let _ = Self::drain(&mut w, || once.take().unwrap_or_default()).await;
            let _ = w.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn flush_waits_only_for_earlier_writes() {
        let t = Arc::new(WriteTracker::default());
        let w1 = t.begin();
        let barrier = t.barrier();
        let w2 = t.begin(); // after the flush: must not block it
        let t2 = t.clone();
        let flush = tokio::spawn(async move { t2.wait(barrier).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!flush.is_finished());
        drop(w1);
        tokio::time::timeout(Duration::from_secs(5), flush)
            .await
            .expect("flush released")
            .unwrap();
        drop(w2);
        t.wait(t.barrier()).await;
    }
}
