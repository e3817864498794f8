//! # basalt-osd: the object storage daemon's crate
//!
//! `basalt-osd` holds everything an OSD is: the object store, the `basalt-osd` daemon and, later,
//! the PG state machines (primary-copy replication, PG log, peering, recovery, backfill, scrub)
//! that serve clients over gRPC (DESIGN §3). Today it owns:
//!
//! - the [`store`] — objects in 64 KiB checksummed chunks, xattrs, omap and PG bookkeeping (log,
//!   info, reqid dups), applied as atomic, fsynced, group-committed transactions on RocksDB, with
//!   an in-memory twin for simulations and fast tests;
//! - the [`daemon`]'s life cycle with the monitors — format or open the store (refusing another
//!   cluster's), boot and get an id, follow the OSDMap (persisting its epoch), beacon, heartbeat
//!   peers and report the silent ones, boot again when wrongly marked down, stop cleanly. It
//!   serves only the peer heartbeat (`basalt_proto::osd`); no object I/O yet.
//!
//! Layering for what comes next: the PG layer serialises writes per object (it orders a PG's
//! ops anyway), builds one [`store::Transaction`] per client op (data + onode + log entry + dup)
//! and ships the same serialisable transaction to replicas; the store guarantees that each
//! submit is atomic and durable when it returns. The daemon's state owner loop is where PG
//! instances will be driven from map changes.

pub mod daemon;
pub mod peering;
pub mod pg;
pub mod service;
pub mod store;

pub use store::{ObjectId, Store, StoreConfig, StoreError, Transaction};
