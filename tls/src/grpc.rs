//! gRPC (tonic) over [`Stream`]s: a channel that dials through a [`Connector`], and the
//! accepted connections of a gRPC-only port (the monitors').

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::{Acceptor, Connector, Stream, TlsError};

/// Dials for tonic: the URI's authority through the connector.
#[derive(Clone)]
struct Dial {
    connector: Connector,
}

impl tower_service::Service<http::Uri> for Dial {
    type Response = TokioIo<Stream>;
    type Error = TlsError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, TlsError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), TlsError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connector = self.connector.clone();
        Box::pin(async move {
            let addr = uri
                .authority()
                .map(|a| a.as_str().to_string())
                .ok_or_else(|| TlsError::BadServerName {
                    addr: uri.to_string(),
                })?;
            connector.connect(&addr).await.map(TokioIo::new)
        })
    }
}

/// A lazily connected channel to `endpoint` (an `http://host:port` URI; TLS, if any, is the
/// connector's) that dials through `connector`.
pub fn channel(endpoint: Endpoint, connector: &Connector) -> Channel {
    endpoint.connect_with_connector_lazy(Dial {
        connector: connector.clone(),
    })
}

/// The connections accepted on `listener`, each through `acceptor`'s handshake (run in its
/// own task, so a slow client holds up nobody), for tonic's `serve_with_incoming`. Failed
/// handshakes are logged and dropped. Accepting stops when the returned stream is dropped.
pub fn incoming(
    listener: TcpListener,
    acceptor: Acceptor,
) -> ReceiverStream<std::io::Result<Stream>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = tx.closed() => return,
            };
            let (tcp, from) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let tx = tx.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                match acceptor.accept(tcp).await {
                    Ok(s) => {
                        let _ = tx.send(Ok(s)).await;
                    }
                    Err(e) => log_refused(&from.to_string(), &e),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Logs a connection a TLS port did not take: a plain-text client is worth a warning (a
/// misconfigured host), a handshake that failed too.
pub fn log_refused(from: &str, e: &TlsError) {
    match e {
        TlsError::PlainTextRefused => tracing::warn!(
            peer = %from,
            "refused a plain-text connection: this port requires TLS (the client's [tls] enabled = false?)"
        ),
        e => tracing::warn!(peer = %from, error = %e, "TLS handshake failed"),
    }
}
