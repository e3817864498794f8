//! Random and malformed input at every stage: the server never panics,
//! never hangs a connection, and keeps serving.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use basalt_nbd::proto::*;
use basalt_nbd::{MemExport, MemRegistry};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

static PANICS: AtomicUsize = AtomicUsize::new(0);

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

const SIZE: u64 = 8 << 20;

/// Reads and discards until EOF; true if EOF came within the timeout.
async fn drain_to_eof(mut r: tokio::net::tcp::OwnedReadHalf) -> bool {
    let mut buf = vec![0u8; 1 << 16];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout_at(deadline, r.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

async fn random_input_never_breaks_the_server_body() {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        hook(info);
    }));

    let reg = Arc::new(MemRegistry::new());
    reg.insert("rbd/f", Arc::new(MemExport::new(SIZE)));
    reg.insert("ro", Arc::new(MemExport::new(SIZE).with_read_only(true)));
    let srv = TestServer::start(reg).await;
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);

    for round in 0..60u64 {
        match round % 3 {
            // Garbage right after the greeting.
            0 => {
                let mut c = Raw::connect(srv.addr).await;
                let n = rng.below(300) as usize;
                let junk = rng.bytes(n);
                let _ = c.s.write_all(&junk).await;
                if n < 4 {
                    continue; // the server still waits for the client flags
                }
                let (r, _w) = c.s.into_split();
                assert!(drain_to_eof(r).await, "round {round}: connection hung");
            }
            // Well-framed options with random ids and payloads.
            1 => {
                let mut c = Raw::negotiating(srv.addr).await;
                for _ in 0..rng.below(8) {
                    let opt = if rng.below(4) == 0 {
                        rng.next() as u32
                    } else {
                        rng.below(13) as u32
                    };
                    let len = rng.below(64) as usize;
                    let mut data = rng.bytes(len);
                    if rng.below(2) == 0 && len >= 4 {
                        // A plausible name length prefix.
                        data[..4].copy_from_slice(&((len as u32 - 4) / 2).to_be_bytes());
                    }
                    if opt == OPT_EXPORT_NAME || opt == OPT_GO {
                        continue; // covered in round 2; keep negotiating here
                    }
                    c.send_option(opt, &data).await;
                    if opt == OPT_ABORT {
                        break;
                    }
                    match c.read_opt_replies_or_eof().await {
                        Some(_) => {}
                        None => break,
                    }
                }
                c.send_option(OPT_ABORT, &[]).await;
                let (r, _w) = c.s.into_split();
                assert!(drain_to_eof(r).await, "round {round}: connection hung");
            }
            // Random requests in transmission, replies drained concurrently.
            _ => {
                let structured = rng.below(2) == 0;
                let name = if rng.below(4) == 0 { "ro" } else { "rbd/f" };
                let (c, _) = Raw::open(srv.addr, name, structured).await;
                let (r, mut w) = c.s.into_split();
                let reader = tokio::spawn(drain_to_eof(r));
                for _ in 0..rng.below(200) {
                    let typ = if rng.below(10) == 0 {
                        rng.next() as u16
                    } else {
                        rng.below(9) as u16
                    };
                    if typ == CMD_DISC {
                        continue;
                    }
                    let flags = if rng.below(3) == 0 {
                        rng.next() as u16
                    } else {
                        rng.below(32) as u16
                    };
                    let offset = match rng.below(4) {
                        0 => rng.below(SIZE),
                        1 => SIZE - rng.below(4096),
                        2 => rng.next(),
                        _ => rng.below(16) * 4096,
                    };
                    let mut length = match rng.below(4) {
                        0 => rng.below(1 << 16) as u32,
                        1 => rng.next() as u32,
                        2 => 0,
                        _ => 4096,
                    };
                    if typ == CMD_WRITE && length > (1 << 20) {
                        length = rng.below(1 << 20) as u32;
                    }
                    let payload = if typ == CMD_WRITE {
                        rng.bytes(length as usize)
                    } else {
                        vec![]
                    };
                    let mut b = bytes::BytesMut::new();
                    encode_request(
                        &mut b,
                        &Request {
                            flags,
                            typ,
                            cookie: rng.next(),
                            offset,
                            length,
                        },
                    );
                    b.extend_from_slice(&payload);
                    if w.write_all(&b).await.is_err() {
                        break;
                    }
                }
                // End with DISC, or with a bad magic.
                let end: &[u8] = if rng.below(2) == 0 { &[0u8; 28] } else { &[] };
                let _ = w.write_all(end).await;
                let mut b = bytes::BytesMut::new();
                encode_request(
                    &mut b,
                    &Request {
                        flags: 0,
                        typ: CMD_DISC,
                        cookie: 0,
                        offset: 0,
                        length: 0,
                    },
                );
                let _ = w.write_all(&b).await;
                assert!(
                    reader.await.unwrap(),
                    "round {round}: connection did not close"
                );
            }
        }
    }

    // Still serving, and nothing panicked anywhere.
    let (mut c, _) = Raw::open(srv.addr, "rbd/f", false).await;
    c.request(CMD_READ, 0, 1, 0, 512, &[]).await;
    assert_eq!(c.simple(512).await.unwrap().1, 0);
    srv.stop().await;
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "the server panicked");
}

bounded_tests! {
    random_input_never_breaks_the_server => random_input_never_breaks_the_server_body,
}
