//! The data-path messenger: client ops, sub-ops and their replies as small framed messages
//! pipelined over persistent TCP connections, one per peer.
//!
//! Owns the wire framing ([`frame`]), the caller's side of a connection ([`Peer`]: connect,
//! send, match replies to requests by id, fail every waiting request when the connection
//! breaks) and the serving side ([`serve_connection`], and [`split_listener`], which lets one
//! listening port carry both this messenger and gRPC).
//!
//! **Why not gRPC here.** A 4 KiB replicated write crossed three gRPC unary calls, each a
//! protobuf message through hyper's HTTP/2 connection task with about six task wake-ups; on
//! two cores that was a large share of the CPU per write (BENCHMARKS.md). A frame here is a
//! 24-byte header and the payload bytes unchanged; a reply is matched by request id; frames
//! queued while the socket was busy go out in one `writev`; a payload is received straight
//! into its own buffer and handed to the handler without another copy. The message bodies are
//! still the `prost` messages of `basalt-proto` (the wire contracts stay in one place), and
//! gRPC stays for the monitors, admin commands, peering and watch/notify, where its streams
//! and tooling matter more than microseconds — as Ceph keeps msgr2 for its data path.
//!
//! **Libraries.** Reading uses `tokio_util::codec::FramedRead` with [`frame::FrameCodec`]
//! (buffering, partial reads); writing is hand-written because `FramedWrite` copies every
//! payload into its buffer, and a 1 MiB write should go to the kernel from the caller's
//! buffer (`writev` of header and payload slices).
//!
//! **Authentication.** A connection opens with an auth exchange (`auth.rs`): the caller's
//! authorizer for its `osd` ticket, checked by the server's `basalt_auth::Guard` before any
//! frame is read, and the server's proof back, checked by the caller. The handler learns who
//! the peer is ([`Handler::handle`]'s `peer`) and checks caps per request.
//!
//! **Outcome of a broken connection.** A request whose connection breaks before its reply is
//! [`CallError::Disconnected`]: it may or may not have been applied. The data path resends such
//! a request with the same request id, and the OSD's PG log answers a resend of one that
//! landed, so nothing is applied twice.

mod auth;
pub mod frame;
mod peer;
mod server;
mod write;

pub use frame::{Frame, FrameError, Kind, BANNER};
pub use peer::{CallError, Peer};
pub use server::{serve_connection, split_listener, Handler, HandlerFuture};
