//! How every basalt gRPC endpoint is configured, so servers and clients agree.
//!
//! - `TCP_NODELAY` on both ends: a 4 KiB write is one small HTTP/2 frame plus its reply, and
//!   Nagle's algorithm would hold the second segment of a request back for the peer's delayed
//!   ACK (up to 40 ms on Linux). tonic sets it for servers only when it binds the listener
//!   itself, not for a listener handed to it, so [`incoming`] sets it on every accepted socket.
//! - HTTP/2 flow-control windows sized for the data path: with the 64 KiB default a 1 MiB
//!   write waits for window updates about 16 times on its way; [`STREAM_WINDOW`] lets a whole
//!   op (and several in flight) go without waiting.
//! - A larger maximum frame, so a 1 MiB payload is a few frames rather than 64.

use tonic::transport::server::TcpIncoming;
use tonic::transport::{Endpoint, Server};

/// Per-stream HTTP/2 window: one maximal op (`MAX_MESSAGE_BYTES` is larger, but data-path
/// ops are at most a few MiB) without a window update.
pub const STREAM_WINDOW: u32 = 8 << 20;
/// Per-connection window: several such ops in flight on one connection.
pub const CONNECTION_WINDOW: u32 = 32 << 20;
/// Largest HTTP/2 frame either side accepts.
pub const MAX_FRAME: u32 = 256 << 10;

/// A server builder with the data path's windows and frame size.
pub fn server() -> Server {
    Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
}

/// The connections accepted on `listener`, with `TCP_NODELAY` set on each.
pub fn incoming(listener: impl Into<TcpIncoming>) -> TcpIncoming {
    listener.into().with_nodelay(Some(true))
}

/// `endpoint` with `TCP_NODELAY` and the data path's windows and frame size.
pub fn tune(endpoint: Endpoint) -> Endpoint {
    endpoint
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
}
