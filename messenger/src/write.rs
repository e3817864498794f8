//! The sending half of a connection: one task that owns the socket's write half and writes
//! every queued frame, header and payload slices together, with `writev`.

use std::io::IoSlice;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::frame::{encode_header, Kind, HEADER_LEN};

/// One frame waiting to be written.
pub(crate) struct Outgoing {
    header: [u8; HEADER_LEN],
    payload: Bytes,
}

impl Outgoing {
    pub(crate) fn new(kind: Kind, tag: u8, id: u64, payload: Bytes) -> Outgoing {
        Outgoing {
            header: encode_header(kind, tag, id, &payload),
            payload,
        }
    }
}

/// Frames gathered into one `writev` at most (two slices each; Linux allows 1024).
const MAX_BATCH_FRAMES: usize = 256;
/// Payload bytes gathered into one `writev` at most, so one batch does not hold the socket
/// for long while later frames wait.
const MAX_BATCH_BYTES: usize = 4 << 20;

/// Writes frames from `queue` until it closes or the socket fails; the error is returned so
/// the owner can fail what is waiting for replies. Frames queued while a write was in
/// progress go out together in the next one.
pub(crate) async fn write_frames(
    mut socket: basalt_tls::WriteHalf,
    mut queue: mpsc::UnboundedReceiver<Outgoing>,
) -> std::io::Result<()> {
    let mut batch: Vec<Outgoing> = Vec::new();
    while let Some(first) = queue.recv().await {
        let mut bytes = first.payload.len();
        batch.push(first);
        while batch.len() < MAX_BATCH_FRAMES && bytes < MAX_BATCH_BYTES {
            match queue.try_recv() {
                Ok(o) => {
                    bytes += o.payload.len();
                    batch.push(o);
                }
                Err(_) => break,
            }
        }
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() * 2);
        for o in &batch {
            slices.push(IoSlice::new(&o.header));
            if !o.payload.is_empty() {
                slices.push(IoSlice::new(&o.payload));
            }
        }
        write_all_vectored(&mut socket, &mut slices).await?;
        batch.clear();
        if queue.is_empty() {
            // TLS keeps what the socket did not take in its own buffer until the next write
            // or a flush: without this the tail of a large frame would wait for the next
            // frame. Plain TCP's flush does nothing.
            socket.flush().await?;
        }
    }
    socket.shutdown().await
}

async fn write_all_vectored(
    socket: &mut basalt_tls::WriteHalf,
    mut slices: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    while !slices.is_empty() {
        let n = socket.write_vectored(slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}
