//! One connection, plain or TLS, as every basalt protocol reads and writes it.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

enum Inner {
    Plain(TcpStream),
    Client(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Server(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// A connection that is plain TCP or TLS over TCP. It can hold back one byte already read
/// ([`Stream::first_byte`]), which the next read returns first: how a port shared by gRPC
/// and the messenger tells them apart inside TLS, where the socket cannot be peeked.
pub struct Stream {
    inner: Inner,
    unread: Option<u8>,
    local: Option<SocketAddr>,
    remote: Option<SocketAddr>,
}

impl Stream {
    pub(crate) fn plain(tcp: TcpStream) -> Stream {
        let (local, remote) = (tcp.local_addr().ok(), tcp.peer_addr().ok());
        Stream {
            inner: Inner::Plain(tcp),
            unread: None,
            local,
            remote,
        }
    }

    pub(crate) fn client_tls(s: tokio_rustls::client::TlsStream<TcpStream>) -> Stream {
        let (local, remote) = {
            let tcp = s.get_ref().0;
            (tcp.local_addr().ok(), tcp.peer_addr().ok())
        };
        let mut st = Stream::new_tls(Inner::Client(Box::new(s)));
        (st.local, st.remote) = (local, remote);
        st
    }

    pub(crate) fn server_tls(s: tokio_rustls::server::TlsStream<TcpStream>) -> Stream {
        let (local, remote) = {
            let tcp = s.get_ref().0;
            (tcp.local_addr().ok(), tcp.peer_addr().ok())
        };
        let mut st = Stream::new_tls(Inner::Server(Box::new(s)));
        (st.local, st.remote) = (local, remote);
        st
    }

    fn new_tls(inner: Inner) -> Stream {
        Stream {
            inner,
            unread: None,
            local: None,
            remote: None,
        }
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        !matches!(self.inner, Inner::Plain(_))
    }

    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.remote
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local
    }

    /// The DER certificates the peer presented (a TLS server's view of a client that sent
    /// one), leaf first; empty without TLS or without a client certificate.
    pub fn peer_certificates(&self) -> Vec<Vec<u8>> {
        match &self.inner {
            Inner::Server(s) => s
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| c.iter().map(|d| d.as_ref().to_vec()).collect())
                .unwrap_or_default(),
            Inner::Client(s) => s
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| c.iter().map(|d| d.as_ref().to_vec()).collect())
                .unwrap_or_default(),
            Inner::Plain(_) => Vec::new(),
        }
    }

    /// Reads the first byte and keeps it for the next read. `None`: closed before it.
    pub async fn first_byte(&mut self) -> io::Result<Option<u8>> {
        if let Some(b) = self.unread {
            return Ok(Some(b));
        }
        let mut b = [0u8; 1];
        let n = match &mut self.inner {
            Inner::Plain(s) => s.read(&mut b).await?,
            Inner::Client(s) => s.read(&mut b).await?,
            Inner::Server(s) => s.read(&mut b).await?,
        };
        if n == 0 {
            return Ok(None);
        }
        self.unread = Some(b[0]);
        Ok(Some(b[0]))
    }

    /// Splits into halves that a reader task and a writer task own. Plain TCP splits without
    /// a lock; a TLS session is one state machine, so its halves share it behind tokio's
    /// split lock.
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        match (self.inner, self.unread) {
            (Inner::Plain(s), None) => {
                let (r, w) = s.into_split();
                (Box::pin(r), Box::pin(w))
            }
            (inner, unread) => {
                let whole = Stream {
                    inner,
                    unread,
                    local: self.local,
                    remote: self.remote,
                };
                let (r, w) = tokio::io::split(whole);
                (Box::pin(r), Box::pin(w))
            }
        }
    }
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("tls", &self.is_tls())
            .field("local", &self.local)
            .field("remote", &self.remote)
            .finish()
    }
}

/// The reading half of a [`Stream`].
pub type ReadHalf = Pin<Box<dyn AsyncRead + Send>>;
/// The writing half of a [`Stream`].
pub type WriteHalf = Pin<Box<dyn AsyncWrite + Send>>;

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(b) = this.unread {
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            buf.put_slice(&[b]);
            this.unread = None;
            return Poll::Ready(Ok(()));
        }
        match &mut this.inner {
            Inner::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Inner::Client(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Inner::Server(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().inner {
            Inner::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Inner::Client(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Inner::Server(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().inner {
            Inner::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Inner::Client(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Inner::Server(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.inner {
            Inner::Plain(s) => s.is_write_vectored(),
            Inner::Client(s) => s.is_write_vectored(),
            Inner::Server(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Plain(s) => Pin::new(s).poll_flush(cx),
            Inner::Client(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Inner::Server(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Inner::Client(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Inner::Server(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl tonic::transport::server::Connected for Stream {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo {
            local_addr: self.local,
            remote_addr: self.remote,
        }
    }
}
