//! The object-store interface the image layer is written against: one pool's
//! objects as a librados `IoCtx` sees them. The real client library implements
//! it; [`crate::mem`] ships an in-memory cluster for tests.

use std::collections::BTreeMap;
use std::time::Duration;

use std::sync::Arc;

use async_trait::async_trait;
pub use basalt_client::ops::{CloneSummary, SnapContext, SnapListing};
use bytes::Bytes;
use tokio::sync::mpsc;

/// Typed object-store errors. Each carries a human-readable detail (usually
/// the object name) so a message can say what failed.
///
/// `Clone` because one backend failure (e.g. `Blocklisted`) is fanned out to
/// every write waiting on the exclusive lock.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    Exists(String),
    #[error("busy: {0}")]
    Busy(String),
    #[error("client is blocklisted: {0}")]
    Blocklisted(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("no space left: {0}")]
    NoSpace(String),
    #[error("connection lost: {0}")]
    NotConnected(String),
    #[error("I/O error: {0}")]
    Io(String),
}

/// `backend`'s client on pool `pool`: `backend` itself when it is that pool.
pub fn on_pool(
    backend: &Arc<dyn ObjectBackend>,
    pool: &str,
) -> Result<Arc<dyn ObjectBackend>, BackendError> {
    if pool == backend.pool_name() {
        Ok(backend.clone())
    } else {
        backend.other_pool(pool)
    }
}

/// One holder of a cls_lock-like lock.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Locker {
    /// The holder's client id (what [`ObjectBackend::client_id`] returns).
    pub client: String,
    pub cookie: String,
    pub description: String,
}

/// One watch registered on an object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Watcher {
    pub client: String,
    pub cookie: u64,
}

/// A notification delivered to one watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifyEvent {
    /// Identifies the notify; pass it back to [`ObjectBackend::notify_ack`].
    pub notify_id: u64,
    /// The watch this event was delivered to.
    pub cookie: u64,
    /// The notifier's client id.
    pub notifier: String,
    pub payload: Bytes,
}

/// What a watch's receiver yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// Must be answered with [`ObjectBackend::notify_ack`], or the notifier
    /// counts this watch as timed out.
    Notify(NotifyEvent),
    /// The watch is gone (timed out while this client was unreachable, or the
    /// client was blocklisted). No further events arrive; re-watch to go on.
    Disconnected,
}

/// One watcher's answer to a notify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifyAck {
    pub client: String,
    pub cookie: u64,
    pub reply: Bytes,
}

/// The outcome of a notify: who answered (with what) and who did not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotifyResult {
    pub acks: Vec<NotifyAck>,
    pub timed_out: Vec<Watcher>,
}

/// One pool's objects, as a librados IoCtx sees them. All errors typed.
#[async_trait]
pub trait ObjectBackend: Send + Sync + 'static {
    /// This client instance's identity as OSDs record it in locks and watches and as a lock
    /// breaker blocklists it, e.g. "client.gw.host1/4242" (name/nonce): unique per process
    /// even when the name is fixed.
    fn client_id(&self) -> String;
    /// The same pool whose writes carry `snapc` (the image's snapshots): the first write to
    /// an object after a snapshot preserves what it changes for that snapshot.
    /// `InvalidArgument` for a malformed context (ids not descending in `1..=seq`).
    fn with_snap_context(&self, snapc: SnapContext)
        -> Result<Arc<dyn ObjectBackend>, BackendError>;
    /// The same pool read at snapshot `snap`: reads and stats see the objects as they were
    /// then (`NotFound` for one that did not exist); writes are refused.
    fn at_snap(&self, snap: u64) -> Arc<dyn ObjectBackend>;
    /// This backend's pool, by name.
    fn pool_name(&self) -> String;
    /// The same client on pool `pool` (a clone's parent may live in another pool).
    fn other_pool(&self, pool: &str) -> Result<Arc<dyn ObjectBackend>, BackendError>;
    /// Creates `oid` holding `data`, atomically, unless it exists (then `Ok(false)`): a
    /// clone's copy-up, which must never overwrite what the child wrote itself.
    async fn copyup(&self, oid: &str, data: Bytes) -> Result<bool, BackendError>;
    /// `oid`'s clones and what each may hold differently from the next newer version
    /// (`NotFound` if neither the object nor any clone of it exists).
    async fn list_snaps(&self, oid: &str) -> Result<SnapListing, BackendError>;
    /// Allocates a new snapshot id in the pool (self-managed snapshots).
    async fn snap_alloc(&self) -> Result<u64, BackendError>;
    /// Releases snapshot id `snap`: its preserved data is trimmed in the background.
    async fn snap_release(&self, snap: u64) -> Result<(), BackendError>;
    /// Makes `oid` what it was at snapshot `snap` (removed if it did not exist then),
    /// preserving its current state for this backend's snap context first.
    async fn rollback(&self, oid: &str, snap: u64) -> Result<(), BackendError>;
    /// `NotFound` if absent; short at EOF.
    async fn read(&self, oid: &str, off: u64, len: u64) -> Result<Bytes, BackendError>;
    /// Creates the object if absent.
    async fn write(&self, oid: &str, off: u64, data: Bytes) -> Result<(), BackendError>;
    async fn write_full(&self, oid: &str, data: Bytes) -> Result<(), BackendError>;
    /// `NotFound` if absent. Never extends the object.
    async fn zero(&self, oid: &str, off: u64, len: u64) -> Result<(), BackendError>;
    async fn truncate(&self, oid: &str, size: u64) -> Result<(), BackendError>;
    /// `NotFound` if absent.
    async fn remove(&self, oid: &str) -> Result<(), BackendError>;
    /// The object's size.
    async fn stat(&self, oid: &str) -> Result<u64, BackendError>;
    /// Names of the existing objects starting with `prefix`, in no particular order. Costs a
    /// listing of the pool (what exists), never a probe per possible name.
    async fn list_prefix(&self, prefix: &str) -> Result<Vec<String>, BackendError>;
    /// `Exists` if `exclusive` and present.
    async fn create(&self, oid: &str, exclusive: bool) -> Result<(), BackendError>;
    async fn omap_get(
        &self,
        oid: &str,
        keys: &[String],
    ) -> Result<BTreeMap<String, Bytes>, BackendError>;
    /// Keys strictly after `start_after`, at most `max`; the flag says whether more follow.
    async fn omap_list(
        &self,
        oid: &str,
        start_after: &str,
        max: usize,
    ) -> Result<(Vec<(String, Bytes)>, bool), BackendError>;
    /// Creates the object if absent.
    async fn omap_set(&self, oid: &str, kv: BTreeMap<String, Bytes>) -> Result<(), BackendError>;
    async fn omap_rm(&self, oid: &str, keys: &[String]) -> Result<(), BackendError>;
    /// cls_lock-like advisory lock enforced by the OSD: Busy if held by another (client, cookie).
    async fn lock_exclusive(
        &self,
        oid: &str,
        name: &str,
        cookie: &str,
        description: &str,
    ) -> Result<(), BackendError>;
    /// [`ObjectBackend::lock_exclusive`], then the omap values of `keys` as they are once
    /// the lock is ours. A backend with compound requests does both in one round trip
    /// (atomically: nobody can change them between); this default takes two, which is as
    /// fresh, since changing them needs the lock.
    async fn lock_exclusive_then_omap_get(
        &self,
        oid: &str,
        name: &str,
        cookie: &str,
        description: &str,
        keys: &[String],
    ) -> Result<BTreeMap<String, Bytes>, BackendError> {
        self.lock_exclusive(oid, name, cookie, description).await?;
        self.omap_get(oid, keys).await
    }
    async fn unlock(&self, oid: &str, name: &str, cookie: &str) -> Result<(), BackendError>;
    async fn lock_info(&self, oid: &str, name: &str) -> Result<Vec<Locker>, BackendError>;
    async fn break_lock(
        &self,
        oid: &str,
        name: &str,
        client: &str,
        cookie: &str,
    ) -> Result<(), BackendError>;
    /// Watch: notifications arrive on the returned receiver until unwatch or the watch is lost
    /// ([`WatchEvent::Disconnected`]); each notify must be answered with `notify_ack`.
    async fn watch(&self, oid: &str) -> Result<(u64, mpsc::Receiver<WatchEvent>), BackendError>;
    async fn unwatch(&self, oid: &str, cookie: u64) -> Result<(), BackendError>;
    async fn list_watchers(&self, oid: &str) -> Result<Vec<Watcher>, BackendError>;
    /// Returns the acks (client, cookie, reply payload) and the watchers that timed out.
    async fn notify(
        &self,
        oid: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<NotifyResult, BackendError>;
    async fn notify_ack(
        &self,
        oid: &str,
        notify_id: u64,
        cookie: u64,
        reply: Bytes,
    ) -> Result<(), BackendError>;
    /// Adds `client` to the cluster blocklist and returns once every OSD refuses it
    /// (the map epoch carrying it is known to the client).
    async fn blocklist_add(&self, client: &str, expire: Duration) -> Result<(), BackendError>;
}
