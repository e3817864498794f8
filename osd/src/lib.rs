//! # basalt-osd: the object storage daemon's crate
//!
//! `basalt-osd` will hold everything an OSD is: the object store, the PG state machines
//! (primary-copy replication, PG log, peering, recovery, backfill, scrub) and the `basalt-osd`
//! daemon that serves clients over gRPC (DESIGN §3). Today it holds only the foundation every OSD
//! op goes through: the [`store`] — objects in 64 KiB checksummed chunks, xattrs, omap and PG
//! bookkeeping (log, info, reqid dups), applied as atomic, fsynced, group-committed transactions
//! on RocksDB, with an in-memory twin for simulations and fast tests.
//!
//! Layering for what comes next: the PG layer serialises writes per object (it orders a PG's
//! ops anyway), builds one [`store::Transaction`] per client op (data + onode + log entry + dup)
//! and ships the same serialisable transaction to replicas; the store guarantees that each
//! submit is atomic and durable when it returns.

pub mod store;

pub use store::{ObjectId, Store, StoreConfig, StoreError, Transaction};
