//! An open image: data IO over the objects, and the async driver that runs
//! the [`LockCore`] against the backend.
//!
//! ```text
//!  Image::write ──Want(id)──▶ driver task (one state owner) ◀── header watch events
//!        ▲                     core.handle(now, Event) → [Action]
//!        └──── admitted ───────  each IO action runs in a spawned task and
//!  (guard drop → Finished(id))   reports back as an Event (the loop never blocks)
//! ```
//!
//! Reads take no lock. Writes, discards, zeroes and resizes are admitted by
//! the core (which takes the lock lazily) and report completion when their
//! guard drops, so a hand-over drains them before unlocking.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::try_join_all;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::backend::{on_pool, BackendError, ObjectBackend, SnapContext, WatchEvent, Watcher};
use crate::error::{RbdError, Result};
use crate::layering::{self, ParentSpec};
use crate::layout::{self, Header};
use crate::lock::{Action, Event, LockConfig, LockCore, LockOwner, Refusal, WriteId};
use crate::object_map::scan::{self, scan};
use crate::object_map::{self, live::LiveMap, ObjectMap, ObjectState};
use crate::snap::{self, SnapInfo};

/// How many object operations one request keeps in flight.
pub(crate) const OBJECT_CONCURRENCY: usize = 16;
/// Up to this many object numbers, a trim or removal addresses each possible object
/// (a missing one costs one `NotFound`); beyond, it lists the pool for the objects that
/// exist, so a thin 8 EiB image costs what it holds, not 2^41 removes.
const PROBE_MAX_OBJECTS: u64 = 1024;

/// The data objects numbered `from..to` of the image whose objects are `prefix.<16 hex>`
/// that may exist: every number in a small range, else the existing ones, listed.
pub(crate) async fn data_objects_in(
    backend: &dyn ObjectBackend,
    prefix: &str,
    from: u64,
    to: u64,
) -> std::result::Result<Vec<u64>, BackendError> {
    if to.saturating_sub(from) <= PROBE_MAX_OBJECTS {
        return Ok((from..to).collect());
    }
    let mut found: Vec<u64> = backend
        .list_prefix(&format!("{prefix}."))
        .await?
        .iter()
        .filter_map(|oid| layout::data_objectno(prefix, oid))
        .filter(|n| (from..to).contains(n))
        .collect();
    found.sort_unstable();
    Ok(found)
}

/// Knobs for an open image.
#[derive(Debug, Clone)]
pub struct ImageOptions {
    pub lock: LockConfig,
    /// How long a RequestLock notify waits for the holder's answer.
    pub notify_timeout: Duration,
    /// How long a broken holder stays blocklisted (Ceph: 1 h by default here).
    pub blocklist_expire: Duration,
}

impl Default for ImageOptions {
    fn default() -> Self {
        ImageOptions {
            lock: LockConfig::default(),
            notify_timeout: Duration::from_secs(5),
            blocklist_expire: Duration::from_secs(3600),
        }
    }
}

/// Messages on the header watch, postcard-encoded.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum NotifyMsg {
    /// "Please release the exclusive lock" from `client`.
    RequestLock { client: String },
    /// The header changed (resize): re-read it.
    HeaderUpdate,
}

/// Allocation state of an extent, as `block_status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentState {
    /// Backed by an existing object (may still contain zeros).
    Data,
    /// No object backs it: reads return zeros.
    Hole,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub state: ExtentState,
}

/// State shared by an image handle, its write guards and its driver.
pub(crate) struct Shared {
    pub(crate) backend: Arc<dyn ObjectBackend>,
    pub(crate) name: String,
    pub(crate) id: String,
    pub(crate) header_oid: String,
    pub(crate) prefix: String,
    pub(crate) order: u8,
    size: AtomicU64,
    handovers: AtomicU64,
    /// Set once the lock core failed for good (blocklisted).
    failure: Mutex<Option<RbdError>>,
    /// What data objects are read and written through: the backend with the image's snap
    /// context (replaced when a refresh finds a new one), or, for an image opened at a
    /// snapshot, the backend reading at it.
    data: Mutex<Arc<dyn ObjectBackend>>,
    /// Set when the image was opened at this snapshot: read-only, of the snapshot's size.
    snap: Option<SnapInfo>,
    /// A clone's parent: where objects it has not written read from.
    parent: Option<Parent>,
    /// The header's `features` and `flags` as last read.
    features: AtomicU64,
    flags: AtomicU64,
    /// The head's object map, while this client holds the exclusive lock and the image keeps
    /// a valid one (loaded by the refresh that follows taking the lock).
    object_map: Mutex<Option<Arc<LiveMap>>>,
}

/// A clone's view of its parent ([`crate::layering`]).
pub(crate) struct Parent {
    spec: ParentSpec,
    /// The parent's pool, reading at the snapshot.
    data: Arc<dyn ObjectBackend>,
    prefix: String,
    /// Bytes of the child that still map onto the parent.
    overlap: AtomicU64,
    /// Objects known to exist in the child (copied up or written): no copy-up needed.
    copied: Mutex<std::collections::HashSet<u64>>,
}

impl Parent {
    /// How many bytes of object `objectno` (of `os` bytes) map onto the parent.
    fn mapped(&self, objectno: u64, os: u64) -> u64 {
        self.overlap
            .load(Ordering::SeqCst)
            .saturating_sub(objectno * os)
            .min(os)
    }

    fn is_copied(&self, objectno: u64) -> bool {
        self.copied.lock().map_or(false, |c| c.contains(&objectno))
    }

    fn mark_copied(&self, objectno: u64) {
        if let Ok(mut c) = self.copied.lock() {
            c.insert(objectno);
        }
    }
}

impl Shared {
    fn object_size(&self) -> u64 {
        1 << self.order
    }

    fn oid(&self, objectno: u64) -> String {
        layout::data_oid(&self.prefix, objectno)
    }

    /// Whether object `objectno` of this clone still maps onto its parent.
    fn maps_onto_parent(&self, objectno: u64) -> bool {
        self.parent
            .as_ref()
            .is_some_and(|p| p.mapped(objectno, self.object_size()) > 0)
    }

    /// Bytes `[off, off + len)` of object `objectno` from the parent, if this is a clone and
    /// the range maps onto it (short or empty past the overlap); `None` if it does not.
    async fn read_parent(
        &self,
        objectno: u64,
        off: u64,
        len: u64,
    ) -> std::result::Result<Option<Bytes>, BackendError> {
        let Some(p) = &self.parent else {
            return Ok(None);
        };
        let mapped = p.mapped(objectno, self.object_size());
        if off >= mapped {
            return Ok(None);
        }
        let oid = layout::data_oid(&p.prefix, objectno);
        match p.data.read(&oid, off, len.min(mapped - off)).await {
            Ok(b) => Ok(Some(b)),
            Err(BackendError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Before a clone changes object `objectno`: copies the parent's object up if the child
    /// does not have it yet. Returns whether the object maps onto the parent.
    async fn copy_up(&self, objectno: u64) -> std::result::Result<bool, BackendError> {
        let Some(p) = &self.parent else {
            return Ok(false);
        };
        let mapped = p.mapped(objectno, self.object_size());
        if mapped == 0 {
            return Ok(false);
        }
        if p.is_copied(objectno) {
            return Ok(true);
        }
        let _mark = self.mark_written(objectno).await?;
        if let Some(data) = self.read_parent(objectno, 0, mapped).await? {
            self.data().copyup(&self.oid(objectno), data).await?;
        }
        p.mark_copied(objectno);
        Ok(true)
    }

    fn data(&self) -> Arc<dyn ObjectBackend> {
        match self.data.lock() {
            Ok(d) => d.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Data objects are written with snap context `snapc` from now on.
    fn set_snap_context(&self, snapc: SnapContext) -> std::result::Result<(), BackendError> {
        let data = self.backend.with_snap_context(snapc)?;
        match self.data.lock() {
            Ok(mut d) => *d = data,
            Err(poisoned) => *poisoned.into_inner() = data,
        }
        Ok(())
    }

    fn live_map(&self) -> Option<Arc<LiveMap>> {
        match self.object_map.lock() {
            Ok(m) => m.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set_live_map(&self, map: Option<LiveMap>) {
        let map = map.map(Arc::new);
        match self.object_map.lock() {
            Ok(mut m) => *m = map,
            Err(poisoned) => *poisoned.into_inner() = map,
        }
    }

    /// Before writing object `objectno`: the object map says it exists (if one is kept).
    async fn mark_written(
        &self,
        objectno: u64,
    ) -> std::result::Result<Option<object_map::live::WriteMark>, BackendError> {
        match self.live_map() {
            Some(m) => m.before_write(objectno).await.map(Some),
            None => Ok(None),
        }
    }

    /// Zeroes part of object `objectno` where it is (never creating it: `NotFound` if it
    /// does not exist), marking it changed in the object map first.
    async fn zero_in_place(
        &self,
        objectno: u64,
        off: u64,
        len: u64,
    ) -> std::result::Result<(), BackendError> {
        let _mark = match self.live_map() {
            Some(m) => match m.before_change(objectno).await {
                Ok(Some(mark)) => Some(mark),
                // The map knows it does not exist: nothing to zero.
                Ok(None) => return Ok(()),
                // A full pool refuses the map write but lets a shrink (sent with full_try)
                // update the header: the maps are then flagged invalid rather than wrong,
                // and the zero that frees space goes ahead.
                Err(e @ BackendError::NoSpace(_)) => {
                    self.invalidate_object_map(&format!("no room to mark a change: {e}"))
                        .await
                        .map_err(|_| e)?;
                    None
                }
                Err(e) => return Err(e),
            },
            None => None,
        };
        self.data().zero(&self.oid(objectno), off, len).await
    }

    /// Whether the image keeps an object map that can be trusted.
    fn keeps_object_map(&self) -> bool {
        self.features.load(Ordering::SeqCst) & object_map::FEATURE_OBJECT_MAP != 0
            && self.flags.load(Ordering::SeqCst) & object_map::FLAG_OBJECT_MAP_INVALID == 0
    }

    /// After taking the lock: reads the head's object map (another client may have changed
    /// it). A missing or malformed one is flagged invalid in the header (until `rbd
    /// object-map rebuild`) and the image is written without one meanwhile.
    async fn load_object_map(&self) -> std::result::Result<(), BackendError> {
        if self.snap.is_some() || !self.keeps_object_map() {
            self.set_live_map(None);
            return Ok(());
        }
        let oid = object_map::map_oid(&self.id, None);
        let size = self.size.load(Ordering::SeqCst);
        match object_map::read(self.backend.as_ref(), &oid, size, self.order).await? {
            Ok(map) => {
                self.set_live_map(Some(LiveMap::start(self.backend.clone(), oid, &map)));
                Ok(())
            }
            Err(why) => self.invalidate_object_map(&why.to_string()).await,
        }
    }

    /// Stores the head map for a new size: objects past the end forgotten, new ones absent.
    async fn resize_object_map(&self, new_size: u64) -> std::result::Result<(), BackendError> {
        let Some(live) = self.live_map() else {
            return Ok(());
        };
        let objects = match object_map::objects_for(new_size, self.order) {
            Ok(n) => n,
            Err(too_large) => return self.invalidate_object_map(&too_large.to_string()).await,
        };
        let mut map = live.current();
        let shrinking = objects < map.len();
        map.resize(objects);
        if !shrinking {
            return self.install_object_map(map).await;
        }
        // Truncating frees space, so it also runs on a full pool (a shrink is how space is
        // freed there); bits past the last object in the last byte are ignored on load.
        let oid = object_map::map_oid(&self.id, None);
        self.backend
            .truncate(&oid, object_map::encoded_len(objects) as u64)
            .await?;
        self.set_live_map(Some(LiveMap::start(self.backend.clone(), oid, &map)));
        Ok(())
    }

    /// Stores `map` as the head's and keeps it (its length may differ from the current one).
    async fn install_object_map(&self, map: ObjectMap) -> std::result::Result<(), BackendError> {
        let oid = object_map::map_oid(&self.id, None);
        self.backend.write_full(&oid, map.encode()).await?;
        self.set_live_map(Some(LiveMap::start(self.backend.clone(), oid, &map)));
        Ok(())
    }

    /// After snapshot `snap` was taken: stores the head map as the snapshot's, then marks
    /// the head's objects unchanged since it (fast-diff). Without a head map the snapshot
    /// has none either, and `rbd du` reads its objects instead.
    async fn snapshot_object_map(&self, snap: u64) -> std::result::Result<(), BackendError> {
        let Some(live) = self.live_map() else {
            return Ok(());
        };
        let mut map = live.current();
        self.backend
            .write_full(&object_map::map_oid(&self.id, Some(snap)), map.encode())
            .await?;
        map.mark_clean();
        live.replace(map).await
    }

    /// Before snapshot `removed` goes: what changed in it moves to the next newer map (the
    /// oldest later snapshot's, else the head's), whose unchanged bits were relative to it;
    /// then its map is removed. Without its map, the next one counts everything as changed.
    async fn forget_snapshot_map(
        &self,
        removed: &SnapInfo,
        later: Option<&SnapInfo>,
    ) -> std::result::Result<(), BackendError> {
        if !self.keeps_object_map() {
            return Ok(());
        }
        let removed_oid = object_map::map_oid(&self.id, Some(removed.id));
        let old = object_map::read(
            self.backend.as_ref(),
            &removed_oid,
            removed.size,
            self.order,
        )
        .await?
        .ok();
        let absorb = |next: &mut ObjectMap| match &old {
            Some(old) => next.absorb_removed(old),
            None => next.mark_dirty(),
        };
        match later {
            Some(s) => {
                let oid = object_map::map_oid(&self.id, Some(s.id));
                if let Ok(mut next) =
                    object_map::read(self.backend.as_ref(), &oid, s.size, self.order).await?
                {
                    absorb(&mut next);
                    self.backend.write_full(&oid, next.encode()).await?;
                }
            }
            None => {
                if let Some(live) = self.live_map() {
                    let mut next = live.current();
                    absorb(&mut next);
                    live.replace(next).await?;
                }
            }
        }
        match self.backend.remove(&removed_oid).await {
            Ok(()) | Err(BackendError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Before a rollback to `at`: the head's map also marks what exists at the snapshot
    /// (objects the rollback brings back), so it stays a superset meanwhile. Returns the
    /// snapshot's map, to install once the rollback is done. Without the snapshot's map,
    /// the head's is flagged invalid until rebuilt.
    async fn rollback_object_map(
        &self,
        at: &SnapInfo,
    ) -> std::result::Result<Option<ObjectMap>, BackendError> {
        let Some(live) = self.live_map() else {
            return Ok(None);
        };
        let oid = object_map::map_oid(&self.id, Some(at.id));
        match object_map::read(self.backend.as_ref(), &oid, at.size, self.order).await? {
            Ok(mut target) => {
                let mut union = live.current();
                union.resize(union.len().max(target.len()));
                for (n, s) in target.states().iter().enumerate() {
                    if s.exists() {
                        union.set(n as u64, ObjectState::Exists);
                    }
                }
                self.install_object_map(union).await?;
                // Everything the rollback wrote counts as changed since the latest snapshot.
                target.mark_dirty();
                Ok(Some(target))
            }
            Err(why) => self
                .invalidate_object_map(&why.to_string())
                .await
                .map(|()| None),
        }
    }

    /// Flags the object map invalid in the header and stops keeping it.
    async fn invalidate_object_map(&self, why: &str) -> std::result::Result<(), BackendError> {
        tracing::warn!(image = %self.name, why, "object map invalid: run `basalt rbd object-map rebuild`");
        self.set_live_map(None);
        let flags = self.flags.load(Ordering::SeqCst) | object_map::INVALID_FLAGS;
        self.set_header_u64("flags", flags, &self.flags).await
    }

    /// Stores header value `key` and, once stored, its copy in memory.
    async fn set_header_u64(
        &self,
        key: &str,
        value: u64,
        copy: &AtomicU64,
    ) -> std::result::Result<(), BackendError> {
        let mut kv = std::collections::BTreeMap::new();
        kv.insert(key.to_string(), layout::u64_bytes(value));
        self.backend.omap_set(&self.header_oid, kv).await?;
        copy.store(value, Ordering::SeqCst);
        Ok(())
    }

    /// The header keys a refresh reads.
    fn refresh_keys() -> Vec<String> {
        ["size", "features", "flags", snap::SNAP_CONTEXT_KEY]
            .map(String::from)
            .to_vec()
    }

    /// Takes the size and snap context of a header read with [`Shared::refresh_keys`]
    /// (an image open at a snapshot keeps its own).
    fn apply_header(
        &self,
        m: &std::collections::BTreeMap<String, Bytes>,
    ) -> std::result::Result<u64, BackendError> {
        let bad = |why: String| BackendError::Io(format!("{}: {why}", self.header_oid));
        let size = size_in(m).ok_or_else(|| bad("bad size in header".into()))?;
        for (key, slot) in [("features", &self.features), ("flags", &self.flags)] {
            if let Some(v) = m.get(key).and_then(|b| layout::u64_of_bytes(b)) {
                slot.store(v, Ordering::SeqCst);
            }
        }
        if let Some(at) = &self.snap {
            return Ok(at.size);
        }
        self.set_snap_context(snap::context_in(m).map_err(bad)?)?;
        self.size.store(size, Ordering::SeqCst);
        Ok(size)
    }

    async fn refresh_size(&self) -> std::result::Result<u64, BackendError> {
        let m = self
            .backend
            .omap_get(&self.header_oid, &Self::refresh_keys())
            .await?;
        self.apply_header(&m)
    }

    async fn snapshots(&self) -> Result<Vec<SnapInfo>> {
        read_snapshots(self.backend.as_ref(), &self.name, &self.header_oid).await
    }

    /// The `seq` of the image's snap context as the header has it.
    async fn context_seq(&self) -> Result<u64> {
        let m = self
            .backend
            .omap_get(&self.header_oid, &Self::refresh_keys())
            .await?;
        Ok(snap::context_in(&m)
            .map_err(|why| RbdError::Corrupt(self.name.clone(), why))?
            .seq)
    }

    fn snap_named(infos: &[SnapInfo], image: &str, name: &str) -> Result<SnapInfo> {
        infos
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .ok_or_else(|| RbdError::NotFound(format!("{image}@{name}")))
    }
}

/// The image size in the header's omap values, if well-formed.
fn size_in(header: &std::collections::BTreeMap<String, Bytes>) -> Option<u64> {
    header
        .get("size")
        .and_then(|v| <[u8; 8]>::try_from(&v[..]).ok())
        .map(u64::from_le_bytes)
}

enum Cmd {
    Want(WriteId, oneshot::Sender<std::result::Result<(), Refusal>>),
    Finished(WriteId),
    Blocklisted(String),
    /// Relinquish the lock; the sender (if any) is told once it is no longer held.
    Relinquish(Option<oneshot::Sender<()>>),
    Close(Option<oneshot::Sender<()>>),
}

/// An admitted write; dropping it tells the driver the write is over.
struct WriteGuard {
    id: WriteId,
    cmd: mpsc::UnboundedSender<Cmd>,
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        let _ = self.cmd.send(Cmd::Finished(self.id));
    }
}

/// An open image. Dropping it releases the lock in the background; call
/// [`Image::close`] to wait for that.
pub struct Image {
    shared: Arc<Shared>,
    cmd: mpsc::UnboundedSender<Cmd>,
    next_write: AtomicU64,
}

impl Image {
    /// Open `name`: read its header and watch it. Takes no lock.
    pub async fn open(backend: Arc<dyn ObjectBackend>, name: &str) -> Result<Image> {
        Self::open_with(backend, name, ImageOptions::default()).await
    }

    pub async fn open_with(
        backend: Arc<dyn ObjectBackend>,
        name: &str,
        opts: ImageOptions,
    ) -> Result<Image> {
        Self::open_at(backend, name, opts, None).await
    }

    /// Opens `name` at its snapshot `snap_name`: read-only, of the snapshot's size, reading
    /// the data as it was when the snapshot was taken.
    pub async fn open_snapshot(
        backend: Arc<dyn ObjectBackend>,
        name: &str,
        snap_name: &str,
        opts: ImageOptions,
    ) -> Result<Image> {
        Self::open_at(backend, name, opts, Some(snap_name)).await
    }

    async fn open_at(
        backend: Arc<dyn ObjectBackend>,
        name: &str,
        opts: ImageOptions,
        snap_name: Option<&str>,
    ) -> Result<Image> {
        let id = read_id(backend.as_ref(), name).await?;
        let header_oid = layout::header_oid(&id);
        let header = read_header(backend.as_ref(), name, &header_oid).await?;
        let (snap, data, size) = match snap_name {
            Some(s) => {
                let infos = read_snapshots(backend.as_ref(), name, &header_oid).await?;
                let at = Shared::snap_named(&infos, name, s)?;
                let data = backend.at_snap(at.id);
                let size = at.size;
                (Some(at), data, size)
            }
            None => (
                None,
                backend.with_snap_context(header.snapc.clone())?,
                header.size,
            ),
        };
        let (cookie, watch_rx) = backend.watch(&header_oid).await.map_err(|e| match e {
            BackendError::NotFound(_) => RbdError::NotFound(name.to_string()),
            e => e.into(),
        })?;
        let parent = match &header.parent {
            Some(spec) => Some(Parent {
                data: on_pool(&backend, &spec.pool)?.at_snap(spec.snap_id),
                prefix: layout::object_prefix(&spec.image_id),
                overlap: AtomicU64::new(spec.overlap),
                copied: Mutex::new(Default::default()),
                spec: spec.clone(),
            }),
            None => None,
        };
        let shared = Arc::new(Shared {
            data: Mutex::new(data),
            snap,
            parent,
            backend: backend.clone(),
            name: name.to_string(),
            id,
            header_oid,
            prefix: header.object_prefix,
            order: header.order,
            size: AtomicU64::new(size),
            handovers: AtomicU64::new(0),
            failure: Mutex::new(None),
            features: AtomicU64::new(header.features),
            flags: AtomicU64::new(header.flags),
            object_map: Mutex::new(None),
        });
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let core = LockCore::new(opts.lock.clone(), backend.client_id(), cookie);
        let driver = Driver {
            shared: shared.clone(),
            opts,
            core,
            origin: Instant::now(),
            cookie,
            watch_rx: Some(watch_rx),
            waiters: HashMap::new(),
            notify_cookies: HashMap::new(),
            closers: Vec::new(),
            relinquishers: Vec::new(),
            acquiring_since: None,
            acquiring_handover: false,
            header_with_lock: None,
            releasing_since: None,
        };
        tokio::spawn(driver.run(cmd_rx));
        Ok(Image {
            shared,
            cmd: cmd_tx,
            next_write: AtomicU64::new(1),
        })
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// The image size as of the last header read (refreshed on lock
    /// acquisition and on HeaderUpdate notifies).
    pub fn size(&self) -> u64 {
        self.shared.size.load(Ordering::SeqCst)
    }

    pub fn object_size(&self) -> u64 {
        self.shared.object_size()
    }

    pub fn order(&self) -> u8 {
        self.shared.order
    }

    /// How many times this image took the lock from another holder.
    pub fn lock_handovers(&self) -> u64 {
        self.shared.handovers.load(Ordering::Relaxed)
    }

    fn check_range(&self, off: u64, len: u64) -> Result<()> {
        let size = self.size();
        match off.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(RbdError::InvalidArgument(format!(
                "extent {off}+{len} past the end of image {} ({size} bytes)",
                self.shared.name
            ))),
        }
    }

    fn failure(&self) -> Option<RbdError> {
        self.shared
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Wait for the exclusive lock (taken lazily) and admission.
    async fn admit(&self) -> Result<WriteGuard> {
        if let Some(at) = &self.shared.snap {
            return Err(RbdError::ReadOnly(format!(
                "{}@{} is a snapshot",
                self.shared.name, at.name
            )));
        }
        let id = self.next_write.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let closed = || RbdError::Closed(self.shared.name.clone());
        self.cmd.send(Cmd::Want(id, tx)).map_err(|_| closed())?;
        // Created before waiting: if the caller gives up, the drop withdraws the request.
        let guard = WriteGuard {
            id,
            cmd: self.cmd.clone(),
        };
        match rx.await {
            Ok(Ok(())) => Ok(guard),
            Ok(Err(Refusal::Blocklisted(who))) => Err(RbdError::Blocklisted(who)),
            Ok(Err(Refusal::TimedOut)) => Err(RbdError::LockTimeout(self.shared.name.clone())),
            Ok(Err(Refusal::NoSpace(why))) => Err(RbdError::Backend(BackendError::NoSpace(why))),
            Ok(Err(Refusal::Closed)) | Err(_) => Err(closed()),
        }
    }

    /// Map a backend error of an admitted write; a blocklist is reported to
    /// the core so every later write fails too.
    fn write_error(&self, e: BackendError) -> RbdError {
        if let BackendError::Blocklisted(who) = &e {
            let _ = self.cmd.send(Cmd::Blocklisted(who.clone()));
        }
        e.into()
    }

    /// Read `len` bytes at `off`. Holes and short objects read as zeros.
    pub async fn read(&self, off: u64, len: u64) -> Result<Bytes> {
        self.check_range(off, len)?;
        let n = usize::try_from(len)
            .map_err(|_| RbdError::InvalidArgument(format!("read of {len} bytes")))?;
        let sh = &self.shared;
        let data = &sh.data();
        let parts = try_join_all(layout::object_extents(off, len, sh.order).into_iter().map(
            |e| async move {
                match data.read(&sh.oid(e.objectno), e.offset, e.len).await {
                    Ok(b) => Ok((e, b)),
                    Err(BackendError::NotFound(_)) => {
                        let parent = sh.read_parent(e.objectno, e.offset, e.len).await?;
                        Ok((e, parent.unwrap_or_default()))
                    }
                    Err(err) => Err(RbdError::from(err)),
                }
            },
        ))
        .await?;
        // A read within one object that the object fills (most reads of a VM disk): its
        // bytes as they came off the wire, without assembling a copy.
        if let [(e, b)] = parts.as_slice() {
            if e.len as usize == n && b.len() >= n {
                return Ok(b.slice(..n));
            }
        }
        let mut buf = BytesMut::zeroed(n);
        for (e, b) in parts {
            let at = e.buf_offset as usize;
            let k = b.len().min(e.len as usize);
            buf[at..at + k].copy_from_slice(&b[..k]);
        }
        Ok(buf.freeze())
    }

    /// Write `data` at `off` (taking the exclusive lock if needed).
    pub async fn write(&self, off: u64, data: Bytes) -> Result<()> {
        let len = data.len() as u64;
        self.check_range(off, len)?;
        let admitting = std::time::Instant::now();
        let _guard = self.admit().await?;
        stage("admit", admitting);
        // The size may have changed while another client held the lock.
        self.check_range(off, len)?;
        let sh = &self.shared;
        let backend = &sh.data();
        let writing = std::time::Instant::now();
        try_join_all(
            layout::object_extents(off, len, sh.order)
                .into_iter()
                .map(|e| {
                    let piece = data.slice(e.buf_offset as usize..(e.buf_offset + e.len) as usize);
                    async move {
                        let _mark = sh
                            .mark_written(e.objectno)
                            .await
                            .map_err(|err| self.write_error(err))?;
                        sh.copy_up(e.objectno)
                            .await
                            .map_err(|err| self.write_error(err))?;
                        backend
                            .write(&sh.oid(e.objectno), e.offset, piece)
                            .await
                            .map_err(|err| self.write_error(err))
                    }
                }),
        )
        .await?;
        stage("write_objects", writing);
        Ok(())
    }

    /// Deallocate `[off, off+len)`; it reads back as zeros. Whole objects are
    /// removed, partial ranges zeroed (never by stat-then-decide: a
    /// concurrent write to the same object elsewhere must not be lost).
    pub async fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.check_range(off, len)?;
        let _guard = self.admit().await?;
        self.check_range(off, len)?;
        let sh = &self.shared;
        let os = sh.object_size();
        let backend = &sh.data();
        try_join_all(
            layout::object_extents(off, len, sh.order)
                .into_iter()
                .map(|e| async move {
                    let oid = sh.oid(e.objectno);
                    let whole = e.offset == 0 && e.len == os;
                    let map = sh.live_map();
                    // In a clone, an object that maps onto the parent stays (empty, or
                    // copied up and zeroed), or the parent's data would show again.
                    let r = if sh.maps_onto_parent(e.objectno) {
                        async {
                            let _mark = sh.mark_written(e.objectno).await?;
                            sh.copy_up(e.objectno).await?;
                            if whole {
                                backend.write_full(&oid, Bytes::new()).await
                            } else {
                                backend.zero(&oid, e.offset, e.len).await
                            }
                        }
                        .await
                    } else if whole {
                        // The map forgets the object only once it is gone (its invariant).
                        let marked = map.as_ref().is_some_and(|m| m.begin_remove(e.objectno));
                        let r = backend.remove(&oid).await;
                        if let (Some(m), true, Ok(()) | Err(BackendError::NotFound(_))) =
                            (&map, marked, &r)
                        {
                            // Failing to forget a removed object (say, on a full pool, where
                            // only what frees space runs) leaves a harmless extra mark.
                            if let Err(e) = m.removed(e.objectno).await {
                                tracing::debug!(image = %sh.name, error = %e, "object map kept a removed object");
                            }
                        }
                        r
                    } else {
                        sh.zero_in_place(e.objectno, e.offset, e.len).await
                    };
                    match r {
                        Ok(()) | Err(BackendError::NotFound(_)) => Ok(()),
                        Err(err) => Err(self.write_error(err)),
                    }
                }),
        )
        .await?;
        Ok(())
    }

    /// Make `[off, off+len)` read as zeros. Same as [`Image::discard`] here
    /// (holes read as zeros); kept apart for NBD's WRITE_ZEROES, which may
    /// later honour NO_HOLE by allocating.
    pub async fn write_zeroes(&self, off: u64, len: u64) -> Result<()> {
        self.discard(off, len).await
    }

    /// Every write acknowledged so far is durable once the backend acked it
    /// (there is no write-back cache), so flush only reports whether this
    /// image was fenced.
    pub async fn flush(&self) -> Result<()> {
        match self.failure() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Allocation map of `[off, off+len)`: holes are ranges no object backs.
    /// One `stat` per object; adjacent extents of the same state are merged.
    pub async fn block_status(&self, off: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_range(off, len)?;
        let sh = &self.shared;
        let exts = layout::object_extents(off, len, sh.order);
        // Owned object names: a future borrowing the extent would not be Send for every
        // lifetime, which callers holding it across awaits (the NBD server) need.
        let oids: Vec<(u64, String)> = exts
            .iter()
            .map(|e| (e.objectno, sh.oid(e.objectno)))
            .collect();
        let data = &sh.data();
        let sizes: Vec<Option<u64>> =
            futures::stream::iter(oids.into_iter().map(|(n, oid)| async move {
                match data.stat(&oid).await {
                    Ok(s) => Ok(Some(s)),
                    // A clone's unwritten object is data where it maps onto the parent
                    // (reported as such without asking the parent: allocation there is
                    // the parent's business).
                    Err(BackendError::NotFound(_)) => Ok(sh
                        .parent
                        .as_ref()
                        .map(|p| p.mapped(n, sh.object_size()))
                        .filter(|m| *m > 0)),
                    Err(err) => Err(RbdError::from(err)),
                }
            }))
            .buffered(OBJECT_CONCURRENCY)
            .try_collect()
            .await?;
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |offset: u64, len: u64, state: ExtentState| {
            if len == 0 {
                return;
            }
            match out.last_mut() {
                Some(l) if l.state == state && l.offset + l.len == offset => l.len += len,
                _ => out.push(Extent { offset, len, state }),
            }
        };
        for (e, size) in exts.iter().zip(sizes) {
            let start = off + e.buf_offset;
            // Bytes of this piece below the object's end are data, the rest hole.
            let data = size.map_or(0, |s| s.saturating_sub(e.offset).min(e.len));
            push(start, data, ExtentState::Data);
            push(start + data, e.len - data, ExtentState::Hole);
        }
        Ok(out)
    }

    /// Resize under the exclusive lock (so no other client writes meanwhile).
    /// Shrinking first lowers the size seen here (later writes past it fail),
    /// then removes/zeroes data past the end, then updates the header — a
    /// crash midway leaves a larger image whose tail reads as zeros, never
    /// stale data inside a smaller one.
    pub async fn resize(
        &self,
        new_size: u64,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<()> {
        // Shrinking to 0 stays allowed, as in Ceph: it frees every object.
        layout::check_max_size(new_size, self.shared.order).map_err(RbdError::InvalidArgument)?;
        let _guard = self.admit().await?;
        let sh = &self.shared;
        let old = self.size();
        let os = sh.object_size();
        if new_size < old {
            sh.size.store(new_size, Ordering::SeqCst);
            // A shrunk clone maps less onto its parent: growing it again must read zeros
            // there, not the parent's data (Ceph lowers the overlap the same way).
            if let Some(p) = sh
                .parent
                .as_ref()
                .filter(|p| p.overlap.load(Ordering::SeqCst) > new_size)
            {
                let spec = ParentSpec {
                    overlap: new_size,
                    ..p.spec.clone()
                };
                let mut kv = std::collections::BTreeMap::new();
                kv.insert(layering::PARENT_KEY.to_string(), layout::encode(&spec));
                sh.backend
                    .omap_set(&sh.header_oid, kv)
                    .await
                    .map_err(|e| self.write_error(e))?;
                p.overlap.store(new_size, Ordering::SeqCst);
            }
            let first_gone = layout::num_objects(new_size, sh.order);
            let last = layout::num_objects(old, sh.order);
            let data = sh.data();
            let gone = data_objects_in(data.as_ref(), &sh.prefix, first_gone, last)
                .await
                .map_err(|e| self.write_error(e))?;
            let total = gone.len() as u64 + u64::from(!new_size.is_multiple_of(os));
            let done = AtomicU64::new(0);
            let tick = || progress(done.fetch_add(1, Ordering::Relaxed) + 1, total);
            if !new_size.is_multiple_of(os) {
                match sh
                    .zero_in_place(new_size >> sh.order, new_size % os, os)
                    .await
                {
                    Ok(()) | Err(BackendError::NotFound(_)) => {}
                    Err(e) => return Err(self.write_error(e)),
                }
                tick();
            }
            futures::stream::iter(gone.into_iter().map(|n| {
                let oid = sh.oid(n);
                let data = &data;
                async move {
                    match data.remove(&oid).await {
                        Ok(()) | Err(BackendError::NotFound(_)) => Ok(()),
                        Err(e) => Err(self.write_error(e)),
                    }
                }
            }))
            .buffer_unordered(OBJECT_CONCURRENCY)
            .try_for_each(|()| async {
                tick();
                Ok(())
            })
            .await?;
        }
        // The map covers the new objects before the header makes them writable, and
        // forgets removed ones after (a crash in between leaves a longer map, whose tail
        // a load drops).
        if new_size > old {
            sh.resize_object_map(new_size)
                .await
                .map_err(|e| self.write_error(e))?;
        }
        let mut kv = std::collections::BTreeMap::new();
        kv.insert("size".to_string(), layout::u64_bytes(new_size));
        sh.backend
            .omap_set(&sh.header_oid, kv)
            .await
            .map_err(|e| self.write_error(e))?;
        sh.size.store(new_size, Ordering::SeqCst);
        if new_size < old {
            sh.resize_object_map(new_size)
                .await
                .map_err(|e| self.write_error(e))?;
        }
        if new_size >= old {
            progress(1, 1);
        }
        // Tell other open images; a silent one refreshes when it next takes the lock.
        if let Ok(payload) = postcard::to_allocvec(&NotifyMsg::HeaderUpdate) {
            let _ = sh
                .backend
                .notify(&sh.header_oid, payload.into(), Duration::from_secs(5))
                .await;
        }
        Ok(())
    }

    /// A clone's parent link (`None` for an image that is not a clone, or was flattened
    /// after this handle opened).
    pub fn parent(&self) -> Option<ParentSpec> {
        self.shared.parent.as_ref().map(|p| ParentSpec {
            overlap: p.overlap.load(Ordering::SeqCst),
            ..p.spec.clone()
        })
    }

    /// Copies every object of a clone that still reads from its parent up into the clone,
    /// then drops the link (the parent's record of this child too): the clone stands alone.
    pub async fn flatten(&self, progress: &(dyn Fn(u64, u64) + Send + Sync)) -> Result<()> {
        let sh = &self.shared;
        let Some(p) = &sh.parent else {
            return Err(RbdError::InvalidArgument(format!(
                "image {} is not a clone",
                sh.name
            )));
        };
        let _guard = self.admit().await?;
        let objects = layout::num_objects(p.overlap.load(Ordering::SeqCst), sh.order);
        let done = AtomicU64::new(0);
        futures::stream::iter(
            (0..objects)
                .map(|n| async move { sh.copy_up(n).await.map_err(|e| self.write_error(e)) }),
        )
        .buffer_unordered(OBJECT_CONCURRENCY)
        .try_for_each(|_| async {
            progress(done.fetch_add(1, Ordering::Relaxed) + 1, objects);
            Ok(())
        })
        .await?;
        sh.backend
            .omap_rm(&sh.header_oid, &[layering::PARENT_KEY.to_string()])
            .await
            .map_err(|e| self.write_error(e))?;
        // Every object is the child's own now, so the parent is never read again.
        p.overlap.store(0, Ordering::SeqCst);
        let pool = on_pool(&sh.backend, &p.spec.pool)?;
        let key = layering::child_key(p.spec.snap_id, &sh.backend.pool_name(), &sh.id);
        match pool
            .omap_rm(&layout::header_oid(&p.spec.image_id), &[key])
            .await
        {
            Ok(()) | Err(BackendError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        self.notify_header_update().await;
        Ok(())
    }

    /// What data objects are read through (the snapshot's view for an image opened at one).
    pub(crate) fn data_backend(&self) -> Arc<dyn ObjectBackend> {
        self.shared.data()
    }

    pub(crate) fn object_name(&self, objectno: u64) -> String {
        self.shared.oid(objectno)
    }

    /// Whether object `objectno` of this clone still maps onto its parent.
    pub(crate) fn maps_onto_parent(&self, objectno: u64) -> bool {
        self.shared.maps_onto_parent(objectno)
    }

    /// Which objects changed between snapshot `from` (`None`: nothing) and what this image
    /// reads (its snapshot or its head), from the object maps; `None` when they cannot say.
    pub(crate) async fn changed_objects(
        &self,
        from: Option<&SnapInfo>,
    ) -> Result<Option<Vec<bool>>> {
        let sh = &self.shared;
        if !object_map::usable(
            sh.features.load(Ordering::SeqCst),
            sh.flags.load(Ordering::SeqCst),
        ) {
            return Ok(None);
        }
        let snaps = sh.snapshots().await?;
        Ok(object_map::changed_between(
            sh.backend.as_ref(),
            &sh.id,
            sh.order,
            snaps,
            from,
            self.snapshot(),
            self.size(),
        )
        .await?)
    }

    /// The snapshot this image was opened at, if any.
    pub fn snapshot(&self) -> Option<&SnapInfo> {
        self.shared.snap.as_ref()
    }

    /// The image's snapshots, oldest first.
    pub async fn snapshots(&self) -> Result<Vec<SnapInfo>> {
        self.shared.snapshots().await
    }

    /// Takes snapshot `name` under the exclusive lock: a writer elsewhere first finishes its
    /// in-flight writes and hands the lock over, so the snapshot holds exactly the writes
    /// acknowledged before it; its next write takes the lock back with the new context.
    pub async fn snap_create(&self, name: &str) -> Result<SnapInfo> {
        snap::check_name(name).map_err(RbdError::InvalidArgument)?;
        let _guard = self.admit().await?;
        let sh = &self.shared;
        let mut infos = sh.snapshots().await?;
        if infos.iter().any(|s| s.name == name) {
            return Err(RbdError::Exists(format!("{}@{name}", sh.name)));
        }
        let id = sh
            .backend
            .snap_alloc()
            .await
            .map_err(|e| self.write_error(e))?;
        let info = SnapInfo {
            id,
            name: name.to_string(),
            size: self.size(),
            protected: false,
            created_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        };
        infos.push(info.clone());
        let mut kv = std::collections::BTreeMap::new();
        kv.insert(snap::snapshot_key(id), layout::encode(&info));
        self.write_snapshots(kv, &[], id, &infos).await?;
        // The snapshot exists now; without its map (or with the head not marked clean) the
        // maps stay conservative: du reads that snapshot's objects, the head counts more.
        if let Err(e) = sh.snapshot_object_map(id).await {
            tracing::warn!(image = %sh.name, snap = name, error = %e, "snapshot's object map not stored");
        }
        Ok(info)
    }

    /// Removes snapshot `name` (refused while protected); its preserved data is trimmed by
    /// the OSDs in the background.
    pub async fn snap_remove(&self, name: &str) -> Result<()> {
        let _guard = self.admit().await?;
        let sh = &self.shared;
        let mut infos = sh.snapshots().await?;
        let at = Shared::snap_named(&infos, &sh.name, name)?;
        if at.protected {
            return Err(RbdError::SnapshotProtected(format!("{}@{name}", sh.name)));
        }
        infos.retain(|s| s.id != at.id);
        let later = infos.iter().filter(|s| s.id > at.id).min_by_key(|s| s.id);
        sh.forget_snapshot_map(&at, later)
            .await
            .map_err(|e| self.write_error(e))?;
        let seq = sh.context_seq().await?;
        self.write_snapshots(
            Default::default(),
            &[snap::snapshot_key(at.id)],
            seq,
            &infos,
        )
        .await?;
        // After the header no longer names it: a crash in between leaks the id's clones
        // (never trimmed) rather than leaving a snapshot whose data is being trimmed.
        sh.backend
            .snap_release(at.id)
            .await
            .map_err(|e| self.write_error(e))
    }

    /// Sets or clears the protection of snapshot `name`.
    pub async fn snap_set_protected(&self, name: &str, protected: bool) -> Result<()> {
        let _guard = self.admit().await?;
        let sh = &self.shared;
        let mut at = Shared::snap_named(&sh.snapshots().await?, &sh.name, name)?;
        if !protected {
            let children =
                read_children(sh.backend.as_ref(), &sh.name, &sh.header_oid, at.id).await?;
            if !children.is_empty() {
                return Err(RbdError::SnapshotHasChildren(
                    format!("{}@{name}", sh.name),
                    children.len(),
                ));
            }
        }
        at.protected = protected;
        let mut kv = std::collections::BTreeMap::new();
        kv.insert(snap::snapshot_key(at.id), layout::encode(&at));
        sh.backend
            .omap_set(&sh.header_oid, kv)
            .await
            .map_err(|e| self.write_error(e))
    }

    /// Makes the image what it was at snapshot `name`: every object is rolled back on its
    /// OSD (the current data is first preserved for the image's snapshots), then the size.
    pub async fn snap_rollback(
        &self,
        name: &str,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<()> {
        let _guard = self.admit().await?;
        let sh = &self.shared;
        let at = Shared::snap_named(&sh.snapshots().await?, &sh.name, name)?;
        let rolled_back_map = sh
            .rollback_object_map(&at)
            .await
            .map_err(|e| self.write_error(e))?;
        let objects = layout::num_objects(self.size().max(at.size), sh.order);
        let data = sh.data();
        let done = AtomicU64::new(0);
        futures::stream::iter((0..objects).map(|n| {
            let (oid, data) = (sh.oid(n), &data);
            async move {
                match data.rollback(&oid, at.id).await {
                    Ok(()) | Err(BackendError::NotFound(_)) => Ok(()),
                    Err(e) => Err(self.write_error(e)),
                }
            }
        }))
        .buffer_unordered(OBJECT_CONCURRENCY)
        .try_for_each(|()| async {
            progress(done.fetch_add(1, Ordering::Relaxed) + 1, objects);
            Ok(())
        })
        .await?;
        let mut kv = std::collections::BTreeMap::new();
        kv.insert("size".to_string(), layout::u64_bytes(at.size));
        sh.backend
            .omap_set(&sh.header_oid, kv)
            .await
            .map_err(|e| self.write_error(e))?;
        sh.size.store(at.size, Ordering::SeqCst);
        if let Some(map) = rolled_back_map {
            sh.install_object_map(map)
                .await
                .map_err(|e| self.write_error(e))?;
        }
        self.notify_header_update().await;
        Ok(())
    }

    /// Writes snapshot records (`set`, `remove`) with the context for `infos`, takes the
    /// context here, and tells other open handles.
    async fn write_snapshots(
        &self,
        mut set: std::collections::BTreeMap<String, Bytes>,
        remove: &[String],
        seq: u64,
        infos: &[SnapInfo],
    ) -> Result<()> {
        let sh = &self.shared;
        let context = snap::context_of(seq, infos);
        set.insert(snap::SNAP_CONTEXT_KEY.to_string(), layout::encode(&context));
        if !remove.is_empty() {
            sh.backend
                .omap_rm(&sh.header_oid, remove)
                .await
                .map_err(|e| self.write_error(e))?;
        }
        sh.backend
            .omap_set(&sh.header_oid, set)
            .await
            .map_err(|e| self.write_error(e))?;
        sh.set_snap_context(context)?;
        self.notify_header_update().await;
        Ok(())
    }

    async fn notify_header_update(&self) {
        let sh = &self.shared;
        if let Ok(payload) = postcard::to_allocvec(&NotifyMsg::HeaderUpdate) {
            let _ = sh
                .backend
                .notify(&sh.header_oid, payload.into(), Duration::from_secs(5))
                .await;
        }
    }

    /// Recomputes the object maps of the head and every snapshot from the objects' snapshot
    /// records and clears the invalid flags (`rbd object-map rebuild`), under the exclusive
    /// lock so no write changes an object meanwhile.
    pub async fn rebuild_object_map(
        &self,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<()> {
        let _guard = self.admit().await?;
        let sh = &self.shared;
        if sh.features.load(Ordering::SeqCst) & object_map::FEATURE_OBJECT_MAP == 0 {
            return Err(RbdError::InvalidArgument(format!(
                "image {} keeps no object map; enable it with `basalt rbd feature enable \
                 POOL/{} object-map fast-diff`",
                sh.name, sh.name
            )));
        }
        let mut infos = sh.snapshots().await?;
        let points = scan::points(&mut infos, self.size());
        for p in &points {
            object_map::objects_for(p.size, sh.order)
                .map_err(|e| RbdError::InvalidArgument(e.to_string()))?;
        }
        let mut maps = scan(sh.backend.as_ref(), &sh.prefix, sh.order, &points, progress)
            .await
            .map_err(|e| self.write_error(e))?;
        let head = maps.pop().unwrap_or_default();
        for (info, map) in infos.iter().zip(maps) {
            sh.backend
                .write_full(&object_map::map_oid(&sh.id, Some(info.id)), map.encode())
                .await
                .map_err(|e| self.write_error(e))?;
        }
        sh.install_object_map(head)
            .await
            .map_err(|e| self.write_error(e))?;
        let flags = sh.flags.load(Ordering::SeqCst) & !object_map::INVALID_FLAGS;
        sh.set_header_u64("flags", flags, &sh.flags)
            .await
            .map_err(|e| self.write_error(e))
    }

    /// Turns the object map (with fast-diff: here the two go together) on — building the
    /// maps as [`Image::rebuild_object_map`] does — or off, removing them.
    pub async fn set_object_map(
        &self,
        enable: bool,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<()> {
        {
            let _guard = self.admit().await?;
            let sh = &self.shared;
            if enable {
                object_map::objects_for(self.size(), sh.order)
                    .map_err(|e| RbdError::InvalidArgument(e.to_string()))?;
            }
            let features = sh.features.load(Ordering::SeqCst);
            let features = if enable {
                features | object_map::FEATURES
            } else {
                features & !object_map::FEATURES
            };
            sh.set_header_u64("features", features, &sh.features)
                .await
                .map_err(|e| self.write_error(e))?;
            if !enable {
                sh.set_live_map(None);
                let mut oids = vec![object_map::map_oid(&sh.id, None)];
                oids.extend(
                    sh.snapshots()
                        .await?
                        .iter()
                        .map(|s| object_map::map_oid(&sh.id, Some(s.id))),
                );
                for oid in oids {
                    match sh.backend.remove(&oid).await {
                        Ok(()) | Err(BackendError::NotFound(_)) => {}
                        Err(e) => return Err(self.write_error(e)),
                    }
                }
                let flags = sh.flags.load(Ordering::SeqCst) & !object_map::INVALID_FLAGS;
                return sh
                    .set_header_u64("flags", flags, &sh.flags)
                    .await
                    .map_err(|e| self.write_error(e));
            }
        }
        self.rebuild_object_map(progress).await
    }

    /// Hand the exclusive lock back now if it is held (after the admitted writes finish),
    /// staying open, and wait until it is no longer held (at once if it is not held). For
    /// when the image's user went away (a gateway's last connection to it closed): the next
    /// writer elsewhere then locks on its first try instead of asking for the lock and
    /// waiting for this image to release it. A later write here takes the lock again.
    pub async fn relinquish_lock(&self) {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Cmd::Relinquish(Some(tx))).is_ok() {
            let _ = rx.await;
        }
    }

    /// [`Image::relinquish_lock`] without waiting (for synchronous contexts such as `Drop`).
    pub fn relinquish_lock_in_background(&self) {
        let _ = self.cmd.send(Cmd::Relinquish(None));
    }

    /// Release the lock (draining writes first) and unwatch; waits for it.
    pub async fn close(self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Cmd::Close(Some(tx))).is_ok() {
            let _ = rx.await;
        }
        Ok(())
    }

    /// Read one object's bytes in `[off, off+len)`; `None` if it does not exist.
    pub(crate) async fn read_object(
        &self,
        objectno: u64,
        off: u64,
        len: u64,
    ) -> Result<Option<Bytes>> {
        match self
            .shared
            .data()
            .read(&self.shared.oid(objectno), off, len)
            .await
        {
            Ok(b) => Ok(Some(b)),
            Err(BackendError::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = self.cmd.send(Cmd::Close(None));
    }
}

/// Records how long one stage of an image write took (`basalt_rbd_stage_seconds`).
fn stage(name: &'static str, since: std::time::Instant) {
    metrics::histogram!("basalt_rbd_stage_seconds", "stage" => name)
        .record(since.elapsed().as_secs_f64());
}

pub(crate) async fn read_id(backend: &dyn ObjectBackend, name: &str) -> Result<String> {
    layout::check_name(name).map_err(RbdError::InvalidArgument)?;
    let b = match backend.read(&layout::id_oid(name), 0, 1024).await {
        Ok(b) => b,
        Err(BackendError::NotFound(_)) => return Err(RbdError::NotFound(name.to_string())),
        Err(e) => return Err(e.into()),
    };
    String::from_utf8(b.to_vec())
        .ok()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| RbdError::Corrupt(name.to_string(), "id object is not a UTF-8 id".into()))
}

/// Every omap entry of an image's header.
async fn header_entries(
    backend: &dyn ObjectBackend,
    header_oid: &str,
) -> Result<Vec<(String, Bytes)>> {
    let mut entries = Vec::new();
    let mut after = String::new();
    loop {
        let (page, more) = backend.omap_list(header_oid, &after, 1024).await?;
        after = page.last().map(|(k, _)| k.clone()).unwrap_or_default();
        entries.extend(page);
        if !more || after.is_empty() {
            return Ok(entries);
        }
    }
}

/// An image's snapshots as its header lists them, oldest first.
pub(crate) async fn read_snapshots(
    backend: &dyn ObjectBackend,
    name: &str,
    header_oid: &str,
) -> Result<Vec<SnapInfo>> {
    let entries = header_entries(backend, header_oid).await?;
    snap::infos_in(&entries).map_err(|why| RbdError::Corrupt(name.to_string(), why))
}

/// The clones of an image's snapshot `snap_id`, as its header lists them.
pub(crate) async fn read_children(
    backend: &dyn ObjectBackend,
    name: &str,
    header_oid: &str,
    snap_id: u64,
) -> Result<Vec<layering::ChildRef>> {
    let entries = header_entries(backend, header_oid).await?;
    layering::children_in(&entries, snap_id).map_err(|why| RbdError::Corrupt(name.to_string(), why))
}

pub(crate) async fn read_header(
    backend: &dyn ObjectBackend,
    name: &str,
    header_oid: &str,
) -> Result<Header> {
    let keys: Vec<String> = layout::HEADER_KEYS.iter().map(|k| k.to_string()).collect();
    let m = match backend.omap_get(header_oid, &keys).await {
        Ok(m) => m,
        Err(BackendError::NotFound(_)) => {
            return Err(RbdError::Corrupt(
                name.to_string(),
                format!("{header_oid} is missing"),
            ))
        }
        Err(e) => return Err(e.into()),
    };
    Header::decode(&m).map_err(|why| RbdError::Corrupt(name.to_string(), why))
}

// ---------------------------------------------------------------------------
// The driver: runs the lock core against the backend.

enum Internal {
    Core(Event),
    Watch(u64, mpsc::Receiver<WatchEvent>),
    /// A HeaderUpdate was handled; ack it.
    Ack(u64, u64),
    /// `TryLock` succeeded, reading the header's size in the same request (`None`: the
    /// size was unreadable, so the refresh reads it again).
    Locked(Option<u64>),
}

struct Driver {
    shared: Arc<Shared>,
    opts: ImageOptions,
    core: LockCore,
    origin: Instant,
    /// Current header watch cookie.
    cookie: u64,
    watch_rx: Option<mpsc::Receiver<WatchEvent>>,
    waiters: HashMap<WriteId, oneshot::Sender<std::result::Result<(), Refusal>>>,
    /// notify id → the watch cookie it arrived on (acks must name it).
    notify_cookies: HashMap<u64, u64>,
    closers: Vec<oneshot::Sender<()>>,
    /// Waiting for a relinquish to finish: told once the lock is neither held nor being released.
    relinquishers: Vec<oneshot::Sender<()>>,
    /// When the current acquisition started (its first `TryLock`): the lock-wait a write sees.
    acquiring_since: Option<Instant>,
    /// The image size read by the request that took the lock; the refresh uses it.
    header_with_lock: Option<u64>,
    /// The current acquisition took the lock from another holder.
    acquiring_handover: bool,
    /// When the current release started (the lock stopped admitting writes) and why.
    releasing_since: Option<(Instant, &'static str)>,
}

impl Driver {
    async fn run(mut self, mut cmd_rx: mpsc::UnboundedReceiver<Cmd>) {
        let (int_tx, mut int_rx) = mpsc::unbounded_channel::<Internal>();
        let mut cmd_open = true;
        loop {
            let deadline = self.core.next_deadline().map(|d| self.origin + d);
            let ev = tokio::select! {
                cmd = cmd_rx.recv(), if cmd_open => match cmd {
                    Some(Cmd::Want(id, tx)) => {
                        self.waiters.insert(id, tx);
                        Event::WriteWanted(id)
                    }
                    Some(Cmd::Finished(id)) => {
                        self.waiters.remove(&id);
                        Event::WriteFinished(id)
                    }
                    Some(Cmd::Blocklisted(who)) => Event::Blocklisted(who),
                    Some(Cmd::Relinquish(tx)) => {
                        self.relinquishers.extend(tx);
                        Event::Relinquish
                    }
                    Some(Cmd::Close(tx)) => {
                        self.closers.extend(tx);
                        Event::Close
                    }
                    // Every handle and guard is gone.
                    None => {
                        cmd_open = false;
                        Event::Close
                    }
                },
                we = recv_watch(&mut self.watch_rx) => match we {
                    Some(WatchEvent::Notify(n)) => match postcard::from_bytes::<NotifyMsg>(&n.payload) {
                        Ok(NotifyMsg::RequestLock { client }) => {
                            tracing::debug!(image = %self.shared.name, from = %client, "lock requested");
                            self.notify_cookies.insert(n.notify_id, n.cookie);
                            Event::RequestLockNotified { notify_id: n.notify_id }
                        }
                        Ok(NotifyMsg::HeaderUpdate) => {
                            let sh = self.shared.clone();
                            let tx = int_tx.clone();
                            tokio::spawn(async move {
                                let _ = sh.refresh_size().await;
                                let _ = tx.send(Internal::Ack(n.notify_id, n.cookie));
                            });
                            continue;
                        }
                        Err(_) => {
                            // Unknown message (a newer peer?): answer so it doesn't wait.
                            self.ack(n.notify_id, n.cookie, &int_tx);
                            continue;
                        }
                    },
                    Some(WatchEvent::Disconnected) | None => {
                        self.watch_rx = None;
                        Event::WatchLost
                    }
                },
                Some(int) = int_rx.recv() => match int {
                    Internal::Core(ev) => ev,
                    Internal::Watch(cookie, rx) => {
                        self.cookie = cookie;
                        self.watch_rx = Some(rx);
                        Event::WatchRestored { cookie }
                    }
                    Internal::Ack(notify_id, cookie) => {
                        self.ack(notify_id, cookie, &int_tx);
                        continue;
                    }
                    Internal::Locked(size) => {
                        self.header_with_lock = size;
                        Event::LockAcquired
                    }
                },
                _ = sleep_until(deadline) => Event::Tick,
            };
            let now = self.origin.elapsed();
            let was_locked = self.core.is_locked();
            let cause = release_cause(&ev);
            let unlocked = ev == Event::Unlocked;
            let actions = self.core.handle(now, ev);
            self.time_release(was_locked, cause, unlocked);
            if !self.core.is_locked() && !self.core.is_releasing() {
                for tx in self.relinquishers.drain(..) {
                    let _ = tx.send(());
                }
            }
            let mut closed = false;
            for a in actions {
                closed |= self.perform(a, &int_tx);
            }
            if self.core.is_failed() && !self.core.is_closed() {
                let mut f = self
                    .shared
                    .failure
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if f.is_none() {
                    *f = Some(RbdError::Blocklisted(self.shared.backend.client_id()));
                }
            }
            if closed {
                break;
            }
        }
        // Best effort: a blocklisted client cannot unwatch, and the OSD drops
        // the watch anyway when it times out.
        if self.watch_rx.is_some() {
            let _ = self
                .shared
                .backend
                .unwatch(&self.shared.header_oid, self.cookie)
                .await;
        }
        for tx in self.closers.drain(..) {
            let _ = tx.send(());
        }
    }

    /// Times a release from the event that made the lock stop admitting writes to the
    /// unlock's reply (`basalt_rbd_lock_release_seconds`, and a log line the hand-over
    /// benchmark reads).
    fn time_release(&mut self, was_locked: bool, cause: &'static str, unlocked: bool) {
        if was_locked && !self.core.is_locked() {
            self.releasing_since = Some((Instant::now(), cause));
        }
        if unlocked {
            if let Some((since, cause)) = self.releasing_since.take() {
                let took = since.elapsed();
                metrics::histogram!("basalt_rbd_lock_release_seconds", "cause" => cause)
                    .record(took.as_secs_f64());
                tracing::info!(image = %self.shared.name, cause, elapsed_us = took.as_micros() as u64,
                    "released the exclusive lock");
            }
        }
    }

    fn ack(&mut self, notify_id: u64, cookie: u64, int_tx: &mpsc::UnboundedSender<Internal>) {
        let sh = self.shared.clone();
        let tx = int_tx.clone();
        tokio::spawn(async move {
            let r = sh
                .backend
                .notify_ack(&sh.header_oid, notify_id, cookie, Bytes::new())
                .await;
            if let Err(BackendError::Blocklisted(who)) = r {
                let _ = tx.send(Internal::Core(Event::Blocklisted(who)));
            }
        });
    }

    /// Perform one action; true once the core has closed.
    fn perform(&mut self, a: Action, int_tx: &mpsc::UnboundedSender<Internal>) -> bool {
        let sh = self.shared.clone();
        let tx = int_tx.clone();
        let opts = self.opts.clone();
        let me = sh.backend.client_id();
        // Run `f` in a task and feed its result back to the core.
        let spawn = |f: futures::future::BoxFuture<'static, Event>| {
            let tx = tx.clone();
            tokio::spawn(async move {
                let ev = f.await;
                let _ = tx.send(Internal::Core(ev));
            });
        };
        let failed = |e: BackendError| Event::OpFailed(e);
        match a {
            Action::AdmitWrite(id) => {
                if let Some(since) = self.acquiring_since.take() {
                    let took = since.elapsed();
                    let handover = std::mem::take(&mut self.acquiring_handover);
                    metrics::histogram!("basalt_rbd_lock_acquire_seconds")
                        .record(took.as_secs_f64());
                    tracing::info!(image = %sh.name, handover, elapsed_us = took.as_micros() as u64,
                        "acquired the exclusive lock");
                }
                if let Some(w) = self.waiters.remove(&id) {
                    if w.send(Ok(())).is_err() {
                        // The caller gave up meanwhile; its guard already sent Finished.
                    }
                }
            }
            Action::FailWrite(id, r) => {
                self.acquiring_since = None;
                self.acquiring_handover = false;
                if let Some(w) = self.waiters.remove(&id) {
                    let _ = w.send(Err(r));
                }
            }
            Action::TryLock { cookie } => {
                self.acquiring_since.get_or_insert_with(Instant::now);
                self.header_with_lock = None;
                // Lock and read the header's size in one request, so the refresh that
                // follows an acquisition costs no second round trip.
                tokio::spawn(async move {
                    let b = &sh.backend;
                    let msg = match b
                        .lock_exclusive_then_omap_get(
                            &sh.header_oid,
                            layout::LOCK_NAME,
                            &cookie,
                            "basalt-rbd auto",
                            &Shared::refresh_keys(),
                        )
                        .await
                    {
                        // The snap context is taken here, before the refresh admits a write.
                        Ok(header) => Internal::Locked(sh.apply_header(&header).ok()),
                        Err(BackendError::Busy(_)) => Internal::Core(
                            match b.lock_info(&sh.header_oid, layout::LOCK_NAME).await {
                                Ok(l) => Event::LockBusy {
                                    holder: l.into_iter().next().map(|l| LockOwner {
                                        client: l.client,
                                        cookie: l.cookie,
                                    }),
                                },
                                Err(e) => failed(e),
                            },
                        ),
                        Err(e) => Internal::Core(failed(e)),
                    };
                    let _ = tx.send(msg);
                });
            }
            Action::NotifyRequestLock { holder } => spawn(Box::pin(async move {
                tracing::info!(image = %sh.name, holder = %holder.client, "asking the lock holder to release");
                let payload = match postcard::to_allocvec(&NotifyMsg::RequestLock { client: me }) {
                    Ok(p) => p,
                    Err(e) => return failed(BackendError::Io(e.to_string())),
                };
                match sh
                    .backend
                    .notify(&sh.header_oid, payload.into(), opts.notify_timeout)
                    .await
                {
                    Ok(r) => Event::NotifyDone {
                        acked: r
                            .acks
                            .into_iter()
                            .map(|a| Watcher {
                                client: a.client,
                                cookie: a.cookie,
                            })
                            .collect(),
                        timed_out: r.timed_out,
                    },
                    Err(e) => failed(e),
                }
            })),
            Action::ListWatchers => spawn(Box::pin(async move {
                match sh.backend.list_watchers(&sh.header_oid).await {
                    Ok(w) => Event::Watchers(w),
                    Err(e) => failed(e),
                }
            })),
            Action::GetLocker => spawn(Box::pin(async move {
                match sh
                    .backend
                    .lock_info(&sh.header_oid, layout::LOCK_NAME)
                    .await
                {
                    Ok(l) => Event::LockInfo(l.into_iter().next().map(|l| LockOwner {
                        client: l.client,
                        cookie: l.cookie,
                    })),
                    Err(e) => failed(e),
                }
            })),
            Action::Blocklist { client } => spawn(Box::pin(async move {
                tracing::warn!(image = %sh.name, %client, "lock holder is gone: blocklisting it");
                metrics::counter!("basalt_rbd_blocklists_total").increment(1);
                match sh
                    .backend
                    .blocklist_add(&client, opts.blocklist_expire)
                    .await
                {
                    Ok(()) => Event::BlocklistDone,
                    Err(e) => failed(e),
                }
            })),
            Action::BreakLock { owner } => spawn(Box::pin(async move {
                match sh
                    .backend
                    .break_lock(
                        &sh.header_oid,
                        layout::LOCK_NAME,
                        &owner.client,
                        &owner.cookie,
                    )
                    .await
                {
                    Ok(()) => Event::BreakDone,
                    Err(e) => failed(e),
                }
            })),
            Action::Refresh => {
                // The header as the lock found it (nothing newer can exist), else read again.
                let header_with_lock = self.header_with_lock.take();
                spawn(Box::pin(async move {
                    let refreshed = match header_with_lock {
                        Some(size) => {
                            sh.size.store(size, Ordering::SeqCst);
                            Ok(size)
                        }
                        None => sh.refresh_size().await,
                    };
                    // No read cache to drop yet; the object map may have changed.
                    match refreshed.and(sh.load_object_map().await) {
                        Ok(()) => Event::Refreshed,
                        Err(e) => failed(e),
                    }
                }))
            }
            // Writes are durable when the backend acks them: nothing buffered.
            Action::Flush => {
                let _ = int_tx.send(Internal::Core(Event::Flushed));
            }
            Action::Unlock { cookie } => spawn(Box::pin(async move {
                match sh
                    .backend
                    .unlock(&sh.header_oid, layout::LOCK_NAME, &cookie)
                    .await
                {
                    Ok(()) => Event::Unlocked,
                    Err(e) => failed(e),
                }
            })),
            Action::AckNotify { notify_id } => {
                let cookie = self
                    .notify_cookies
                    .remove(&notify_id)
                    .unwrap_or(self.cookie);
                self.ack(notify_id, cookie, int_tx);
            }
            Action::Rewatch => {
                tokio::spawn(async move {
                    let msg = match sh.backend.watch(&sh.header_oid).await {
                        Ok((cookie, rx)) => Internal::Watch(cookie, rx),
                        Err(e) => Internal::Core(Event::RewatchFailed(e)),
                    };
                    let _ = tx.send(msg);
                });
            }
            Action::RecordHandover => {
                self.acquiring_handover = true;
                tracing::info!(image = %sh.name, "took over the exclusive lock");
                sh.handovers.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("basalt_rbd_lock_handovers_total").increment(1);
            }
            Action::Closed => return true,
        }
        false
    }
}

/// Why a release that `ev` starts is happening (a label of the release histogram).
fn release_cause(ev: &Event) -> &'static str {
    match ev {
        Event::RequestLockNotified { .. } => "requested",
        Event::Relinquish => "relinquished",
        Event::Close => "close",
        Event::WatchLost => "watch_lost",
        _ => "other",
    }
}

async fn recv_watch(rx: &mut Option<mpsc::Receiver<WatchEvent>>) -> Option<WatchEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
