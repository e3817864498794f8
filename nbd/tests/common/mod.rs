//! Shared test helpers: a server on 127.0.0.1:0 and a tiny raw NBD client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use basalt_nbd::proto::{self, *};
use basalt_nbd::{ExportRegistry, Limits, NbdServer};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const T: Duration = Duration::from_secs(60);

pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    pub async fn start(registry: Arc<dyn ExportRegistry>) -> Self {
        Self::start_with(registry, Limits::default()).await
    }

    pub async fn start_with(registry: Arc<dyn ExportRegistry>, limits: Limits) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = NbdServer::new(registry, limits);
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .serve(listener, async {
                    let _ = rx.await;
                })
                .await
        });
        TestServer {
            addr,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.addr, export)
    }

    /// Stops the server and waits (bounded) for it to drain.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(T, t)
                .await
                .expect("server stops in time")
                .unwrap()
                .unwrap();
        }
    }
}

/// Runs an external tool with a timeout; a missing tool fails the test ([`require`]).
pub async fn tool(program: &str, args: &[&str]) -> Output {
    tool_env(program, args, &[]).await
}

pub async fn tool_env(program: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    require(program);
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::time::timeout(T, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} timed out"))
        .unwrap_or_else(|e| panic!("{program} failed to start: {e}"))
}

/// The Debian package (installed by scripts/setup.sh) that provides `program`.
fn package_of(program: &str) -> &'static str {
    match program {
        "qemu-img" | "qemu-io" | "qemu-nbd" => "qemu-utils",
        "nbdinfo" | "nbdcopy" | "nbdsh" => "libnbd-bin",
        "fio" => "fio",
        _ => "that provides it",
    }
}

/// Fails the test when `program` is not on PATH, naming the package to install:
/// the suite never passes by skipping (scripts/setup.sh installs every tool).
pub fn require(program: &str) {
    assert!(
        which(program).is_some(),
        "`{program}` is missing: install the Debian package {} (scripts/setup.sh does)",
        package_of(program)
    );
}

pub fn which(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn assert_ok(o: &Output) {
    assert!(o.status.success(), "{}", text(o));
}

// ---- a raw client -------------------------------------------------------

pub struct Raw {
    pub s: TcpStream,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptReply {
    pub option: u32,
    pub typ: u32,
    pub data: Vec<u8>,
}

impl Raw {
    /// Connects and reads the greeting.
    pub async fn connect(addr: SocketAddr) -> Self {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut g = [0u8; 18];
        tokio::time::timeout(T, s.read_exact(&mut g))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);
        Raw { s }
    }

    /// Connects and sends fixed-newstyle + no-zeroes client flags.
    pub async fn negotiating(addr: SocketAddr) -> Self {
        let mut r = Self::connect(addr).await;
        r.s.write_all(&3u32.to_be_bytes()).await.unwrap();
        r
    }

    pub async fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).await.unwrap();
    }

    pub async fn read_opt_reply(&mut self) -> std::io::Result<OptReply> {
        let mut h = [0u8; 20];
        tokio::time::timeout(T, self.s.read_exact(&mut h))
            .await
            .expect("option reply in time")?;
        assert_eq!(&h[..8], &OPT_REPLY_MAGIC.to_be_bytes());
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).await?;
        Ok(OptReply { option, typ, data })
    }

    /// Replies up to and including the first ACK or error.
    pub async fn read_opt_replies(&mut self) -> Vec<OptReply> {
        let mut v = Vec::new();
        loop {
            let r = self.read_opt_reply().await.unwrap();
            let end = r.typ == REP_ACK || r.typ & (1 << 31) != 0;
            v.push(r);
            if end {
                return v;
            }
        }
    }

    /// Like `read_opt_replies`, but `None` if the server closed instead.
    pub async fn read_opt_replies_or_eof(&mut self) -> Option<Vec<OptReply>> {
        let mut v = Vec::new();
        loop {
            let r = self.read_opt_reply().await.ok()?;
            let end = r.typ == REP_ACK || r.typ & (1 << 31) != 0;
            v.push(r);
            if end {
                return Some(v);
            }
        }
    }

    pub async fn structured(&mut self) {
        self.send_option(OPT_STRUCTURED_REPLY, &[]).await;
        let r = self.read_opt_replies().await;
        assert_eq!(r.last().unwrap().typ, REP_ACK);
    }

    pub async fn set_meta(&mut self, export: &str, queries: &[&str]) -> Vec<OptReply> {
        self.send_option(OPT_SET_META_CONTEXT, &meta_payload(export, queries))
            .await;
        self.read_opt_replies().await
    }

    /// NBD_OPT_GO; returns (size, flags) on success or the error reply type.
    pub async fn go(&mut self, export: &str) -> Result<(u64, u16), u32> {
        self.send_option(OPT_GO, &info_payload(export, &[INFO_BLOCK_SIZE]))
            .await;
        let replies = self.read_opt_replies().await;
        let last = replies.last().unwrap();
        if last.typ != REP_ACK {
            return Err(last.typ);
        }
        let info = replies
            .iter()
            .find(|r| r.typ == REP_INFO && r.data[..2] == [0, 0])
            .expect("NBD_INFO_EXPORT sent");
        let size = u64::from_be_bytes(info.data[2..10].try_into().unwrap());
        let flags = u16::from_be_bytes(info.data[10..12].try_into().unwrap());
        Ok((size, flags))
    }

    /// Connects and enters transmission on `export`.
    pub async fn open(addr: SocketAddr, export: &str, structured: bool) -> (Self, u16) {
        let mut r = Self::negotiating(addr).await;
        if structured {
            r.structured().await;
            r.set_meta(export, &["base:allocation"]).await;
        }
        let (_, flags) = r.go(export).await.expect("GO succeeds");
        (r, flags)
    }

    pub async fn request(
        &mut self,
        typ: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let mut b = BytesMut::new();
        proto::encode_request(
            &mut b,
            &Request {
                flags,
                typ,
                cookie,
                offset,
                length,
            },
        );
        b.extend_from_slice(payload);
        self.s.write_all(&b).await.unwrap();
    }

    /// Reads one simple reply; `data_len` bytes follow a successful read.
    pub async fn simple(&mut self, data_len: usize) -> std::io::Result<(u64, u32, Vec<u8>)> {
        let mut h = [0u8; 16];
        tokio::time::timeout(T, self.s.read_exact(&mut h))
            .await
            .expect("reply in time")?;
        let Some((ReplyHeader::Simple { error, cookie }, _)) = parse_reply_header(&h) else {
            panic!("not a simple reply: {h:?}");
        };
        let mut data = vec![0u8; if error == 0 { data_len } else { 0 }];
        self.s.read_exact(&mut data).await?;
        Ok((cookie, error, data))
    }

    /// Reads one reply of any kind: (cookie, error, payload bytes, done).
    /// For structured chunks `payload` is the raw chunk payload.
    pub async fn any_reply(&mut self, simple_data_len: usize) -> std::io::Result<Reply> {
        let mut m = [0u8; 4];
        tokio::time::timeout(T, self.s.read_exact(&mut m))
            .await
            .expect("reply in time")?;
        let magic = u32::from_be_bytes(m);
        if magic == SIMPLE_REPLY_MAGIC {
            let mut h = [0u8; 12];
            self.s.read_exact(&mut h).await?;
            let error = u32::from_be_bytes(h[..4].try_into().unwrap());
            let cookie = u64::from_be_bytes(h[4..].try_into().unwrap());
            let mut data = vec![0u8; if error == 0 { simple_data_len } else { 0 }];
            self.s.read_exact(&mut data).await?;
            return Ok(Reply {
                cookie,
                error,
                typ: None,
                flags: 0,
                payload: data,
            });
        }
        assert_eq!(magic, STRUCTURED_REPLY_MAGIC, "bad reply magic");
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).await?;
        let flags = u16::from_be_bytes(h[..2].try_into().unwrap());
        let typ = u16::from_be_bytes(h[2..4].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut payload = vec![0u8; len as usize];
        self.s.read_exact(&mut payload).await?;
        let error = if typ & 0x8000 != 0 {
            u32::from_be_bytes(payload[..4].try_into().unwrap())
        } else {
            0
        };
        Ok(Reply {
            cookie,
            error,
            typ: Some(typ),
            flags,
            payload,
        })
    }

    /// True if the server closed the connection (EOF or reset) within the timeout.
    pub async fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(10), self.s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => true,
            Ok(Ok(_)) => false,
            Err(_) => false,
        }
    }
}

#[derive(Debug)]
pub struct Reply {
    pub cookie: u64,
    pub error: u32,
    pub typ: Option<u16>,
    pub flags: u16,
    pub payload: Vec<u8>,
}

pub fn info_payload(name: &str, reqs: &[u16]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
    for r in reqs {
        v.extend_from_slice(&r.to_be_bytes());
    }
    v
}

pub fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

/// Whole-test bound, on top of the per-read timeouts.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(180);

/// Declares `#[tokio::test]`s that run `body()` under [`TEST_TIMEOUT`].
#[macro_export]
macro_rules! bounded_tests {
    ($($name:ident => $body:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                tokio::time::timeout($crate::common::TEST_TIMEOUT, $body())
                    .await
                    .expect(concat!(stringify!($name), " timed out"));
            }
        )*
    };
}
