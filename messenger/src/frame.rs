//! The wire format: a banner once per connection, then frames.
//!
//! ```text
//! connection: client sends BANNER (8 bytes), server answers BANNER, then the auth exchange
//!             (`auth.rs`: the client's authorizer, the server's verdict), then frames both ways
//! frame:      header (24 bytes) | payload (len bytes)
//! header:     version u8 | kind u8 | tag u8 | flags u8 (0) | request id u64 LE
//!             | payload len u32 LE | crc32c(payload) u32 LE | crc32c(header[0..20]) u32 LE
//! ```
//!
//! The header carries its own checksum so a corrupt length is caught before it is trusted
//! (a length is never used to allocate until the header checks out, and never beyond the
//! codec's limit); the payload checksum catches corruption a TCP checksum misses.
//! crc32c because it is hardware-accelerated here, as in the store.

use bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::Decoder;

/// What a client sends first and the server answers: it tells this messenger from HTTP/2
/// (whose preface starts with `P`) on a shared port, and its last byte is the protocol
/// version a server would refuse.
pub const BANNER: &[u8; 8] = b"BASALTM1";
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 24;
/// The frame format version this build speaks.
pub const VERSION: u8 = 1;

/// What a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A request; `tag` says which message the payload is.
    Request = 1,
    /// The reply to the request with the same id.
    Reply = 2,
    /// The request with the same id could not be handled (the payload is a UTF-8 reason):
    /// an unknown tag, or a payload that does not decode.
    Error = 3,
}

/// One message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    /// The message type, assigned by the protocol above (`basalt_proto::data_path`).
    pub tag: u8,
    /// Chosen by the requester, echoed by the reply.
    pub id: u64,
    pub payload: Bytes,
}

/// Why bytes received are not a frame. Every one of these ends the connection: after a bad
/// header nothing later on the stream can be trusted to be aligned.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame header checksum mismatch (corrupt stream or not a basalt messenger peer)")]
    HeaderChecksum,
    #[error("frame version {0} is not supported (this build speaks version {VERSION}); upgrade the older side")]
    Version(u8),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame flags {0:#x} are not defined in version {VERSION}")]
    Flags(u8),
    #[error("frame payload of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("payload checksum mismatch in frame {id}")]
    PayloadChecksum { id: u64 },
    #[error("the peer was not authenticated: {0}")]
    Unauthenticated(String),
    #[error("the peer did not open with the basalt messenger banner")]
    Banner,
    #[error("connection I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// The header of `frame`, checksums included.
pub fn encode_header(kind: Kind, tag: u8, id: u64, payload: &[u8]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = VERSION;
    h[1] = kind as u8;
    h[2] = tag;
    h[3] = 0;
    h[4..12].copy_from_slice(&id.to_le_bytes());
    // Callers bound payloads by the limit, which is far below 4 GiB.
    h[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    h[16..20].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    let crc = crc32c::crc32c(&h[..20]);
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    h
}

/// A parsed, checked header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    kind: Kind,
    tag: u8,
    id: u64,
    len: usize,
    payload_crc: u32,
}

fn u32_at(h: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]])
}

fn decode_header(h: &[u8], max_payload: usize) -> Result<Header, FrameError> {
    if crc32c::crc32c(&h[..20]) != u32_at(h, 20) {
        return Err(FrameError::HeaderChecksum);
    }
    if h[0] != VERSION {
        return Err(FrameError::Version(h[0]));
    }
    let kind = match h[1] {
        1 => Kind::Request,
        2 => Kind::Reply,
        3 => Kind::Error,
        other => return Err(FrameError::UnknownKind(other)),
    };
    if h[3] != 0 {
        return Err(FrameError::Flags(h[3]));
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&h[4..12]);
    let len = u32_at(h, 12) as usize;
    if len > max_payload {
        return Err(FrameError::TooLarge {
            len,
            max: max_payload,
        });
    }
    Ok(Header {
        kind,
        tag: h[2],
        id: u64::from_le_bytes(id),
        len,
        payload_crc: u32_at(h, 16),
    })
}

/// Splits a byte stream into frames (for `tokio_util::codec::FramedRead`). A payload is
/// split off the read buffer as it is, so it reaches the handler without another copy.
pub struct FrameCodec {
    max_payload: usize,
    /// The header of the frame whose payload is still arriving.
    header: Option<Header>,
}

impl FrameCodec {
    /// A codec refusing payloads over `max_payload` bytes.
    pub fn new(max_payload: usize) -> FrameCodec {
        FrameCodec {
            max_payload,
            header: None,
        }
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let header = match self.header {
            Some(h) => h,
            None => {
                if src.len() < HEADER_LEN {
                    return Ok(None);
                }
                let h = decode_header(&src[..HEADER_LEN], self.max_payload)?;
                src.advance(HEADER_LEN);
                // Checked against the limit above: the one allocation a peer can cause.
                src.reserve(h.len.saturating_sub(src.len()));
                self.header = Some(h);
                h
            }
        };
        if src.len() < header.len {
            return Ok(None);
        }
        self.header = None;
        let payload = src.split_to(header.len).freeze();
        if crc32c::crc32c(&payload) != header.payload_crc {
            return Err(FrameError::PayloadChecksum { id: header.id });
        }
        Ok(Some(Frame {
            kind: header.kind,
            tag: header.tag,
            id: header.id,
            payload,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, RngCore, SeedableRng};

    fn wire(frames: &[Frame]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            out.extend_from_slice(&encode_header(f.kind, f.tag, f.id, &f.payload));
            out.extend_from_slice(&f.payload);
        }
        out
    }

    fn frame(id: u64, len: usize) -> Frame {
        Frame {
            kind: Kind::Request,
            tag: 7,
            id,
            payload: Bytes::from(
                (0..len)
                    .map(|i| (i * 31 + id as usize) as u8)
                    .collect::<Vec<_>>(),
            ),
        }
    }

    /// Feeds `bytes` to a codec in pieces of the given sizes, as a socket would deliver them.
    fn feed(
        bytes: &[u8],
        pieces: &mut dyn FnMut() -> usize,
        max: usize,
    ) -> Result<Vec<Frame>, FrameError> {
        let mut codec = FrameCodec::new(max);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let n = pieces().clamp(1, bytes.len() - at);
            buf.extend_from_slice(&bytes[at..at + n]);
            at += n;
            while let Some(f) = codec.decode(&mut buf)? {
                out.push(f);
            }
            assert!(buf.capacity() <= max + HEADER_LEN + 64 * 1024 + bytes.len());
        }
        Ok(out)
    }

    #[test]
    fn frames_survive_any_split_of_the_stream() {
        let frames: Vec<Frame> = [0, 1, 4096, 100_000, 3]
            .iter()
            .enumerate()
            .map(|(i, &l)| frame(i as u64, l))
            .collect();
        let bytes = wire(&frames);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..50 {
            let max_piece = rng.random_range(1..5000);
            let got = feed(&bytes, &mut || rng.random_range(1..=max_piece), 1 << 20)
                .expect("valid stream");
            assert_eq!(got, frames);
        }
    }

    #[test]
    fn a_corrupt_header_or_payload_is_refused() {
        let bytes = wire(&[frame(9, 64)]);
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            let r = feed(&bad, &mut || usize::MAX, 1 << 20);
            assert!(r.is_err(), "a flipped bit at byte {at} went unnoticed");
        }
    }

    #[test]
    fn an_oversized_length_is_refused_before_allocating() {
        let f = frame(1, 2048);
        let bytes = wire(&[f]);
        match feed(&bytes, &mut || 30, 1024) {
            Err(FrameError::TooLarge {
                len: 2048,
                max: 1024,
            }) => {}
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    /// Random and mutated streams (seeded; `MESSENGER_FUZZ_SEED` replays one): the decoder
    /// returns frames or an error, never panics, and never reserves beyond its limit.
    #[test]
    fn random_input_never_panics_or_allocates_without_bound() {
        let base: u64 = std::env::var("MESSENGER_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed);
        let valid = wire(&[frame(1, 10), frame(2, 300), frame(3, 0)]);
        for case in 0..3000u64 {
            let seed = base.wrapping_add(case);
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut bytes = if rng.random_bool(0.5) {
                let mut b = vec![0u8; rng.random_range(0..200)];
                rng.fill_bytes(&mut b);
                b
            } else {
                valid.clone()
            };
            for _ in 0..rng.random_range(0..4) {
                if bytes.is_empty() {
                    break;
                }
                let at = rng.random_range(0..bytes.len());
                bytes[at] = rng.random();
            }
            let max = 512;
            let r = std::panic::catch_unwind(|| {
                let mut piece_rng = rand::rngs::StdRng::seed_from_u64(seed ^ 1);
                feed(&bytes, &mut || piece_rng.random_range(1..64), max).map(|f| f.len())
            });
            assert!(
                r.is_ok(),
                "decoder panicked; replay with MESSENGER_FUZZ_SEED={seed}"
            );
        }
    }
}
