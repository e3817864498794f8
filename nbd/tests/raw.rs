//! Raw-TCP protocol tests: what real clients rarely send, and what proves
//! pipelining.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use basalt_nbd::proto::*;
use basalt_nbd::{Export, Extent, Limits, MemExport, MemRegistry, NbdError};
use bytes::Bytes;
use common::*;
use tokio::io::AsyncWriteExt;

const SIZE: u64 = 64 << 20;

/// Wraps a MemExport; requests whose offset is below `slow_below` take
/// `delay` first.
struct SlowExport {
    inner: MemExport,
    slow_below: u64,
    delay: Duration,
}

#[async_trait]
impl Export for SlowExport {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn can_multi_conn(&self) -> bool {
        true
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, NbdError> {
        if offset < self.slow_below {
            tokio::time::sleep(self.delay).await;
        }
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), NbdError> {
        if offset < self.slow_below {
            tokio::time::sleep(self.delay).await;
        }
        self.inner.write(offset, data, fua).await
    }
    async fn flush(&self) -> Result<(), NbdError> {
        self.inner.flush().await
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), NbdError> {
        self.inner.trim(offset, len, fua).await
    }
    async fn write_zeroes(
        &self,
        o: u64,
        l: u32,
        fua: bool,
        t: bool,
        f: bool,
    ) -> Result<(), NbdError> {
        self.inner.write_zeroes(o, l, fua, t, f).await
    }
    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, NbdError> {
        self.inner.block_status(offset, len).await
    }
}

/// Reads at offset 0 panic, at 4096 fail with EIO, at 8192 never finish.
struct FaultyExport(MemExport);

#[async_trait]
impl Export for FaultyExport {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn can_multi_conn(&self) -> bool {
        false
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, NbdError> {
        match offset {
            0 => panic!("boom at offset 0"),
            4096 => Err(NbdError::Io("osd.3 timed out".into())),
            8192 => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                unreachable!()
            }
            _ => self.0.read(offset, len).await,
        }
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), NbdError> {
        self.0.write(offset, data, fua).await
    }
    async fn flush(&self) -> Result<(), NbdError> {
        Err(NbdError::Io("journal full".into()))
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), NbdError> {
        self.0.trim(offset, len, fua).await
    }
    async fn write_zeroes(
        &self,
        o: u64,
        l: u32,
        fua: bool,
        _t: bool,
        fast: bool,
    ) -> Result<(), NbdError> {
        if fast {
            return Err(NbdError::NotSupported(
                "zeroing is not faster than writing".into(),
            ));
        }
        self.0.write_zeroes(o, l, fua, false, false).await
    }
    async fn block_status(&self, _offset: u64, _len: u32) -> Result<Vec<Extent>, NbdError> {
        Ok(vec![])
    }
}

fn registry() -> (Arc<MemRegistry>, Arc<MemExport>) {
    let reg = Arc::new(MemRegistry::new());
    let mem = Arc::new(MemExport::new(SIZE));
    reg.insert("rbd/vm1", mem.clone());
    reg.insert("ro", Arc::new(MemExport::new(SIZE).with_read_only(true)));
    reg.insert("faulty", Arc::new(FaultyExport(MemExport::new(SIZE))));
    reg.insert(
        "slow",
        Arc::new(SlowExport {
            inner: MemExport::new(SIZE),
            slow_below: 1 << 20,
            delay: Duration::from_millis(300),
        }),
    );
    (reg, mem)
}

async fn server() -> (TestServer, Arc<MemExport>) {
    let (reg, mem) = registry();
    (TestServer::start(reg).await, mem)
}

/// After a broken client, a new one is served normally.
async fn still_serves(srv: &TestServer) {
    let (mut c, _) = Raw::open(srv.addr, "rbd/vm1", false).await;
    c.request(CMD_READ, 0, 99, 0, 512, &[]).await;
    let (cookie, err, data) = c.simple(512).await.unwrap();
    assert_eq!((cookie, err, data.len()), (99, 0, 512));
    c.request(CMD_DISC, 0, 100, 0, 0, &[]).await;
    assert!(c.closed().await);
}

async fn garbage_instead_of_client_flags_closes_and_server_serves_on_body() {
    let (srv, _) = server().await;
    let mut c = Raw::connect(srv.addr).await;
    c.s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(c.closed().await);
    still_serves(&srv).await;
    srv.stop().await;
}

async fn bad_option_magic_closes_body() {
    let (srv, _) = server().await;
    let mut c = Raw::negotiating(srv.addr).await;
    c.s.write_all(&[0xAAu8; 16]).await.unwrap();
    assert!(c.closed().await);
    still_serves(&srv).await;
    srv.stop().await;
}

async fn oversized_option_closes_body() {
    let (srv, _) = server().await;
    let mut c = Raw::negotiating(srv.addr).await;
    let mut h = IHAVEOPT.to_be_bytes().to_vec();
    h.extend_from_slice(&OPT_GO.to_be_bytes());
    h.extend_from_slice(&(1u32 << 30).to_be_bytes());
    c.s.write_all(&h).await.unwrap();
    assert!(c.closed().await);
    still_serves(&srv).await;
    srv.stop().await;
}

async fn bad_request_magic_closes_and_server_serves_on_body() {
    let (srv, _) = server().await;
    let (mut c, _) = Raw::open(srv.addr, "rbd/vm1", false).await;
    c.s.write_all(&[0x55u8; 28]).await.unwrap();
    assert!(c.closed().await);
    still_serves(&srv).await;
    srv.stop().await;
}

async fn negotiation_options_body() {
    let (srv, _) = server().await;
    let mut c = Raw::negotiating(srv.addr).await;

    // LIST: one SERVER reply per export, then ACK.
    c.send_option(OPT_LIST, &[]).await;
    let r = c.read_opt_replies().await;
    let names: Vec<String> = r
        .iter()
        .filter(|r| r.typ == REP_SERVER)
        .map(|r| String::from_utf8(r.data[4..].to_vec()).unwrap())
        .collect();
    assert_eq!(names, vec!["faulty", "rbd/vm1", "ro", "slow"]);
    assert_eq!(r.last().unwrap().typ, REP_ACK);

    // LIST with data is invalid; the session goes on.
    c.send_option(OPT_LIST, b"x").await;
    assert_eq!(c.read_opt_replies().await[0].typ, REP_ERR_INVALID);

    // Unknown, STARTTLS and EXTENDED_HEADERS: UNSUP.
    for opt in [OPT_STARTTLS, OPT_EXTENDED_HEADERS, 4242] {
        c.send_option(opt, &[]).await;
        let r = c.read_opt_replies().await;
        assert_eq!((r[0].option, r[0].typ), (opt, REP_ERR_UNSUP));
    }

    // Meta contexts need structured replies first.
    let r = c.set_meta("rbd/vm1", &["base:allocation"]).await;
    assert_eq!(r[0].typ, REP_ERR_INVALID);
    c.structured().await;
    c.send_option(OPT_LIST_META_CONTEXT, &meta_payload("rbd/vm1", &[]))
        .await;
    let r = c.read_opt_replies().await;
    assert_eq!(r[0].typ, REP_META_CONTEXT);
    assert_eq!(&r[0].data[4..], b"base:allocation");
    assert_eq!(r[1].typ, REP_ACK);
    // "base:" lists every base context.
    c.send_option(OPT_LIST_META_CONTEXT, &meta_payload("rbd/vm1", &["base:"]))
        .await;
    let r = c.read_opt_replies().await;
    assert_eq!(
        (r[0].typ, &r[0].data[4..]),
        (REP_META_CONTEXT, &b"base:allocation"[..])
    );
    // A query without a namespace is invalid.
    c.send_option(
        OPT_LIST_META_CONTEXT,
        &meta_payload("rbd/vm1", &["allocation"]),
    )
    .await;
    assert_eq!(c.read_opt_replies().await[0].typ, REP_ERR_INVALID);
    // Unknown namespaces are ignored.
    let r = c.set_meta("rbd/vm1", &["qemu:dirty-bitmap:x"]).await;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].typ, REP_ACK);
    let r = c.set_meta("nope", &["base:allocation"]).await;
    assert_eq!(r[0].typ, REP_ERR_UNKNOWN);

    // INFO on an unknown export: ERR_UNKNOWN with a message; malformed: INVALID.
    c.send_option(OPT_INFO, &info_payload("rbd/none", &[]))
        .await;
    let r = c.read_opt_replies().await;
    assert_eq!(r[0].typ, REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&r[0].data).contains("rbd/none"));
    c.send_option(OPT_INFO, &[0, 0, 0, 9, b'a']).await;
    assert_eq!(c.read_opt_replies().await[0].typ, REP_ERR_INVALID);

    // INFO with NAME, DESCRIPTION, BLOCK_SIZE.
    c.send_option(
        OPT_INFO,
        &info_payload("rbd/vm1", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]),
    )
    .await;
    let r = c.read_opt_replies().await;
    let info = |t: u16| {
        r.iter()
            .find(|x| x.typ == REP_INFO && x.data[..2] == t.to_be_bytes())
    };
    let export = info(INFO_EXPORT).unwrap();
    assert_eq!(&export.data[2..10], &SIZE.to_be_bytes());
    assert_eq!(&info(INFO_NAME).unwrap().data[2..], b"rbd/vm1");
    assert!(info(INFO_DESCRIPTION).is_some());
    let bs = &info(INFO_BLOCK_SIZE).unwrap().data;
    assert_eq!(&bs[2..6], &512u32.to_be_bytes());
    assert_eq!(&bs[6..10], &4096u32.to_be_bytes());
    assert_eq!(&bs[10..14], &(32u32 << 20).to_be_bytes());
    assert_eq!(r.last().unwrap().typ, REP_ACK);

    // GO to an unknown export: error, still negotiating; then a good GO.
    assert_eq!(c.go("rbd/missing").await, Err(REP_ERR_UNKNOWN));
    let (size, flags) = c.go("rbd/vm1").await.unwrap();
    assert_eq!(size, SIZE);
    for f in [
        TFLAG_HAS_FLAGS,
        TFLAG_SEND_FLUSH,
        TFLAG_SEND_FUA,
        TFLAG_SEND_TRIM,
        TFLAG_SEND_WRITE_ZEROES,
        TFLAG_SEND_DF,
        TFLAG_SEND_FAST_ZERO,
        TFLAG_CAN_MULTI_CONN,
    ] {
        assert_ne!(flags & f, 0, "flag {f:#x} missing from {flags:#x}");
    }
    assert_eq!(flags & TFLAG_READ_ONLY, 0);
    c.request(CMD_DISC, 0, 1, 0, 0, &[]).await;
    assert!(c.closed().await);
    srv.stop().await;
}

async fn abort_and_legacy_export_name_body() {
    let (srv, _) = server().await;
    let mut c = Raw::negotiating(srv.addr).await;
    c.send_option(OPT_ABORT, &[]).await;
    assert_eq!(c.read_opt_reply().await.unwrap().typ, REP_ACK);
    assert!(c.closed().await);

    // EXPORT_NAME to an unknown export: no error path, the server closes.
    let mut c = Raw::negotiating(srv.addr).await;
    c.send_option(OPT_EXPORT_NAME, b"nope").await;
    assert!(c.closed().await);

    // EXPORT_NAME to a known one: size + flags, no zeroes (negotiated).
    let mut c = Raw::negotiating(srv.addr).await;
    c.send_option(OPT_EXPORT_NAME, b"ro").await;
    let mut b = [0u8; 10];
    tokio::io::AsyncReadExt::read_exact(&mut c.s, &mut b)
        .await
        .unwrap();
    assert_eq!(&b[..8], &SIZE.to_be_bytes());
    let flags = u16::from_be_bytes([b[8], b[9]]);
    assert_ne!(flags & TFLAG_READ_ONLY, 0);
    c.request(CMD_WRITE, 0, 5, 0, 4, b"abcd").await;
    assert_eq!(c.simple(0).await.unwrap().1, EPERM);
    srv.stop().await;
}

async fn error_replies_simple_body() {
    let (srv, mem) = server().await;
    let (mut c, _) = Raw::open(srv.addr, "rbd/vm1", false).await;
    // Read past the end: EINVAL. Write past the end: ENOSPC.
    c.request(CMD_READ, 0, 1, SIZE - 512, 1024, &[]).await;
    assert_eq!(c.simple(1024).await.unwrap().1, EINVAL);
    c.request(CMD_WRITE, 0, 2, SIZE - 2, 4, b"abcd").await;
    assert_eq!(c.simple(0).await.unwrap().1, ENOSPC);
    c.request(CMD_WRITE_ZEROES, 0, 3, u64::MAX - 1, 4, &[])
        .await;
    assert_eq!(c.simple(0).await.unwrap().1, ENOSPC);
    c.request(CMD_TRIM, 0, 4, SIZE, 1, &[]).await;
    assert_eq!(c.simple(0).await.unwrap().1, EINVAL);
    // Unknown command, bad flags, DF without structured replies.
    c.request(42, 0, 5, 0, 0, &[]).await;
    assert_eq!(c.simple(0).await.unwrap().1, EINVAL);
    c.request(CMD_READ, CMD_FLAG_REQ_ONE, 6, 0, 512, &[]).await;
    assert_eq!(c.simple(512).await.unwrap().1, EINVAL);
    c.request(CMD_READ, CMD_FLAG_DF, 7, 0, 512, &[]).await;
    assert_eq!(c.simple(512).await.unwrap().1, EINVAL);
    // BLOCK_STATUS without a meta context.
    c.request(CMD_BLOCK_STATUS, 0, 8, 0, 512, &[]).await;
    assert_eq!(c.simple(0).await.unwrap().1, EINVAL);
    // Oversized READ: EINVAL.
    c.request(CMD_READ, 0, 9, 0, (32 << 20) + 1, &[]).await;
    assert_eq!(c.simple(0).await.unwrap().1, EINVAL);
    // Oversized WRITE: the payload is read and discarded, EINVAL, and the
    // connection stays in sync.
    let big = vec![0x11u8; (32 << 20) + 4096];
    c.request(CMD_WRITE, 0, 10, 0, big.len() as u32, &big).await;
    assert_eq!(c.simple(0).await.unwrap(), (10, EINVAL, vec![]));
    assert_eq!(
        mem.allocated_blocks(),
        0,
        "nothing of the oversized write applied"
    );
    c.request(CMD_WRITE, CMD_FLAG_FUA, 11, 4096, 4, b"abcd")
        .await;
    assert_eq!(c.simple(0).await.unwrap(), (11, 0, vec![]));
    c.request(CMD_READ, 0, 12, 4096, 4, &[]).await;
    assert_eq!(c.simple(4).await.unwrap(), (12, 0, b"abcd".to_vec()));
    // TRIM and WRITE_ZEROES carry no payload: larger than 32 MiB is fine.
    c.request(CMD_WRITE_ZEROES, 0, 20, 0, 48 << 20, &[]).await;
    assert_eq!(c.simple(0).await.unwrap(), (20, 0, vec![]));
    c.request(CMD_TRIM, 0, 21, 0, 48 << 20, &[]).await;
    assert_eq!(c.simple(0).await.unwrap(), (21, 0, vec![]));
    c.request(CMD_READ, 0, 22, 4096, 4, &[]).await;
    assert_eq!(c.simple(4).await.unwrap(), (22, 0, vec![0; 4]));
    // Zero-length requests succeed without touching the export.
    c.request(CMD_READ, 0, 13, 0, 0, &[]).await;
    assert_eq!(c.simple(0).await.unwrap(), (13, 0, vec![]));
    c.request(CMD_CACHE, 0, 14, 0, 4096, &[]).await;
    assert_eq!(c.simple(0).await.unwrap(), (14, 0, vec![]));
    // A WRITE whose claimed size is beyond what we drain: closed.
    c.request(CMD_WRITE, 0, 15, 0, 1 << 30, &[]).await;
    assert!(c.closed().await);
    still_serves(&srv).await;

    // Writes to a read-only export: EPERM; reads work.
    let (mut c, _) = Raw::open(srv.addr, "ro", false).await;
    c.request(CMD_WRITE, 0, 1, 0, 4, b"abcd").await;
    assert_eq!(c.simple(0).await.unwrap().1, EPERM);
    c.request(CMD_TRIM, 0, 2, 0, 4096, &[]).await;
    assert_eq!(c.simple(0).await.unwrap().1, EPERM);
    c.request(CMD_WRITE_ZEROES, 0, 3, 0, 4096, &[]).await;
    assert_eq!(c.simple(0).await.unwrap().1, EPERM);
    c.request(CMD_READ, 0, 4, 0, 4096, &[]).await;
    assert_eq!(c.simple(4096).await.unwrap().1, 0);
    srv.stop().await;
}

async fn structured_replies_and_block_status_body() {
    let (srv, _) = server().await;
    let (mut c, _) = Raw::open(srv.addr, "rbd/vm1", true).await;
    c.request(CMD_WRITE, 0, 1, 65536, 8, b"abcdefgh").await;
    assert_eq!(c.any_reply(0).await.unwrap().error, 0);

    // A read of data: one OFFSET_DATA chunk with DONE.
    c.request(CMD_READ, CMD_FLAG_DF, 2, 65536, 8, &[]).await;
    let r = c.any_reply(0).await.unwrap();
    assert_eq!(
        (r.cookie, r.typ, r.flags),
        (2, Some(REPLY_TYPE_OFFSET_DATA), REPLY_FLAG_DONE)
    );
    assert_eq!(&r.payload[..8], &65536u64.to_be_bytes());
    assert_eq!(&r.payload[8..], b"abcdefgh");
    // A read of a hole: one OFFSET_HOLE chunk.
    c.request(CMD_READ, 0, 3, 0, 4096, &[]).await;
    let r = c.any_reply(0).await.unwrap();
    assert_eq!(
        (r.typ, r.flags),
        (Some(REPLY_TYPE_OFFSET_HOLE), REPLY_FLAG_DONE)
    );
    assert_eq!(&r.payload[8..], &4096u32.to_be_bytes());
    // Errors are ERROR chunks with a message.
    c.request(CMD_READ, 0, 4, SIZE, 512, &[]).await;
    let r = c.any_reply(0).await.unwrap();
    assert_eq!(
        (r.typ, r.error, r.flags),
        (Some(REPLY_TYPE_ERROR), EINVAL, REPLY_FLAG_DONE)
    );
    let msg_len = u16::from_be_bytes([r.payload[4], r.payload[5]]) as usize;
    let msg = String::from_utf8(r.payload[6..6 + msg_len].to_vec()).unwrap();
    assert!(msg.contains("past the end"), "{msg}");

    // BLOCK_STATUS: hole, data, hole.
    c.request(CMD_BLOCK_STATUS, 0, 5, 0, 4 << 20, &[]).await;
    let r = c.any_reply(0).await.unwrap();
    assert_eq!(
        (r.typ, r.flags),
        (Some(REPLY_TYPE_BLOCK_STATUS), REPLY_FLAG_DONE)
    );
    assert_eq!(&r.payload[..4], &META_BASE_ALLOCATION_ID.to_be_bytes());
    let ext: Vec<(u32, u32)> = r.payload[4..]
        .chunks(8)
        .map(|c| {
            (
                u32::from_be_bytes(c[..4].try_into().unwrap()),
                u32::from_be_bytes(c[4..].try_into().unwrap()),
            )
        })
        .collect();
    assert_eq!(ext, vec![(65536, 3), (65536, 0), ((4 << 20) - 131072, 3)]);
    // REQ_ONE: one descriptor.
    c.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 6, 0, 4 << 20, &[])
        .await;
    let r = c.any_reply(0).await.unwrap();
    assert_eq!(r.payload.len(), 4 + 8);
    assert_eq!(&r.payload[4..8], &65536u32.to_be_bytes());
    // Past the end: EINVAL.
    c.request(CMD_BLOCK_STATUS, 0, 7, SIZE - 512, 1024, &[])
        .await;
    assert_eq!(c.any_reply(0).await.unwrap().error, EINVAL);
    srv.stop().await;
}

async fn pipelined_requests_complete_out_of_order_body() {
    let (srv, _) = server().await;
    let (mut c, _) = Raw::open(srv.addr, "slow", false).await;
    // Cookie 1 is slow (offset < 1 MiB), cookie 2 fast: 2 must come first.
    c.request(CMD_READ, 0, 1, 0, 4096, &[]).await;
    c.request(CMD_READ, 0, 2, 2 << 20, 4096, &[]).await;
    let first = c.simple(4096).await.unwrap();
    let second = c.simple(4096).await.unwrap();
    assert_eq!((first.0, second.0), (2, 1));

    // 32 slow reads at once finish in about one delay, not 32.
    let t0 = Instant::now();
    for i in 0..32u64 {
        c.request(CMD_READ, 0, 100 + i, i * 4096, 4096, &[]).await;
    }
    let mut cookies = Vec::new();
    for _ in 0..32 {
        let (cookie, err, _) = c.simple(4096).await.unwrap();
        assert_eq!(err, 0);
        cookies.push(cookie);
    }
    cookies.sort();
    assert_eq!(cookies, (100..132).collect::<Vec<_>>());
    let took = t0.elapsed();
    assert!(
        took < Duration::from_millis(300 * 8),
        "32 slow reads took {took:?}: not concurrent"
    );
    srv.stop().await;
}

async fn flush_waits_for_writes_received_before_it_body() {
    let (srv, _) = server().await;
    let (mut c, _) = Raw::open(srv.addr, "slow", false).await;
    // A slow write, then a flush without waiting: the flush reply must come
    // after the write's. A fast read after them overtakes both.
    c.request(CMD_WRITE, 0, 1, 0, 4, b"abcd").await;
    c.request(CMD_FLUSH, 0, 2, 0, 0, &[]).await;
    c.request(CMD_READ, 0, 3, 2 << 20, 512, &[]).await;
    let mut order = Vec::new();
    for _ in 0..3 {
        // Simple replies do not say whether data follows: only the read's does.
        let (cookie, err, _) = c.simple(0).await.unwrap();
        assert_eq!(err, 0);
        if cookie == 3 {
            let mut d = [0u8; 512];
            tokio::io::AsyncReadExt::read_exact(&mut c.s, &mut d)
                .await
                .unwrap();
        }
        order.push(cookie);
    }
    assert_eq!(order, vec![3, 1, 2]);
    srv.stop().await;
}

async fn disc_and_shutdown_finish_in_flight_requests_body() {
    let (srv, _) = server().await;
    // DISC after a slow read: the read is still answered, then EOF.
    let (mut c, _) = Raw::open(srv.addr, "slow", false).await;
    c.request(CMD_READ, 0, 1, 0, 512, &[]).await;
    c.request(CMD_DISC, 0, 2, 0, 0, &[]).await;
    assert_eq!(c.simple(512).await.unwrap().0, 1);
    assert!(c.closed().await);

    // Server shutdown with a slow request in flight: answered, then closed.
    let (mut c, _) = Raw::open(srv.addr, "slow", false).await;
    c.request(CMD_WRITE, 0, 7, 0, 4, b"wxyz").await;
    // The fast read's reply proves the server has read the slow write too.
    c.request(CMD_READ, 0, 8, 2 << 20, 512, &[]).await;
    assert_eq!(c.simple(512).await.unwrap().0, 8);
    let stop = tokio::spawn(srv.stop());
    assert_eq!(c.simple(0).await.unwrap(), (7, 0, vec![]));
    assert!(c.closed().await);
    tokio::time::timeout(T, stop).await.unwrap().unwrap();
}

async fn memory_is_bounded_by_limits_body() {
    // A tiny byte budget still lets every request through, one at a time.
    let (reg, _) = registry();
    let limits = Limits {
        max_in_flight: 2,
        max_buffered_bytes: 1 << 20,
        ..Limits::default()
    };
    let srv = TestServer::start_with(reg, limits).await;
    let (mut c, _) = Raw::open(srv.addr, "rbd/vm1", false).await;
    let data = vec![7u8; 4 << 20];
    for i in 0..8u64 {
        c.request(CMD_WRITE, 0, i, i * (4 << 20), 4 << 20, &data)
            .await;
    }
    for _ in 0..8 {
        assert_eq!(c.simple(0).await.unwrap().1, 0);
    }
    srv.stop().await;
}

async fn handshake_timeout_and_old_clients_body() {
    let (reg, _) = registry();
    let limits = Limits {
        handshake_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let srv = TestServer::start_with(reg, limits).await;
    // A client that never finishes negotiating is dropped.
    let mut idle = Raw::negotiating(srv.addr).await;
    assert!(idle.closed().await);

    // A client without fixed newstyle or NO_ZEROES: EXPORT_NAME works and
    // the 124 zero bytes follow.
    let mut c = Raw::connect(srv.addr).await;
    c.s.write_all(&0u32.to_be_bytes()).await.unwrap();
    c.send_option(OPT_EXPORT_NAME, b"rbd/vm1").await;
    let mut b = [0u8; 134];
    tokio::io::AsyncReadExt::read_exact(&mut c.s, &mut b)
        .await
        .unwrap();
    assert_eq!(&b[..8], &SIZE.to_be_bytes());
    assert!(b[10..].iter().all(|&x| x == 0));
    c.request(CMD_READ, 0, 1, 0, 512, &[]).await;
    assert_eq!(c.simple(512).await.unwrap().1, 0);
    // ...but any other option from it closes (no way to send an error).
    let mut c = Raw::connect(srv.addr).await;
    c.s.write_all(&0u32.to_be_bytes()).await.unwrap();
    c.send_option(OPT_LIST, &[]).await;
    assert!(c.closed().await);
    // Unknown client flags close too.
    let mut c = Raw::connect(srv.addr).await;
    c.s.write_all(&0x10u32.to_be_bytes()).await.unwrap();
    assert!(c.closed().await);
    srv.stop().await;
}

async fn connection_limit_body() {
    let (reg, _) = registry();
    let limits = Limits {
        max_connections: 1,
        ..Limits::default()
    };
    let srv = TestServer::start_with(reg, limits).await;
    let (mut first, _) = Raw::open(srv.addr, "rbd/vm1", false).await;
    // The second is closed right after accept (before any greeting).
    let mut second = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(T, tokio::io::AsyncReadExt::read(&mut second, &mut b))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    first.request(CMD_DISC, 0, 1, 0, 0, &[]).await;
    assert!(first.closed().await);
    // Once the server has released the first one's slot a new one is served: connect until
    // a greeting arrives (a connection closed unanswered means the slot is not free yet),
    // then use that connection (another would need the slot again).
    let deadline = tokio::time::Instant::now() + T;
    let mut c = loop {
        let mut s = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
        let mut g = [0u8; 18];
        match tokio::time::timeout(T, tokio::io::AsyncReadExt::read_exact(&mut s, &mut g)).await {
            Ok(Ok(_)) => {
                assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
                break Raw { s };
            }
            Ok(Err(_)) => {}
            Err(_) => panic!("no greeting and no close within {T:?}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first connection's slot was never released"
        );
        // Poll interval, not a guess at how long the release takes.
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    c.s.write_all(&3u32.to_be_bytes()).await.unwrap();
    c.go("rbd/vm1").await.expect("GO succeeds");
    c.request(CMD_READ, 0, 99, 0, 512, &[]).await;
    let (cookie, err, data) = c.simple(512).await.unwrap();
    assert_eq!((cookie, err, data.len()), (99, 0, 512));
    c.request(CMD_DISC, 0, 100, 0, 0, &[]).await;
    assert!(c.closed().await);
    srv.stop().await;
}

/// Many mixed-size requests in flight on several connections at once:
/// every reply arrives whole, once, with the right data for its cookie.
async fn replies_never_interleave_under_load_body() {
    let (srv, mem) = server().await;
    // Each 64 KiB block holds its own index.
    for blk in 0..256u64 {
        mem.write_sync(blk * 65536, &vec![blk as u8; 65536]);
    }
    let mut clients = Vec::new();
    for conn in 0..4u64 {
        let addr = srv.addr;
        clients.push(tokio::spawn(async move {
            let structured = conn % 2 == 0;
            let (c, _) = Raw::open(addr, "rbd/vm1", structured).await;
            let (mut rd, mut wr) = c.s.into_split();
            let n = 400u64;
            let sender = tokio::spawn(async move {
                for i in 0..n {
                    let blk = (i * 7 + conn) % 256;
                    let len = [512u32, 4096, 65536, 1 << 20][(i % 4) as usize];
                    let len = len.min(((256 - blk) * 65536) as u32);
                    let mut b = bytes::BytesMut::new();
                    encode_request(
                        &mut b,
                        &Request {
                            flags: 0,
                            typ: CMD_READ,
                            cookie: i,
                            offset: blk * 65536,
                            length: len,
                        },
                    );
                    wr.write_all(&b).await.unwrap();
                }
                wr
            });
            let mut seen = vec![false; n as usize];
            for _ in 0..n {
                use tokio::io::AsyncReadExt;
                let (cookie, data) = if structured {
                    let mut h = [0u8; 20];
                    rd.read_exact(&mut h).await.unwrap();
                    let Some((
                        ReplyHeader::Chunk {
                            typ,
                            cookie,
                            length,
                            flags,
                        },
                        _,
                    )) = parse_reply_header(&h)
                    else {
                        panic!("bad chunk header {h:?}");
                    };
                    assert_eq!(flags, REPLY_FLAG_DONE);
                    let mut p = vec![0u8; length as usize];
                    rd.read_exact(&mut p).await.unwrap();
                    match typ {
                        REPLY_TYPE_OFFSET_DATA => (cookie, p[8..].to_vec()),
                        // Block 0 holds zeroes: it comes back as a hole.
                        REPLY_TYPE_OFFSET_HOLE => (
                            cookie,
                            vec![0u8; u32::from_be_bytes(p[8..12].try_into().unwrap()) as usize],
                        ),
                        other => panic!("unexpected chunk type {other}"),
                    }
                } else {
                    let mut h = [0u8; 16];
                    rd.read_exact(&mut h).await.unwrap();
                    let Some((ReplyHeader::Simple { error: 0, cookie }, _)) =
                        parse_reply_header(&h)
                    else {
                        panic!("bad simple header {h:?}");
                    };
                    let blk = (cookie * 7 + conn) % 256;
                    let len = [512u32, 4096, 65536, 1 << 20][(cookie % 4) as usize];
                    let len = len.min(((256 - blk) * 65536) as u32);
                    let mut d = vec![0u8; len as usize];
                    rd.read_exact(&mut d).await.unwrap();
                    (cookie, d)
                };
                assert!(!seen[cookie as usize], "cookie {cookie} answered twice");
                seen[cookie as usize] = true;
                let blk = (cookie * 7 + conn) % 256;
                for (k, chunk) in data.chunks(65536).enumerate() {
                    assert!(
                        chunk.iter().all(|&x| x == (blk + k as u64) as u8),
                        "wrong data for cookie {cookie}"
                    );
                }
            }
            let _wr = sender.await.unwrap();
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    srv.stop().await;
}

async fn export_errors_and_panics_fail_only_their_request_body() {
    let (reg, _) = registry();
    let limits = Limits {
        shutdown_grace: Duration::from_millis(300),
        ..Limits::default()
    };
    let srv = TestServer::start_with(reg, limits).await;
    let (mut c, flags) = Raw::open(srv.addr, "faulty", false).await;
    assert_eq!(flags & TFLAG_CAN_MULTI_CONN, 0);
    c.request(CMD_READ, 0, 1, 0, 512, &[]).await;
    assert_eq!(c.simple(512).await.unwrap(), (1, EIO, vec![]));
    c.request(CMD_READ, 0, 2, 4096, 512, &[]).await;
    assert_eq!(c.simple(512).await.unwrap(), (2, EIO, vec![]));
    c.request(CMD_FLUSH, 0, 3, 0, 0, &[]).await;
    assert_eq!(c.simple(0).await.unwrap(), (3, EIO, vec![]));
    c.request(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 4, 0, 4096, &[])
        .await;
    assert_eq!(c.simple(0).await.unwrap(), (4, ENOTSUP, vec![]));
    c.request(CMD_WRITE_ZEROES, 0, 5, 0, 4096, &[]).await;
    assert_eq!(c.simple(0).await.unwrap(), (5, 0, vec![]));
    c.request(CMD_READ, 0, 6, 16384, 512, &[]).await;
    assert_eq!(c.simple(512).await.unwrap().1, 0);

    // With structured replies the export's message reaches the client.
    let (mut c, _) = Raw::open(srv.addr, "faulty", true).await;
    c.request(CMD_READ, 0, 7, 4096, 512, &[]).await;
    let r = c.any_reply(0).await.unwrap();
    assert_eq!((r.cookie, r.error), (7, EIO));
    assert!(String::from_utf8_lossy(&r.payload).contains("osd.3 timed out"));
    c.request(CMD_READ, 0, 8, 0, 512, &[]).await;
    let r = c.any_reply(0).await.unwrap();
    assert!(String::from_utf8_lossy(&r.payload).contains("panicked"));
    // An export answering no extents is an I/O error, not a bad reply.
    c.request(CMD_BLOCK_STATUS, 0, 9, 0, 4096, &[]).await;
    assert_eq!(c.any_reply(0).await.unwrap().error, EIO);

    // A request that never finishes does not hold shutdown forever.
    c.request(CMD_READ, 0, 10, 8192, 512, &[]).await;
    c.request(CMD_READ, 0, 11, 16384, 512, &[]).await;
    assert_eq!(c.any_reply(0).await.unwrap().cookie, 11);
    let t0 = Instant::now();
    srv.stop().await;
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(c.closed().await);
}

bounded_tests! {
    export_errors_and_panics_fail_only_their_request => export_errors_and_panics_fail_only_their_request_body,
    replies_never_interleave_under_load => replies_never_interleave_under_load_body,
    handshake_timeout_and_old_clients => handshake_timeout_and_old_clients_body,
    connection_limit => connection_limit_body,
    garbage_instead_of_client_flags_closes_and_server_serves_on => garbage_instead_of_client_flags_closes_and_server_serves_on_body,
    bad_option_magic_closes => bad_option_magic_closes_body,
    oversized_option_closes => oversized_option_closes_body,
    bad_request_magic_closes_and_server_serves_on => bad_request_magic_closes_and_server_serves_on_body,
    negotiation_options => negotiation_options_body,
    abort_and_legacy_export_name => abort_and_legacy_export_name_body,
    error_replies_simple => error_replies_simple_body,
    structured_replies_and_block_status => structured_replies_and_block_status_body,
    pipelined_requests_complete_out_of_order => pipelined_requests_complete_out_of_order_body,
    flush_waits_for_writes_received_before_it => flush_waits_for_writes_received_before_it_body,
    disc_and_shutdown_finish_in_flight_requests => disc_and_shutdown_finish_in_flight_requests_body,
    memory_is_bounded_by_limits => memory_is_bounded_by_limits_body,
}
