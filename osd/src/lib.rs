//! # basalt-osd: the object storage daemon's crate
//!
//! `basalt-osd` holds everything an OSD is (DESIGN §3):
//!
//! - the [`store`] — objects in 64 KiB chunks of crc32c-checked 4 KiB blocks, xattrs, omap and
//!   PG bookkeeping (log, info, reqid dups), applied as atomic transactions through a write-ahead
//!   journal with group commit (one fdatasync per group), metadata in RocksDB, with the same
//!   code on memory for simulations and fast tests;
//! - the [`daemon`]'s life cycle with the monitors — format or open the store (refusing another
//!   cluster's), boot and get an id, follow the OSDMap (persisting its epoch), beacon, heartbeat
//!   peers and report the silent ones, boot again when wrongly marked down, stop cleanly;
//! - the PG layer: [`pg`] turns a compound op into one transaction and holds the store-side
//!   halves of peering and scrub; [`pg_state`] derives a primary's PG state flags;
//!   [`peering`] decides, without IO, whether a PG may go active, which copy is authoritative and how each other copy catches up (log or backfill);
//!   [`service`] runs it all — client ops with primary-copy replication, peering, recovery,
//!   backfill, scheduled scrubs, watch/notify — over gRPC: `service.rs` holds the PG instances,
//!   applies maps and peers, and its children in `service/` each do one of the rest (`op`,
//!   `object_slot`, `peer_client`, `replica`, `recovery`, `scrub`, `snap_trim`,
//!   `watch_notify`, `serve`, `grpc`);
//! - [`peer_msg`]: the typed OSD-to-OSD messages (a versioned envelope on every peering and
//!   replication request; sub-ops with their version, request id and transaction explicit);
//! - the [`data_path`]: client ops and replication sub-ops over `basalt-messenger`, on the
//!   same port as the gRPC service, answered by the same handlers;
//! - PG [`split`]ting: when a pool's `pg_num` grows, each copy of a PG divides its objects,
//!   log and history among its children in one store transaction, before the OSD serves the
//!   map that grew it.

pub mod daemon;
pub mod data_path;
pub mod peer_msg;
pub mod peering;
pub mod pg;
pub mod pg_state;
pub mod service;
pub mod snaps;
pub mod split;
pub mod store;

pub use store::{ObjectId, Store, StoreConfig, StoreError, Transaction};
