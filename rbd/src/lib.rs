//! `basalt-rbd`: block images on the object store, and the exclusive lock
//! that lets exactly one client write an image at a time.
//!
//! What this crate owns:
//! - **Image layout** ([`layout`]): RBD format 2 objects — `rbd_directory`
//!   (omap `name_<name>` → id, `id_<id>` → name), `rbd_id.<name>` (the id),
//!   `rbd_header.<id>` (omap: size, order, object_prefix, features, flags,
//!   stripe unit/count, create timestamp), data in
//!   `rbd_data.<id>.<objectno as 16 hex>`. Object size 2^order, order in
//!   [12, 25], default 22 (4 MiB). Images are thin: a new image has no data
//!   objects; absent objects and short objects read as zeros. Striping is
//!   stripe_unit = object size, count 1 only (fancy striping is refused).
//! - **Image management** ([`Rbd`]): create, list, info, resize, remove,
//!   rename, sparse import/export, with progress callbacks for the CLI.
//! - **Data IO** ([`Image`]): read, write, discard, write_zeroes, flush,
//!   block_status over the objects.
//! - **Exclusive lock hand-over** ([`lock`]): the protocol as a sans-IO
//!   state machine ([`lock::LockCore`]) and its async driver inside
//!   [`Image`]. This is what live migration relies on: the destination's
//!   first write asks the source to hand the lock over; a source that died
//!   is blocklisted (fenced at every OSD) before its lock is broken.
//!
//! Everything is written against [`ObjectBackend`] — one pool as a librados
//! `IoCtx` sees it — so it runs on the real client library and, in tests,
//! on [`mem::MemCluster`]. Also here: snapshots ([`snap`]), clones ([`layering`]),
//! incremental diffs ([`diff`]), the trash ([`trash`]) and the object map ([`object_map`]).
//! Not here: journaling, caches (writes are durable when the backend acks them).

pub mod backend;
pub mod diff;
pub mod error;
pub mod image;
pub mod layering;
pub mod layout;
pub mod lock;
pub mod mem;
pub mod object_map;
pub mod rados;
mod rbd;
pub mod snap;
pub mod trash;
pub mod usage;

pub use backend::{
    BackendError, Locker, NotifyAck, NotifyEvent, NotifyResult, ObjectBackend, WatchEvent, Watcher,
};
pub use error::{RbdError, Result};
pub use image::{Extent, ExtentState, Image, ImageOptions};
pub use layout::DEFAULT_ORDER;
pub use lock::LockConfig;
pub use mem::{MemBackend, MemCluster};
pub use rados::RadosBackend;
pub use rbd::{no_progress, ExportStats, ImageInfo, ImportStats, Progress, Rbd};

/// Register descriptions of this crate's metrics with the installed recorder.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_histogram};
    describe_histogram!(
        "basalt_rbd_stage_seconds",
        "Time per stage of an image write: admit (exclusive lock admission) and write_objects \
         (the object writes, in parallel)"
    );
    describe_counter!(
        "basalt_rbd_lock_handovers_total",
        "Times an image's exclusive lock was taken over from another client (cooperatively or by breaking it)"
    );
    describe_histogram!(
        "basalt_rbd_lock_acquire_seconds",
        "Time from an image's first lock attempt to admitting the writes that waited for it \
         (a hand-over's destination side: ask, wait for the release, lock, refresh)"
    );
    describe_histogram!(
        "basalt_rbd_lock_release_seconds",
        "Time from the event that made an image stop admitting writes (label cause) to its \
         unlock being acknowledged: drain, flush, unlock"
    );
    describe_counter!(
        "basalt_rbd_blocklists_total",
        "Dead lock holders this client blocklisted before breaking their lock"
    );
}
