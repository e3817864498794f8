//! NBD wire format: constants and sans-IO encoding/decoding of frames.
//!
//! Everything here is pure (no sockets) so it can be unit tested byte for
//! byte. Field layouts follow NetworkBlockDevice/nbd `doc/proto.md`; all
//! integers are big-endian.

use bytes::{BufMut, BytesMut};

// ---- handshake ---------------------------------------------------------

/// "NBDMAGIC": first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle magic, also prefixes every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic prefixing every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flags (server → client, 16 bits).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

/// Client flags (client → server, 32 bits).
pub const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_FLAG_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_PLATFORM: u32 = (1 << 31) + 4;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// `NBD_REP_INFO` information types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags (16 bits, sent with the export size).
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_RESIZE: u16 = 1 << 9;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// The one metadata context this server offers.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
/// The id we hand out for `base:allocation` on `NBD_OPT_SET_META_CONTEXT`.
pub const META_BASE_ALLOCATION_ID: u32 = 1;

// ---- transmission ------------------------------------------------------

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Size of a compact (non-extended) request header.
pub const REQUEST_HEADER_LEN: usize = 28;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Structured reply flags and chunk types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// Errno values allowed on the wire.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Longest string (export name, error message) the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;

// ---- helpers for reading big-endian fields out of a byte slice ---------

/// A cursor over an option's payload that never panics: every read
/// returns `None` when the payload is too short.
#[derive(Debug)]
pub struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Cursor { buf }
    }
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }
    pub fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self) -> Option<u32> {
        self.bytes(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self) -> Option<u64> {
        self.bytes(8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_be_bytes(a)
        })
    }
    /// A u32-length-prefixed UTF-8 string of at most [`MAX_STRING_LEN`] bytes.
    pub fn string(&mut self) -> Option<&'a str> {
        let len = self.u32()? as usize;
        if len > MAX_STRING_LEN {
            return None;
        }
        std::str::from_utf8(self.bytes(len)?).ok()
    }
}

// ---- option haggling ---------------------------------------------------

/// Payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

/// Parses an INFO/GO payload; `None` if it is malformed (wrong lengths,
/// trailing bytes, bad UTF-8).
pub fn parse_info_request(data: &[u8]) -> Option<InfoRequest> {
    let mut c = Cursor::new(data);
    let name = c.string()?.to_owned();
    let n = c.u16()? as usize;
    if c.remaining() != n * 2 {
        return None;
    }
    let requests = (0..n).map(|_| c.u16()).collect::<Option<Vec<_>>>()?;
    Some(InfoRequest { name, requests })
}

/// Payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub name: String,
    pub queries: Vec<String>,
}

pub fn parse_meta_context_request(data: &[u8]) -> Option<MetaContextRequest> {
    let mut c = Cursor::new(data);
    let name = c.string()?.to_owned();
    let n = c.u32()? as usize;
    // Each query takes at least 4 bytes; this also bounds the allocation.
    if n > c.remaining() / 4 {
        return None;
    }
    let mut queries = Vec::with_capacity(n);
    for _ in 0..n {
        queries.push(c.string()?.to_owned());
    }
    if c.remaining() != 0 {
        return None;
    }
    Some(MetaContextRequest { name, queries })
}

/// The server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn encode_greeting(flags: u16) -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&flags.to_be_bytes());
    b
}

/// Header of a client option: (magic, option, length).
pub fn parse_option_header(b: &[u8; 16]) -> (u64, u32, u32) {
    let mut c = Cursor::new(b);
    // The cursor cannot run short on a 16-byte array.
    (
        c.u64().unwrap_or(0),
        c.u32().unwrap_or(0),
        c.u32().unwrap_or(0),
    )
}

/// One option reply: magic, option, reply type, length, data.
pub fn encode_option_reply(out: &mut BytesMut, option: u32, reply_type: u32, data: &[u8]) {
    out.reserve(20 + data.len());
    out.put_u64(OPT_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply_type);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

/// `NBD_REP_SERVER` payload for one export.
pub fn rep_server_payload(name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len());
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// `NBD_REP_INFO` / `NBD_INFO_EXPORT` payload.
pub fn info_export_payload(size: u64, flags: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

/// `NBD_REP_INFO` payload carrying a string (`NBD_INFO_NAME`, `NBD_INFO_DESCRIPTION`).
pub fn info_string_payload(info: u16, s: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + s.len());
    v.extend_from_slice(&info.to_be_bytes());
    v.extend_from_slice(s.as_bytes());
    v
}

/// `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE` payload.
pub fn info_block_size_payload(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(14);
    v.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    v.extend_from_slice(&min.to_be_bytes());
    v.extend_from_slice(&preferred.to_be_bytes());
    v.extend_from_slice(&max.to_be_bytes());
    v
}

/// `NBD_REP_META_CONTEXT` payload.
pub fn meta_context_payload(id: u32, name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len());
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// Reply to the legacy `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zero
/// bytes unless NO_ZEROES was negotiated.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(10 + 124);
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        v.extend_from_slice(&[0u8; 124]);
    }
    v
}

// ---- transmission ------------------------------------------------------

/// A compact request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// Decodes a request header; `Err(magic)` if the magic is wrong (the
/// stream cannot be resynchronised then: the caller closes).
pub fn parse_request(b: &[u8; REQUEST_HEADER_LEN]) -> Result<Request, u32> {
    let mut c = Cursor::new(b);
    let magic = c.u32().unwrap_or(0);
    if magic != REQUEST_MAGIC {
        return Err(magic);
    }
    Ok(Request {
        flags: c.u16().unwrap_or(0),
        typ: c.u16().unwrap_or(0),
        cookie: c.u64().unwrap_or(0),
        offset: c.u64().unwrap_or(0),
        length: c.u32().unwrap_or(0),
    })
}

pub fn encode_request(out: &mut BytesMut, r: &Request) {
    out.put_u32(REQUEST_MAGIC);
    out.put_u16(r.flags);
    out.put_u16(r.typ);
    out.put_u64(r.cookie);
    out.put_u64(r.offset);
    out.put_u32(r.length);
}

pub fn command_name(typ: u16) -> &'static str {
    match typ {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_DISC => "disc",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_CACHE => "cache",
        CMD_WRITE_ZEROES => "write_zeroes",
        CMD_BLOCK_STATUS => "block_status",
        _ => "unknown",
    }
}

/// Simple reply header (16 bytes); read data, if any, follows it.
pub fn encode_simple_reply(out: &mut BytesMut, cookie: u64, error: u32) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(cookie);
}

/// Structured reply chunk header (20 bytes); `len` bytes of payload follow.
pub fn encode_chunk_header(out: &mut BytesMut, cookie: u64, flags: u16, typ: u16, len: u32) {
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(flags);
    out.put_u16(typ);
    out.put_u64(cookie);
    out.put_u32(len);
}

/// `NBD_REPLY_TYPE_OFFSET_DATA` header plus the offset; `data_len` bytes of
/// data must follow.
pub fn encode_offset_data_header(
    out: &mut BytesMut,
    cookie: u64,
    done: bool,
    offset: u64,
    data_len: u32,
) {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    encode_chunk_header(out, cookie, flags, REPLY_TYPE_OFFSET_DATA, 8 + data_len);
    out.put_u64(offset);
}

pub fn encode_offset_hole(out: &mut BytesMut, cookie: u64, done: bool, offset: u64, len: u32) {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    encode_chunk_header(out, cookie, flags, REPLY_TYPE_OFFSET_HOLE, 12);
    out.put_u64(offset);
    out.put_u32(len);
}

pub fn encode_none_done(out: &mut BytesMut, cookie: u64) {
    encode_chunk_header(out, cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
}

/// `NBD_REPLY_TYPE_ERROR` with DONE; the message is cut to the protocol's
/// string limit (at a char boundary).
pub fn encode_error_chunk(out: &mut BytesMut, cookie: u64, error: u32, message: &str) {
    let msg = truncate_str(message, MAX_STRING_LEN);
    encode_chunk_header(
        out,
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        6 + msg.len() as u32,
    );
    out.put_u32(error);
    out.put_u16(msg.len() as u16);
    out.put_slice(msg.as_bytes());
}

/// `NBD_REPLY_TYPE_BLOCK_STATUS` with DONE: context id, then (length, flags)
/// descriptors.
pub fn encode_block_status(out: &mut BytesMut, cookie: u64, context: u32, extents: &[(u32, u32)]) {
    let len = 4 + 8 * extents.len() as u32;
    encode_chunk_header(out, cookie, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, len);
    out.put_u32(context);
    for &(l, f) in extents {
        out.put_u32(l);
        out.put_u32(f);
    }
}

pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A decoded reply, used by tests (and any Rust client) to read the server's
/// output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple {
        error: u32,
        cookie: u64,
    },
    Chunk {
        flags: u16,
        typ: u16,
        cookie: u64,
        length: u32,
    },
}

/// Decodes the first reply header in `b` (16 bytes for simple, 20 for a
/// chunk). Returns the header and its size, or `None` if more bytes are
/// needed or the magic is unknown.
pub fn parse_reply_header(b: &[u8]) -> Option<(ReplyHeader, usize)> {
    let mut c = Cursor::new(b);
    match c.u32()? {
        SIMPLE_REPLY_MAGIC => {
            let error = c.u32()?;
            let cookie = c.u64()?;
            Some((ReplyHeader::Simple { error, cookie }, 16))
        }
        STRUCTURED_REPLY_MAGIC => {
            let flags = c.u16()?;
            let typ = c.u16()?;
            let cookie = c.u64()?;
            let length = c.u32()?;
            Some((
                ReplyHeader::Chunk {
                    flags,
                    typ,
                    cookie,
                    length,
                },
                20,
            ))
        }
        _ => None,
    }
}

/// Merges adjacent extents with equal flags, drops zero-length ones, cuts
/// the list so it covers at most `len` bytes, and keeps only the first one
/// if `req_one`. Returns `(length, flags)` descriptors.
pub fn normalize_extents(
    extents: impl IntoIterator<Item = (u32, u32)>,
    len: u32,
    req_one: bool,
    max_descriptors: usize,
) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut covered: u64 = 0;
    for (l, f) in extents {
        if covered >= len as u64 {
            break;
        }
        if l == 0 {
            continue;
        }
        let l = (l as u64).min(len as u64 - covered) as u32;
        covered += l as u64;
        match out.last_mut() {
            // Merging cannot overflow: the sum stays ≤ len.
            Some(last) if last.1 == f => last.0 += l,
            _ => {
                if out.len() == max_descriptors {
                    break;
                }
                out.push((l, f));
            }
        }
    }
    if req_one {
        out.truncate(1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_bytes() {
        let g = encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..18], &[0, 3]);
    }

    #[test]
    fn option_header_round_trip() {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(b"IHAVEOPT");
        b[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        b[12..16].copy_from_slice(&42u32.to_be_bytes());
        assert_eq!(parse_option_header(&b), (IHAVEOPT, OPT_GO, 42));
    }

    #[test]
    fn option_reply_layout() {
        let mut out = BytesMut::new();
        encode_option_reply(&mut out, OPT_LIST, REP_SERVER, &rep_server_payload("rbd/a"));
        assert_eq!(&out[0..8], &OPT_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[8..12], &OPT_LIST.to_be_bytes());
        assert_eq!(&out[12..16], &REP_SERVER.to_be_bytes());
        assert_eq!(&out[16..20], &9u32.to_be_bytes());
        assert_eq!(&out[20..24], &5u32.to_be_bytes());
        assert_eq!(&out[24..], b"rbd/a");
    }

    fn info_payload(name: &str, reqs: &[u16]) -> Vec<u8> {
        let mut v = (name.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            v.extend_from_slice(&r.to_be_bytes());
        }
        v
    }

    #[test]
    fn info_request_parses_and_rejects_bad_lengths() {
        let p = info_payload("rbd/vm1", &[INFO_BLOCK_SIZE, INFO_NAME]);
        assert_eq!(
            parse_info_request(&p),
            Some(InfoRequest {
                name: "rbd/vm1".into(),
                requests: vec![INFO_BLOCK_SIZE, INFO_NAME]
            })
        );
        // Truncated, trailing garbage, name length past the end, bad UTF-8.
        assert_eq!(parse_info_request(&p[..p.len() - 1]), None);
        let mut t = p.clone();
        t.push(0);
        assert_eq!(parse_info_request(&t), None);
        assert_eq!(parse_info_request(&[0, 0, 0, 200, b'a']), None);
        let mut bad = info_payload("ab", &[]);
        bad[4] = 0xff;
        assert_eq!(parse_info_request(&bad), None);
        assert_eq!(parse_info_request(&[]), None);
    }

    #[test]
    fn meta_context_request_parses_and_bounds_counts() {
        let mut p = 3u32.to_be_bytes().to_vec();
        p.extend_from_slice(b"exp");
        p.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:allocation", "x-foo:"] {
            p.extend_from_slice(&(q.len() as u32).to_be_bytes());
            p.extend_from_slice(q.as_bytes());
        }
        let r = parse_meta_context_request(&p).unwrap();
        assert_eq!(r.name, "exp");
        assert_eq!(r.queries, vec!["base:allocation", "x-foo:"]);
        // A huge query count with no data must not allocate or succeed.
        let mut huge = 0u32.to_be_bytes().to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_meta_context_request(&huge), None);
        assert_eq!(parse_meta_context_request(&p[..p.len() - 2]), None);
    }

    #[test]
    fn request_round_trip_and_bad_magic() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            typ: CMD_WRITE,
            cookie: 0xdead_beef_0102_0304,
            offset: 1 << 40,
            length: 4096,
        };
        let mut out = BytesMut::new();
        encode_request(&mut out, &r);
        assert_eq!(out.len(), REQUEST_HEADER_LEN);
        let arr: [u8; REQUEST_HEADER_LEN] = out[..].try_into().unwrap();
        assert_eq!(parse_request(&arr), Ok(r));
        let mut bad = arr;
        bad[0] ^= 1;
        assert!(parse_request(&bad).is_err());
    }

    #[test]
    fn replies_encode_and_parse() {
        let mut out = BytesMut::new();
        encode_simple_reply(&mut out, 7, EINVAL);
        assert_eq!(
            parse_reply_header(&out),
            Some((
                ReplyHeader::Simple {
                    error: EINVAL,
                    cookie: 7
                },
                16
            ))
        );

        let mut out = BytesMut::new();
        encode_offset_data_header(&mut out, 9, true, 4096, 512);
        assert_eq!(
            parse_reply_header(&out),
            Some((
                ReplyHeader::Chunk {
                    flags: REPLY_FLAG_DONE,
                    typ: REPLY_TYPE_OFFSET_DATA,
                    cookie: 9,
                    length: 520
                },
                20
            ))
        );
        assert_eq!(&out[20..28], &4096u64.to_be_bytes());

        let mut out = BytesMut::new();
        encode_error_chunk(&mut out, 3, EIO, "disk on fire");
        assert_eq!(out.len(), 20 + 6 + 12);
        assert_eq!(&out[20..24], &EIO.to_be_bytes());
        assert_eq!(&out[24..26], &12u16.to_be_bytes());

        let mut out = BytesMut::new();
        encode_block_status(&mut out, 4, 1, &[(65536, 0), (4096, 3)]);
        assert_eq!(out.len(), 20 + 4 + 16);
        assert_eq!(&out[16..20], &20u32.to_be_bytes());

        let mut out = BytesMut::new();
        encode_offset_hole(&mut out, 4, true, 8192, 512);
        assert_eq!(out.len(), 32);
        let mut out = BytesMut::new();
        encode_none_done(&mut out, 4);
        assert_eq!(out.len(), 20);
        assert_eq!(
            parse_reply_header(&[1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            None
        );
    }

    #[test]
    fn error_message_is_cut_at_a_char_boundary() {
        let long = "é".repeat(3000); // 6000 bytes
        let mut out = BytesMut::new();
        encode_error_chunk(&mut out, 1, EIO, &long);
        let msg_len = u16::from_be_bytes([out[24], out[25]]) as usize;
        assert!(msg_len <= MAX_STRING_LEN);
        assert!(std::str::from_utf8(&out[26..26 + msg_len]).is_ok());
    }

    #[test]
    fn export_name_reply_zeroes() {
        assert_eq!(encode_export_name_reply(1, 1, true).len(), 10);
        assert_eq!(encode_export_name_reply(1, 1, false).len(), 134);
    }

    #[test]
    fn extents_normalize() {
        // merge equal neighbours, drop empties, clip to len
        let e = normalize_extents(
            [(100, 0), (0, 3), (100, 0), (200, 3), (500, 0)],
            350,
            false,
            16,
        );
        assert_eq!(e, vec![(200, 0), (150, 3)]);
        assert_eq!(
            normalize_extents([(100, 0), (100, 3)], 1000, true, 16),
            vec![(100, 0)]
        );
        assert_eq!(normalize_extents([(5000, 3)], 10, true, 16), vec![(10, 3)]);
        assert_eq!(
            normalize_extents([(1, 0), (1, 1), (1, 0)], 10, false, 2),
            vec![(1, 0), (1, 1)]
        );
        assert!(normalize_extents([], 10, false, 2).is_empty());
    }
}
