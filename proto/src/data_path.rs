//! Which `prost` message a data-path messenger frame carries (`basalt-messenger`'s `tag`).
//!
//! The messenger carries client ops and replication sub-ops; everything else (peering,
//! watch/notify, listing, admin) stays on the gRPC services. A request frame's payload is
//! the named request message; its reply frame's payload is the matching reply message.

/// [`crate::osd::OpRequest`] → [`crate::osd::OpReply`]: a client's compound op on one object.
pub const OP: u8 = 1;
/// [`crate::osd::SubOpRequest`] → [`crate::osd::SubOpReply`]: a primary's write to a replica.
pub const SUB_OP: u8 = 2;
