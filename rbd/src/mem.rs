//! An in-memory "cluster" implementing [`ObjectBackend`] for tests — here and
//! in the gateway's tests.
//!
//! [`MemCluster`] holds the objects, locks, watches, pending notifies and the
//! blocklist; [`MemCluster::client`] hands out a [`MemBackend`] per client,
//! each with a distinct client id. It simulates what the exclusive-lock
//! protocol depends on:
//!
//! - **Locks** (cls_lock exclusive): `Busy` if another (client, cookie) holds
//!   it; `break_lock` removes a named holder.
//! - **Watches and notify**: a notify is delivered to every watch of the
//!   object and completes when all of them acked or the timeout passed; the
//!   silent ones are reported as timed out.
//! - **Frozen clients** ([`MemCluster::freeze`]) model a hung or partitioned
//!   host: their operations wait (they are "in the network") until
//!   [`MemCluster::unfreeze`], then execute — against the blocklist as it is
//!   *then*, which is exactly the fence a real OSD applies. Notifies are not
//!   delivered to them. Their watches time out `watch_timeout` after the
//!   freeze (or at once with [`MemCluster::time_out_watches`]); the
//!   `Disconnected` event reaches them when they thaw.
//! - **Blocklist**: every op from a blocklisted client fails with
//!   `Blocklisted`; blocklisting also drops the client's watches.
//!
//! - **Snapshots**: ids from a cluster-wide counter; a write under a snap
//!   context newer than the object's last one first keeps a whole copy of the
//!   object for those snapshots (the OSD copies only touched 64 KiB chunks; a
//!   test double needs only the semantics). Released ids are not trimmed.
//!
//! Checks are evaluated in the same critical section as the operation, so an
//! op can never slip in after `blocklist_add` returned.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use crate::backend::{
    BackendError, CloneSummary, Locker, NotifyAck, NotifyEvent, NotifyResult, ObjectBackend,
    SnapContext, SnapListing, WatchEvent, Watcher,
};

/// The name of a [`MemCluster`]'s one pool.
pub const MEM_POOL: &str = "mem";

/// Capacity of each watch's event channel.
const WATCH_CHANNEL: usize = 256;

#[derive(Default)]
struct MemObject {
    data: Vec<u8>,
    omap: BTreeMap<String, Bytes>,
    /// lock name → holder (exclusive locks only).
    locks: BTreeMap<String, Locker>,
}

/// What snapshots keep of one object: the snap context `seq` of its last write, and its
/// clones oldest first, each `(id, covers_from, data)`.
#[derive(Default)]
struct MemSnaps {
    seq: u64,
    clones: Vec<(u64, u64, Vec<u8>)>,
}

struct WatchEntry {
    client: String,
    cookie: u64,
    tx: mpsc::Sender<WatchEvent>,
}

struct ClientState {
    frozen: watch::Sender<bool>,
    frozen_since: Option<Instant>,
    /// Watches lost while frozen: told `Disconnected` when the client thaws.
    deferred_disconnects: Vec<mpsc::Sender<WatchEvent>>,
    /// Notifies not delivered to this client's watches because it was frozen.
    missed_notifies: u64,
}

struct PendingNotify {
    oid: String,
    waiting: BTreeSet<(String, u64)>,
    acks: Vec<NotifyAck>,
    done: Option<oneshot::Sender<()>>,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<String, MemObject>,
    watches: BTreeMap<String, Vec<WatchEntry>>,
    clients: HashMap<String, ClientState>,
    blocklist: HashMap<String, Instant>,
    notifies: HashMap<u64, PendingNotify>,
    /// Remove ops received (found or not), so tests can check what a removal costs.
    removes: u64,
    snaps: BTreeMap<String, MemSnaps>,
    snap_seq: u64,
    next_cookie: u64,
    next_notify: u64,
}

struct Shared {
    state: Mutex<State>,
    watch_timeout: Duration,
    next_client: AtomicU64,
}

/// A shared in-memory cluster (one pool). Cheap to clone.
#[derive(Clone)]
pub struct MemCluster {
    shared: Arc<Shared>,
}

impl Default for MemCluster {
    fn default() -> Self {
        Self::new()
    }
}

impl MemCluster {
    /// A cluster whose watches time out 30 s after their client freezes
    /// (Ceph's `osd_client_watch_timeout`).
    pub fn new() -> Self {
        Self::with_watch_timeout(Duration::from_secs(30))
    }

    pub fn with_watch_timeout(watch_timeout: Duration) -> Self {
        MemCluster {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                watch_timeout,
                next_client: AtomicU64::new(4100),
            }),
        }
    }

    /// A new client of this cluster with a fresh, distinct client id.
    pub fn client(&self) -> Arc<MemBackend> {
        let n = self.shared.next_client.fetch_add(1, Ordering::Relaxed);
        let id = format!("client.{n}.{:04x}", rand::random::<u16>());
        let (frozen, _) = watch::channel(false);
        self.state().clients.insert(
            id.clone(),
            ClientState {
                frozen,
                frozen_since: None,
                deferred_disconnects: Vec::new(),
                missed_notifies: 0,
            },
        );
        Arc::new(MemBackend {
            shared: self.shared.clone(),
            id,
            snapc: SnapContext::default(),
            read_snap: 0,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock_state(&self.shared)
    }

    /// Make `client` unreachable: its ops wait, it receives no notifies, and
    /// its watches time out after the cluster's watch timeout.
    pub fn freeze(&self, client: &str) {
        let mut st = self.state();
        if let Some(c) = st.clients.get_mut(client) {
            c.frozen.send_replace(true);
            c.frozen_since.get_or_insert_with(Instant::now);
        }
    }

    /// Reconnect `client`: its waiting ops execute (and fail if it has been
    /// blocklisted meanwhile); watches it lost get `Disconnected`.
    pub fn unfreeze(&self, client: &str) {
        let mut st = self.state();
        st.reap(self.shared.watch_timeout);
        if let Some(c) = st.clients.get_mut(client) {
            c.frozen_since = None;
            for tx in c.deferred_disconnects.drain(..) {
                let _ = tx.try_send(WatchEvent::Disconnected);
            }
            c.frozen.send_replace(false);
        }
    }

    /// Time out every watch of `client` now, as the OSD does when a client
    /// stops pinging for `osd_client_watch_timeout`.
    pub fn time_out_watches(&self, client: &str) {
        let mut st = self.state();
        let frozen = st.is_frozen(client);
        let mut lost = Vec::new();
        for list in st.watches.values_mut() {
            list.retain(|w| {
                if w.client == client {
                    lost.push(w.tx.clone());
                    false
                } else {
                    true
                }
            });
        }
        st.disconnect(client, frozen, lost);
    }

    pub fn is_blocklisted(&self, client: &str) -> bool {
        self.state().blocklisted(client)
    }

    /// How many notifies `client` missed while frozen (a test waits on this to know that
    /// someone asked the frozen client and got no answer).
    pub fn missed_notifies(&self, client: &str) -> u64 {
        self.state()
            .clients
            .get(client)
            .map_or(0, |c| c.missed_notifies)
    }

    /// Remove ops the cluster has received so far (found or not).
    pub fn remove_ops(&self) -> u64 {
        self.state().removes
    }

    /// Names of existing objects starting with `prefix`, sorted.
    pub fn object_names(&self, prefix: &str) -> Vec<String> {
        self.state()
            .objects
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// An object's data bytes, if it exists.
    pub fn object_data(&self, oid: &str) -> Option<Vec<u8>> {
        self.state().objects.get(oid).map(|o| o.data.clone())
    }

    /// The current watchers of `oid` (after timing out frozen clients' watches).
    pub fn watchers(&self, oid: &str) -> Vec<Watcher> {
        let mut st = self.state();
        st.reap(self.shared.watch_timeout);
        st.watchers(oid)
    }
}

fn lock_state(shared: &Shared) -> MutexGuard<'_, State> {
    // A panic while holding the lock only happens in a failing test; keep going.
    shared.state.lock().unwrap_or_else(|e| e.into_inner())
}

impl State {
    fn blocklisted(&self, client: &str) -> bool {
        self.blocklist
            .get(client)
            .is_some_and(|until| *until > Instant::now())
    }

    fn check(&self, client: &str) -> Result<(), BackendError> {
        if self.blocklisted(client) {
            Err(BackendError::Blocklisted(client.to_string()))
        } else {
            Ok(())
        }
    }

    fn is_frozen(&self, client: &str) -> bool {
        self.clients
            .get(client)
            .is_some_and(|c| c.frozen_since.is_some())
    }

    /// Drop the watches of clients frozen for longer than the watch timeout.
    fn reap(&mut self, watch_timeout: Duration) {
        let now = Instant::now();
        let expired: BTreeSet<String> = self
            .clients
            .iter()
            .filter(|(_, c)| {
                c.frozen_since
                    .is_some_and(|t| now.duration_since(t) >= watch_timeout)
            })
            .map(|(id, _)| id.clone())
            .collect();
        if expired.is_empty() {
            return;
        }
        let mut lost: Vec<(String, mpsc::Sender<WatchEvent>)> = Vec::new();
        for list in self.watches.values_mut() {
            list.retain(|w| {
                if expired.contains(&w.client) {
                    lost.push((w.client.clone(), w.tx.clone()));
                    false
                } else {
                    true
                }
            });
        }
        for (client, tx) in lost {
            self.disconnect(&client, true, vec![tx]);
        }
    }

    /// Tell a client its watches are gone — later, if it cannot hear it now.
    fn disconnect(&mut self, client: &str, frozen: bool, lost: Vec<mpsc::Sender<WatchEvent>>) {
        if frozen {
            if let Some(c) = self.clients.get_mut(client) {
                c.deferred_disconnects.extend(lost);
            }
        } else {
            for tx in lost {
                let _ = tx.try_send(WatchEvent::Disconnected);
            }
        }
    }

    fn watchers(&self, oid: &str) -> Vec<Watcher> {
        self.watches
            .get(oid)
            .map(|l| {
                l.iter()
                    .map(|w| Watcher {
                        client: w.client.clone(),
                        cookie: w.cookie,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn obj(&self, oid: &str) -> Result<&MemObject, BackendError> {
        self.objects
            .get(oid)
            .ok_or_else(|| BackendError::NotFound(oid.to_string()))
    }

    fn obj_mut(&mut self, oid: &str) -> Result<&mut MemObject, BackendError> {
        self.objects
            .get_mut(oid)
            .ok_or_else(|| BackendError::NotFound(oid.to_string()))
    }

    /// Before a write under `snapc`: keeps the object for the snapshots taken since its last
    /// write.
    fn preserve(&mut self, oid: &str, snapc: &SnapContext) {
        let current = self.objects.get(oid).map(|o| o.data.clone());
        let e = self.snaps.entry(oid.to_string()).or_default();
        if let (Some(&newest), Some(data)) = (snapc.snaps.iter().find(|&&s| s > e.seq), current) {
            e.clones.push((newest, e.seq + 1, data));
        }
        e.seq = e.seq.max(snapc.seq);
    }

    /// `oid`'s bytes at snapshot `snap` (0: the head).
    fn data_at(&self, oid: &str, snap: u64) -> Result<&[u8], BackendError> {
        let absent = || BackendError::NotFound(format!("{oid} at snapshot {snap}"));
        if snap == 0 {
            return Ok(&self.obj(oid)?.data);
        }
        let e = self.snaps.get(oid);
        match e.and_then(|e| e.clones.iter().find(|c| c.0 >= snap)) {
            Some((_, from, data)) if snap >= *from => Ok(data),
            Some(_) => Err(absent()),
            None if snap > e.map_or(0, |e| e.seq) => {
                self.obj(oid).map(|o| &o.data[..]).map_err(|_| absent())
            }
            None => Err(absent()),
        }
    }
}

/// One client's view of a [`MemCluster`].
pub struct MemBackend {
    shared: Arc<Shared>,
    id: String,
    snapc: SnapContext,
    /// Reads are of this snapshot (0: the head); writes are refused.
    read_snap: u64,
}

impl MemBackend {
    /// Wait while this client is frozen (its request is "in the network").
    async fn gate(&self) {
        let rx = lock_state(&self.shared)
            .clients
            .get(&self.id)
            .map(|c| c.frozen.subscribe());
        if let Some(mut rx) = rx {
            let _ = rx.wait_for(|frozen| !*frozen).await;
        }
    }

    /// Wait out a freeze, then lock the cluster state and refuse a blocklisted client.
    async fn enter(&self) -> Result<MutexGuard<'_, State>, BackendError> {
        self.gate().await;
        let st = lock_state(&self.shared);
        st.check(&self.id)?;
        Ok(st)
    }

    /// [`MemBackend::enter`] for a write to `oid`: refused on a snapshot; the object is first
    /// preserved for the snapshots its last write did not know of.
    async fn enter_write(&self, oid: &str) -> Result<MutexGuard<'_, State>, BackendError> {
        if self.read_snap != 0 {
            return Err(BackendError::InvalidArgument(format!(
                "{oid}: snapshot {} is read-only",
                self.read_snap
            )));
        }
        let mut st = self.enter().await?;
        st.preserve(oid, &self.snapc);
        Ok(st)
    }

    fn derived(&self, snapc: SnapContext, read_snap: u64) -> Arc<dyn ObjectBackend> {
        Arc::new(MemBackend {
            shared: self.shared.clone(),
            id: self.id.clone(),
            snapc,
            read_snap,
        })
    }
}

fn usize_of(v: u64) -> Result<usize, BackendError> {
    usize::try_from(v).map_err(|_| BackendError::InvalidArgument(format!("{v} too large")))
}

/// Objects above this size are refused, like an OSD's `osd_max_object_size`.
const MAX_OBJECT: u64 = 128 << 20;

#[async_trait]
impl ObjectBackend for MemBackend {
    fn client_id(&self) -> String {
        self.id.clone()
    }

    fn with_snap_context(
        &self,
        snapc: SnapContext,
    ) -> Result<Arc<dyn ObjectBackend>, BackendError> {
        snapc
            .validate()
            .map_err(|e| BackendError::InvalidArgument(e.to_string()))?;
        Ok(self.derived(snapc, self.read_snap))
    }

    fn at_snap(&self, snap: u64) -> Arc<dyn ObjectBackend> {
        self.derived(self.snapc.clone(), snap)
    }

    fn pool_name(&self) -> String {
        MEM_POOL.to_string()
    }

    fn other_pool(&self, pool: &str) -> Result<Arc<dyn ObjectBackend>, BackendError> {
        if pool == MEM_POOL {
            return Ok(self.derived(self.snapc.clone(), self.read_snap));
        }
        Err(BackendError::NotFound(format!(
            "pool {pool}: a MemCluster has one pool, {MEM_POOL}"
        )))
    }

    async fn copyup(&self, oid: &str, data: Bytes) -> Result<bool, BackendError> {
        if data.len() as u64 > MAX_OBJECT {
            return Err(BackendError::InvalidArgument(format!("{oid}: too large")));
        }
        let mut st = self.enter_write(oid).await?;
        if st.objects.contains_key(oid) {
            return Ok(false);
        }
        st.objects.entry(oid.to_string()).or_default().data = data.to_vec();
        Ok(true)
    }

    async fn list_snaps(&self, oid: &str) -> Result<SnapListing, BackendError> {
        let st = self.enter().await?;
        let head = st.objects.get(oid);
        let snaps = st.snaps.get(oid);
        if head.is_none() && snaps.is_none_or(|s| s.clones.is_empty()) {
            return Err(BackendError::NotFound(oid.to_string()));
        }
        // Whole copies: each clone may differ from the next version anywhere.
        Ok(SnapListing {
            seq: snaps.map_or(0, |s| s.seq),
            head_exists: head.is_some(),
            clones: snaps
                .map(|s| {
                    s.clones
                        .iter()
                        .map(|(id, from, data)| CloneSummary {
                            id: *id,
                            covers_from: *from,
                            snaps: vec![*id],
                            size: data.len() as u64,
                            differs: vec![(0, data.len() as u64)],
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    async fn snap_alloc(&self) -> Result<u64, BackendError> {
        let mut st = self.enter().await?;
        st.snap_seq += 1;
        Ok(st.snap_seq)
    }

    async fn snap_release(&self, snap: u64) -> Result<(), BackendError> {
        let st = self.enter().await?;
        if snap == 0 || snap > st.snap_seq {
            return Err(BackendError::InvalidArgument(format!(
                "snapshot id {snap} was never allocated"
            )));
        }
        Ok(())
    }

    async fn rollback(&self, oid: &str, snap: u64) -> Result<(), BackendError> {
        let mut st = self.enter_write(oid).await?;
        match st.data_at(oid, snap).map(<[u8]>::to_vec) {
            Ok(data) => st.objects.entry(oid.to_string()).or_default().data = data,
            Err(_) => {
                st.objects.remove(oid);
            }
        }
        Ok(())
    }

    async fn read(&self, oid: &str, off: u64, len: u64) -> Result<Bytes, BackendError> {
        let st = self.enter().await?;
        let data = st.data_at(oid, self.read_snap)?;
        let size = data.len() as u64;
        let start = off.min(size);
        let end = off.saturating_add(len).min(size);
        Ok(Bytes::copy_from_slice(
            &data[usize_of(start)?..usize_of(end)?],
        ))
    }

    async fn write(&self, oid: &str, off: u64, data: Bytes) -> Result<(), BackendError> {
        let end = off
            .checked_add(data.len() as u64)
            .filter(|e| *e <= MAX_OBJECT)
            .ok_or_else(|| BackendError::InvalidArgument(format!("{oid}: write past max size")))?;
        let mut st = self.enter_write(oid).await?;
        let o = st.objects.entry(oid.to_string()).or_default();
        if o.data.len() < usize_of(end)? {
            o.data.resize(usize_of(end)?, 0);
        }
        o.data[usize_of(off)?..usize_of(end)?].copy_from_slice(&data);
        Ok(())
    }

    async fn write_full(&self, oid: &str, data: Bytes) -> Result<(), BackendError> {
        if data.len() as u64 > MAX_OBJECT {
            return Err(BackendError::InvalidArgument(format!("{oid}: too large")));
        }
        let mut st = self.enter_write(oid).await?;
        st.objects.entry(oid.to_string()).or_default().data = data.to_vec();
        Ok(())
    }

    async fn zero(&self, oid: &str, off: u64, len: u64) -> Result<(), BackendError> {
        let mut st = self.enter_write(oid).await?;
        let o = st.obj_mut(oid)?;
        let size = o.data.len() as u64;
        let start = off.min(size);
        let end = off.saturating_add(len).min(size);
        o.data[usize_of(start)?..usize_of(end)?].fill(0);
        Ok(())
    }

    async fn truncate(&self, oid: &str, size: u64) -> Result<(), BackendError> {
        if size > MAX_OBJECT {
            return Err(BackendError::InvalidArgument(format!("{oid}: too large")));
        }
        let mut st = self.enter_write(oid).await?;
        let o = st.objects.entry(oid.to_string()).or_default();
        o.data.resize(usize_of(size)?, 0);
        Ok(())
    }

    async fn remove(&self, oid: &str) -> Result<(), BackendError> {
        let mut st = self.enter_write(oid).await?;
        st.removes += 1;
        st.objects
            .remove(oid)
            .map(|_| ())
            .ok_or_else(|| BackendError::NotFound(oid.to_string()))
    }

    async fn stat(&self, oid: &str) -> Result<u64, BackendError> {
        let st = self.enter().await?;
        Ok(st.data_at(oid, self.read_snap)?.len() as u64)
    }

    async fn list_prefix(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        let st = self.enter().await?;
        Ok(st
            .objects
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect())
    }

    async fn create(&self, oid: &str, exclusive: bool) -> Result<(), BackendError> {
        let mut st = self.enter().await?;
        if st.objects.contains_key(oid) {
            if exclusive {
                return Err(BackendError::Exists(oid.to_string()));
            }
            return Ok(());
        }
        st.objects.insert(oid.to_string(), MemObject::default());
        Ok(())
    }

    async fn omap_get(
        &self,
        oid: &str,
        keys: &[String],
    ) -> Result<BTreeMap<String, Bytes>, BackendError> {
        let st = self.enter().await?;
        let o = st.obj(oid)?;
        Ok(keys
            .iter()
            .filter_map(|k| o.omap.get(k).map(|v| (k.clone(), v.clone())))
            .collect())
    }

    async fn omap_list(
        &self,
        oid: &str,
        start_after: &str,
        max: usize,
    ) -> Result<(Vec<(String, Bytes)>, bool), BackendError> {
        let st = self.enter().await?;
        let o = st.obj(oid)?;
        let mut it = o
            .omap
            .range::<str, _>((
                std::ops::Bound::Excluded(start_after),
                std::ops::Bound::Unbounded,
            ))
            .map(|(k, v)| (k.clone(), v.clone()));
        let page: Vec<_> = it.by_ref().take(max).collect();
        let more = it.next().is_some();
        Ok((page, more))
    }

    async fn omap_set(&self, oid: &str, kv: BTreeMap<String, Bytes>) -> Result<(), BackendError> {
        let mut st = self.enter().await?;
        st.objects
            .entry(oid.to_string())
            .or_default()
            .omap
            .extend(kv);
        Ok(())
    }

    async fn omap_rm(&self, oid: &str, keys: &[String]) -> Result<(), BackendError> {
        let mut st = self.enter().await?;
        let o = st.obj_mut(oid)?;
        for k in keys {
            o.omap.remove(k);
        }
        Ok(())
    }

    async fn lock_exclusive(
        &self,
        oid: &str,
        name: &str,
        cookie: &str,
        description: &str,
    ) -> Result<(), BackendError> {
        let mut st = self.enter().await?;
        let o = st.objects.entry(oid.to_string()).or_default();
        match o.locks.get(name) {
            Some(l) if l.client == self.id && l.cookie == cookie => Ok(()),
            Some(l) => Err(BackendError::Busy(format!(
                "{oid}: lock {name} held by {} ({})",
                l.client, l.cookie
            ))),
            None => {
                o.locks.insert(
                    name.to_string(),
                    Locker {
                        client: self.id.clone(),
                        cookie: cookie.to_string(),
                        description: description.to_string(),
                    },
                );
                Ok(())
            }
        }
    }

    async fn unlock(&self, oid: &str, name: &str, cookie: &str) -> Result<(), BackendError> {
        let mut st = self.enter().await?;
        let o = st.obj_mut(oid)?;
        match o.locks.get(name) {
            Some(l) if l.client == self.id && l.cookie == cookie => {
                o.locks.remove(name);
                Ok(())
            }
            _ => Err(BackendError::NotFound(format!(
                "{oid}: lock {name} not held with cookie {cookie}"
            ))),
        }
    }

    async fn lock_info(&self, oid: &str, name: &str) -> Result<Vec<Locker>, BackendError> {
        let st = self.enter().await?;
        Ok(st.obj(oid)?.locks.get(name).cloned().into_iter().collect())
    }

    async fn break_lock(
        &self,
        oid: &str,
        name: &str,
        client: &str,
        cookie: &str,
    ) -> Result<(), BackendError> {
        let mut st = self.enter().await?;
        let o = st.obj_mut(oid)?;
        match o.locks.get(name) {
            Some(l) if l.client == client && l.cookie == cookie => {
                o.locks.remove(name);
                Ok(())
            }
            _ => Err(BackendError::NotFound(format!(
                "{oid}: lock {name} not held by {client} ({cookie})"
            ))),
        }
    }

    async fn watch(&self, oid: &str) -> Result<(u64, mpsc::Receiver<WatchEvent>), BackendError> {
        let mut st = self.enter().await?;
        st.obj(oid)?;
        st.next_cookie += 1;
        let cookie = st.next_cookie;
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL);
        st.watches
            .entry(oid.to_string())
            .or_default()
            .push(WatchEntry {
                client: self.id.clone(),
                cookie,
                tx,
            });
        Ok((cookie, rx))
    }

    async fn unwatch(&self, oid: &str, cookie: u64) -> Result<(), BackendError> {
        let mut st = self.enter().await?;
        let list = st.watches.entry(oid.to_string()).or_default();
        let before = list.len();
        list.retain(|w| !(w.client == self.id && w.cookie == cookie));
        if list.len() == before {
            return Err(BackendError::NotFound(format!("{oid}: watch {cookie}")));
        }
        Ok(())
    }

    async fn list_watchers(&self, oid: &str) -> Result<Vec<Watcher>, BackendError> {
        let mut st = self.enter().await?;
        st.reap(self.shared.watch_timeout);
        st.obj(oid)?;
        Ok(st.watchers(oid))
    }

    async fn notify(
        &self,
        oid: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<NotifyResult, BackendError> {
        let (notify_id, done_rx) = {
            let mut st = self.enter().await?;
            st.reap(self.shared.watch_timeout);
            st.obj(oid)?;
            st.next_notify += 1;
            let notify_id = st.next_notify;
            let (done_tx, done_rx) = oneshot::channel();
            let mut waiting = BTreeSet::new();
            let targets: Vec<(String, u64, mpsc::Sender<WatchEvent>)> = st
                .watches
                .get(oid)
                .map(|l| {
                    l.iter()
                        .map(|w| (w.client.clone(), w.cookie, w.tx.clone()))
                        .collect()
                })
                .unwrap_or_default();
            for (client, cookie, tx) in targets {
                waiting.insert((client.clone(), cookie));
                if st.is_frozen(&client) {
                    if let Some(c) = st.clients.get_mut(&client) {
                        c.missed_notifies += 1;
                    }
                    continue; // unreachable: it will time out
                }
                let _ = tx.try_send(WatchEvent::Notify(NotifyEvent {
                    notify_id,
                    cookie,
                    notifier: self.id.clone(),
                    payload: payload.clone(),
                }));
            }
            let done = if waiting.is_empty() {
                let _ = done_tx.send(());
                None
            } else {
                Some(done_tx)
            };
            st.notifies.insert(
                notify_id,
                PendingNotify {
                    oid: oid.to_string(),
                    waiting,
                    acks: Vec::new(),
                    done,
                },
            );
            (notify_id, done_rx)
        };
        let _ = tokio::time::timeout(timeout, done_rx).await;
        let mut st = lock_state(&self.shared);
        let p = st
            .notifies
            .remove(&notify_id)
            .expect("pending notify is removed only by its notifier");
        Ok(NotifyResult {
            acks: p.acks,
            timed_out: p
                .waiting
                .into_iter()
                .map(|(client, cookie)| Watcher { client, cookie })
                .collect(),
        })
    }

    async fn notify_ack(
        &self,
        oid: &str,
        notify_id: u64,
        cookie: u64,
        reply: Bytes,
    ) -> Result<(), BackendError> {
        let mut st = self.enter().await?;
        let Some(p) = st.notifies.get_mut(&notify_id) else {
            // Late ack: the notifier already gave up on us.
            return Err(BackendError::NotFound(format!("notify {notify_id}")));
        };
        if p.oid != oid || !p.waiting.remove(&(self.id.clone(), cookie)) {
            return Err(BackendError::NotFound(format!(
                "notify {notify_id} does not wait for watch {cookie}"
            )));
        }
        p.acks.push(NotifyAck {
            client: self.id.clone(),
            cookie,
            reply,
        });
        if p.waiting.is_empty() {
            if let Some(done) = p.done.take() {
                let _ = done.send(());
            }
        }
        Ok(())
    }

    async fn blocklist_add(&self, client: &str, expire: Duration) -> Result<(), BackendError> {
        let mut st = self.enter().await?;
        if client == self.id {
            return Err(BackendError::InvalidArgument(
                "refusing to blocklist myself".into(),
            ));
        }
        st.blocklist
            .insert(client.to_string(), Instant::now() + expire);
        // The OSDs drop a blocklisted client's watches.
        let frozen = st.is_frozen(client);
        let mut lost = Vec::new();
        for list in st.watches.values_mut() {
            list.retain(|w| {
                if w.client == client {
                    lost.push(w.tx.clone());
                    false
                } else {
                    true
                }
            });
        }
        st.disconnect(client, frozen, lost);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn objects_omap_and_errors() {
        let c = MemCluster::new();
        let b = c.client();
        assert!(matches!(
            b.read("o", 0, 1).await,
            Err(BackendError::NotFound(_))
        ));
        b.write("o", 4, Bytes::from_static(b"abcd")).await.unwrap();
        assert_eq!(b.stat("o").await.unwrap(), 8);
        assert_eq!(&b.read("o", 2, 100).await.unwrap()[..], b"\0\0abcd");
        b.zero("o", 6, 100).await.unwrap();
        assert_eq!(b.stat("o").await.unwrap(), 8, "zero never extends");
        assert!(matches!(
            b.zero("x", 0, 1).await,
            Err(BackendError::NotFound(_))
        ));
        assert!(matches!(
            b.create("o", true).await,
            Err(BackendError::Exists(_))
        ));
        b.create("o", false).await.unwrap();
        let kv: BTreeMap<String, Bytes> = (0..5)
            .map(|i| (format!("k{i}"), Bytes::from(vec![i as u8])))
            .collect();
        b.omap_set("m", kv).await.unwrap();
        let (page, more) = b.omap_list("m", "k1", 2).await.unwrap();
        assert_eq!(
            page.iter().map(|p| p.0.as_str()).collect::<Vec<_>>(),
            ["k2", "k3"]
        );
        assert!(more);
        let (_, more) = b.omap_list("m", "k2", 2).await.unwrap();
        assert!(!more);
        b.omap_rm("m", &["k0".into()]).await.unwrap();
        assert!(b.omap_get("m", &["k0".into()]).await.unwrap().is_empty());
        b.remove("o").await.unwrap();
        assert!(matches!(
            b.remove("o").await,
            Err(BackendError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn locks_are_exclusive_and_breakable() {
        let c = MemCluster::new();
        let (a, b) = (c.client(), c.client());
        a.lock_exclusive("h", "l", "c1", "d").await.unwrap();
        a.lock_exclusive("h", "l", "c1", "d").await.unwrap();
        assert!(matches!(
            a.lock_exclusive("h", "l", "c2", "d").await,
            Err(BackendError::Busy(_))
        ));
        assert!(matches!(
            b.lock_exclusive("h", "l", "c1", "d").await,
            Err(BackendError::Busy(_))
        ));
        assert!(matches!(
            b.unlock("h", "l", "c1").await,
            Err(BackendError::NotFound(_))
        ));
        let l = b.lock_info("h", "l").await.unwrap();
        assert_eq!(l[0].client, a.client_id());
        b.break_lock("h", "l", &a.client_id(), "c1").await.unwrap();
        b.lock_exclusive("h", "l", "c9", "d").await.unwrap();
        assert!(matches!(
            a.unlock("h", "l", "c1").await,
            Err(BackendError::NotFound(_))
        ));
        b.unlock("h", "l", "c9").await.unwrap();
        assert!(b.lock_info("h", "l").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn notify_collects_acks_and_times_out_frozen_watchers() {
        let c = MemCluster::with_watch_timeout(Duration::from_millis(100));
        let (a, b, n) = (c.client(), c.client(), c.client());
        n.create("h", false).await.unwrap();
        let (ka, mut ra) = a.watch("h").await.unwrap();
        let (kb, mut rb) = b.watch("h").await.unwrap();
        let a2 = a.clone();
        tokio::spawn(async move {
            while let Some(WatchEvent::Notify(e)) = ra.recv().await {
                a2.notify_ack("h", e.notify_id, e.cookie, Bytes::from_static(b"hi"))
                    .await
                    .unwrap();
            }
        });
        c.freeze(&b.client_id());
        let r = n
            .notify("h", Bytes::from_static(b"p"), Duration::from_millis(50))
            .await
            .unwrap();
        assert_eq!(r.acks.len(), 1);
        assert_eq!((r.acks[0].cookie, &r.acks[0].reply[..]), (ka, &b"hi"[..]));
        assert_eq!(
            r.timed_out,
            vec![Watcher {
                client: b.client_id(),
                cookie: kb
            }]
        );
        // Past the watch timeout the frozen client's watch is gone...
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(n.list_watchers("h").await.unwrap().len(), 1);
        assert!(rb.try_recv().is_err(), "a frozen client hears nothing");
        // ...and it learns so when it thaws.
        c.unfreeze(&b.client_id());
        assert_eq!(rb.recv().await, Some(WatchEvent::Disconnected));
    }

    #[tokio::test]
    async fn blocklist_fences_every_op_including_ones_in_flight() {
        let c = MemCluster::new();
        let (a, b) = (c.client(), c.client());
        a.create("h", false).await.unwrap();
        let (_k, mut rx) = a.watch("h").await.unwrap();
        c.freeze(&a.client_id());
        let a2 = a.clone();
        let stuck = tokio::spawn(async move { a2.write("d", 0, Bytes::from_static(b"x")).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(matches!(
            b.blocklist_add(&b.client_id(), Duration::from_secs(1))
                .await,
            Err(BackendError::InvalidArgument(_))
        ));
        b.blocklist_add(&a.client_id(), Duration::from_secs(60))
            .await
            .unwrap();
        assert!(b.list_watchers("h").await.unwrap().is_empty());
        c.unfreeze(&a.client_id());
        assert!(matches!(
            stuck.await.unwrap(),
            Err(BackendError::Blocklisted(_))
        ));
        assert!(
            c.object_data("d").is_none(),
            "the fenced write never landed"
        );
        assert!(matches!(
            a.stat("h").await,
            Err(BackendError::Blocklisted(_))
        ));
        assert_eq!(rx.recv().await, Some(WatchEvent::Disconnected));
        // Expiry lifts it.
        b.blocklist_add(&a.client_id(), Duration::from_millis(1))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        a.stat("h").await.unwrap();
    }
}
