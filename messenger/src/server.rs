//! The serving side: answer each request of a connection with its handler's reply, and share
//! one listening port with gRPC.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use basalt_tls::{Acceptor, Stream};
use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::codec::FramedRead;

use basalt_auth::{Authenticated, Guard};

use crate::auth::{read_authorizer, write_verdict};
use crate::frame::{FrameCodec, FrameError, Kind, BANNER};
use crate::write::{write_frames, Outgoing};

/// What a handler returns: the reply's payload, or why the request could not be handled
/// (sent back as an error frame; the connection stays up).
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Bytes, String>> + Send + 'static>>;

/// Answers requests. One call per request; calls of one connection run concurrently.
/// `peer` is who the connection authenticated as (checked once, when it opened).
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, peer: &Arc<Authenticated>, tag: u8, payload: Bytes) -> HandlerFuture;
}

/// Requests of one connection being handled at once, at most: a client that pipelines
/// without bound waits for the socket instead of growing the server's memory.
const MAX_IN_FLIGHT_PER_CONNECTION: usize = 1024;
/// How long a new connection may take to send its first bytes.
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one connection until the peer closes it or sends something that is not a frame.
/// Before any request: the banner, then the peer's authorizer, checked by `guard`; a peer
/// that sends none (or a bad one) gets a refusal naming why, and the connection closes.
pub async fn serve_connection(
    mut stream: Stream,
    handler: Arc<dyn Handler>,
    max_payload: usize,
    guard: Arc<Guard>,
) -> Result<(), FrameError> {
    let mut banner = [0u8; BANNER.len()];
    tokio::time::timeout(FIRST_BYTES_TIMEOUT, stream.read_exact(&mut banner))
        .await
        .map_err(|_| FrameError::Banner)??;
    if &banner != BANNER {
        return Err(FrameError::Banner);
    }
    stream.write_all(BANNER).await?;
    stream.flush().await?;
    let authorizer =
        match tokio::time::timeout(FIRST_BYTES_TIMEOUT, read_authorizer(&mut stream)).await {
            Ok(Ok(a)) => a,
            Ok(Err(FrameError::Unauthenticated(why))) => {
                write_verdict(&mut stream, Err(&why)).await?;
                return Err(FrameError::Unauthenticated(why));
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(FrameError::Unauthenticated("no authorizer in time".into())),
        };
    let peer = match guard.verify(&authorizer) {
        Ok((peer, proof)) => {
            write_verdict(&mut stream, Ok(&proof)).await?;
            Arc::new(peer)
        }
        Err(e) => {
            let why = format!("authentication refused: {e}");
            write_verdict(&mut stream, Err(&why)).await?;
            return Err(FrameError::Unauthenticated(why));
        }
    };
    let (read, write) = stream.into_split();
    let (queue, outgoing) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_frames(write, outgoing));
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_CONNECTION));
    let mut frames = FramedRead::new(read, FrameCodec::new(max_payload));
    let ended = loop {
        let frame = match frames.next().await {
            None => break Ok(()),
            Some(Err(e)) => break Err(e),
            Some(Ok(f)) => f,
        };
        if frame.kind != Kind::Request {
            break Err(FrameError::UnknownKind(frame.kind as u8));
        }
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break Ok(());
        };
        let handler = handler.clone();
        let queue = queue.clone();
        let peer = peer.clone();
        tokio::spawn(async move {
            let reply = match handler.handle(&peer, frame.tag, frame.payload).await {
                Ok(payload) => Outgoing::new(Kind::Reply, frame.tag, frame.id, payload),
                Err(why) => Outgoing::new(Kind::Error, frame.tag, frame.id, Bytes::from(why)),
            };
            // The peer may be gone; its request ran anyway (a resend is answered from the
            // PG log), so a reply with nowhere to go is dropped.
            let _ = queue.send(reply);
            drop(permit);
        });
    };
    // Replies still being computed hold queue clones; the writer ends after the last.
    drop(queue);
    drop(writer);
    ended
}

/// Accepts on `listener`, takes each connection through `acceptor` (TLS, or plain text when
/// TLS is off), and serves the messenger's connections itself; every other connection
/// (gRPC's HTTP/2, whose preface starts with `P`) is handed on through the returned stream,
/// for `tonic`'s `serve_with_incoming`. One port per daemon, as Ceph's msgr2 tells protocols
/// apart by banner; with TLS the banner is read inside the encrypted stream, so both
/// protocols are encrypted. `TCP_NODELAY` is set on every accepted socket. Accepting stops
/// when the returned stream is dropped.
pub fn split_listener(
    listener: TcpListener,
    acceptor: Acceptor,
    handler: Arc<dyn Handler>,
    max_payload: usize,
    guard: Arc<Guard>,
) -> ReceiverStream<std::io::Result<Stream>> {
    let (others, stream) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = others.closed() => return,
            };
            let (socket, from) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = socket.set_nodelay(true);
            let others = others.clone();
            let handler = handler.clone();
            let acceptor = acceptor.clone();
            let guard = guard.clone();
            tokio::spawn(async move {
                let mut stream = match acceptor.accept(socket).await {
                    Ok(s) => s,
                    Err(e) => return basalt_tls::log_refused(&from.to_string(), &e),
                };
                let first = tokio::time::timeout(FIRST_BYTES_TIMEOUT, stream.first_byte()).await;
                match first {
                    Ok(Ok(Some(b))) if b == BANNER[0] => {
                        if let Err(e) = serve_connection(stream, handler, max_payload, guard).await
                        {
                            tracing::debug!(peer = %from, error = %e, "messenger connection closed");
                        }
                    }
                    Ok(Ok(Some(_))) => {
                        let _ = others.send(Ok(stream)).await;
                    }
                    // Closed or silent before saying anything: nothing to serve.
                    _ => {}
                }
            });
        }
    });
    ReceiverStream::new(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CallError, Peer};
    use basalt_auth::handshake::{ClientTicket, Service, ServiceKeys, Ticket};
    use basalt_auth::{Caps, EntityName, Secret, TicketCell};

    fn keys(mon: u8) -> ServiceKeys {
        let mut keys = ServiceKeys::default();
        keys.rotate(1, Secret::from_bytes([mon; 32]), 1);
        keys
    }

    /// A service guard holding the secrets of a cluster whose `mon.` key is all `mon`s.
    fn guard(mon: u8) -> Arc<Guard> {
        let g = Guard::default();
        g.set_keys(keys(mon));
        Arc::new(g)
    }

    /// An `osd` ticket for client.test sealed by cluster `mon`'s secret.
    fn ticket(mon: u8) -> Arc<TicketCell> {
        let session = Secret::from_bytes([9; 32]);
        let t = Ticket {
            entity: EntityName::client("test").expect("name"),
            caps: Caps::default(),
            expires_ms: basalt_auth::live::now_ms() + 600_000,
            session_key: session.clone(),
        };
        let cell = TicketCell::default();
        cell.set(ClientTicket {
            service: Service::Osd,
            expires_ms: t.expires_ms,
            ticket: keys(mon).seal(&t, [1; 12]).expect("seal"),
            session_key: session,
        });
        Arc::new(cell)
    }

    fn client_to(addr: &str) -> Peer {
        Peer::new(
            addr,
            Connector::plain(),
            Duration::from_secs(2),
            1 << 20,
            ticket(1),
        )
    }

    struct Echo;

    impl Handler for Echo {
        fn handle(&self, peer: &Arc<Authenticated>, tag: u8, payload: Bytes) -> HandlerFuture {
            assert_eq!(peer.entity.to_string(), "client.test");
            Box::pin(async move {
                match tag {
                    1 => Ok(payload),
                    // Answers after a delay given in the payload, to reorder replies.
                    2 => {
                        let ms = payload.first().copied().unwrap_or(0) as u64;
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        Ok(payload)
                    }
                    // Never answers (a frozen handler).
                    3 => std::future::pending().await,
                    t => Err(format!("unknown tag {t}")),
                }
            })
        }
    }

    use basalt_tls::Connector;
    use tokio::net::TcpStream;

    async fn server() -> (String, ReceiverStream<std::io::Result<Stream>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        (
            addr.clone(),
            split_listener(l, Acceptor::plain(), Arc::new(Echo), 1 << 20, guard(1)),
        )
    }

    #[tokio::test]
    async fn pipelined_calls_get_their_own_replies() {
        let (addr, _others) = server().await;
        let peer = Arc::new(client_to(&addr));
        let calls = (0..200u32).map(|i| {
            let peer = peer.clone();
            async move {
                let body = Bytes::from(vec![(i % 7) as u8; 1 + (i as usize * 997) % 70_000]);
                let got = peer.call(2, body.clone()).await.expect("reply");
                assert_eq!(got, body, "call {i} got another call's reply");
            }
        });
        futures::future::join_all(calls).await;
    }

    #[tokio::test]
    async fn errors_and_limits_are_typed() {
        let (addr, _others) = server().await;
        let peer = client_to(&addr);
        assert!(matches!(
            peer.call(9, Bytes::new()).await,
            Err(CallError::Refused { .. })
        ));
        // The connection survives a refused request.
        assert_eq!(
            peer.call(1, Bytes::from_static(b"x")).await,
            Ok(Bytes::from_static(b"x"))
        );
        assert!(matches!(
            peer.call(1, Bytes::from(vec![0; (1 << 20) + 1])).await,
            Err(CallError::TooLarge { .. })
        ));
        let nobody = client_to("127.0.0.1:1");
        let e = nobody
            .call(1, Bytes::new())
            .await
            .expect_err("nothing listens on port 1");
        assert!(e.is_connection_failure() && matches!(e, CallError::Connect { .. }));
    }

    #[tokio::test]
    async fn a_broken_connection_fails_waiting_calls_and_the_next_call_reconnects() {
        // A server that answers the banner, takes one request and drops the connection.
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let (addr2, _others) = server().await;
        let peer = client_to(&addr);
        let dropper = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut b = [0u8; 8];
            s.read_exact(&mut b).await.expect("banner");
            s.write_all(BANNER).await.expect("banner");
            let a = read_authorizer(&mut s).await.expect("an authorizer");
            let (_, proof) = guard(1).verify(&a).expect("a good authorizer");
            write_verdict(&mut s, Ok(&proof)).await.expect("verdict");
            let mut h = [0u8; 24];
            s.read_exact(&mut h).await.expect("a request");
            drop(s);
            l
        });
        let e = peer
            .call(3, Bytes::new())
            .await
            .expect_err("the connection was dropped");
        assert!(matches!(e, CallError::Disconnected { .. }), "{e:?}");
        // Same address served properly now: the peer reconnects on its next call.
        let l = dropper.await.expect("dropper");
        drop(l);
        let peer = client_to(&addr2);
        assert_eq!(
            peer.call(1, Bytes::from_static(b"y")).await,
            Ok(Bytes::from_static(b"y"))
        );
    }

    #[tokio::test]
    async fn a_connection_without_a_valid_ticket_is_refused_before_any_request() {
        let (addr, _others) = server().await;
        // No ticket at all: nothing is sent.
        let none = Peer::new(
            &addr,
            Connector::plain(),
            Duration::from_secs(2),
            1 << 20,
            Arc::default(),
        );
        let e = none.call(1, Bytes::new()).await.expect_err("no ticket");
        assert!(matches!(e, CallError::Unauthenticated { .. }), "{e:?}");
        // A ticket sealed by another cluster's secret: the server refuses it, saying why.
        let stranger = Peer::new(
            &addr,
            Connector::plain(),
            Duration::from_secs(2),
            1 << 20,
            ticket(2),
        );
        match stranger.call(1, Bytes::new()).await {
            Err(CallError::Unauthenticated { why, .. }) => {
                assert!(why.contains("ticket cannot be opened"), "{why}")
            }
            other => panic!("a foreign ticket was not refused: {other:?}"),
        }
        // A server that cannot prove it opened the ticket (another cluster's secrets).
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let fake = l.local_addr().expect("addr").to_string();
        let _o = split_listener(l, Acceptor::plain(), Arc::new(Echo), 1 << 20, guard(2));
        let e = client_to(&fake)
            .call(1, Bytes::new())
            .await
            .expect_err("refused");
        assert!(matches!(e, CallError::Unauthenticated { .. }), "{e:?}");
        // A raw connection that skips the exchange gets no frame served.
        let mut raw = TcpStream::connect(&addr).await.expect("connect");
        raw.write_all(BANNER).await.expect("banner");
        let mut b = [0u8; 8];
        raw.read_exact(&mut b).await.expect("banner back");
        raw.write_all(&[0xff; 64]).await.expect("garbage");
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut rest)).await;
        assert!(
            !rest.is_empty() && rest[0] == 1,
            "refused with a reason: {rest:?}"
        );
    }

    #[tokio::test]
    async fn a_caller_that_gives_up_is_forgotten_and_the_connection_serves_on() {
        let (addr, _others) = server().await;
        let peer = client_to(&addr);
        let r = tokio::time::timeout(Duration::from_millis(50), peer.call(3, Bytes::new())).await;
        assert!(r.is_err());
        assert_eq!(
            peer.call(1, Bytes::from_static(b"z")).await,
            Ok(Bytes::from_static(b"z"))
        );
    }

    #[tokio::test]
    async fn other_protocols_on_the_port_are_handed_on() {
        let (addr, mut others) = server().await;
        let mut c = TcpStream::connect(&addr).await.expect("connect");
        c.write_all(b"PRI * HTTP/2.0\r\n").await.expect("write");
        let handed = tokio::time::timeout(Duration::from_secs(10), others.next())
            .await
            .expect("handed on in time")
            .expect("a stream item")
            .expect("a socket");
        let mut got = [0u8; 3];
        let mut handed = handed;
        handed
            .read_exact(&mut got)
            .await
            .expect("the bytes are still there");
        assert_eq!(&got, b"PRI");
    }

    /// A CA, a certificate for 127.0.0.1 and the acceptor and connector built on them.
    fn tls_pair() -> (tempfile::TempDir, Acceptor, Connector) {
        use basalt_tls::gen::{CertificateAuthority, CA_CERT};
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = CertificateAuthority::generate("messenger test CA").expect("CA");
        ca.write(dir.path()).expect("write CA");
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        ca.issue("osd.0", &["127.0.0.1".into()])
            .expect("issue")
            .write(&cert, &key)
            .expect("write");
        let acceptor = Acceptor::tls(&cert, &key).expect("acceptor");
        let connector = Connector::tls(&dir.path().join(CA_CERT), None).expect("connector");
        (dir, acceptor, connector)
    }

    #[tokio::test]
    async fn over_tls_both_protocols_share_the_port_and_plain_text_is_refused_clearly() {
        let (_dir, acceptor, connector) = tls_pair();
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let mut others = split_listener(l, acceptor, Arc::new(Echo), 1 << 20, guard(1));

        let tls_peer = Arc::new(Peer::new(
            &addr,
            connector.clone(),
            Duration::from_secs(5),
            1 << 20,
            ticket(1),
        ));
        let calls = (0..50u32).map(|i| {
            let peer = tls_peer.clone();
            async move {
                let body = Bytes::from(vec![i as u8; 1 + (i as usize * 4099) % 300_000]);
                assert_eq!(peer.call(2, body.clone()).await.expect("reply"), body);
            }
        });
        futures::future::join_all(calls).await;

        // Another protocol inside TLS is handed on with its first bytes intact.
        let mut c = connector.connect(&addr).await.expect("tls");
        c.write_all(b"PRI * HTTP/2.0\r\n").await.expect("write");
        c.flush().await.expect("flush");
        let mut handed = tokio::time::timeout(Duration::from_secs(10), others.next())
            .await
            .expect("handed on in time")
            .expect("a stream item")
            .expect("a stream");
        assert!(handed.is_tls());
        let mut got = [0u8; 3];
        handed.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"PRI");

        // A plain-text messenger client is told why.
        let e = client_to(&addr)
            .call(1, Bytes::new())
            .await
            .expect_err("plain text on a TLS port");
        assert!(
            matches!(&e, CallError::Connect { why, .. } if why.contains("requires TLS")),
            "{e}"
        );
    }
}
