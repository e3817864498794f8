//! Durable monitor state: the Paxos state and values, the OSDMap history and the auth
//! database.
//!
//! Everything goes through [`KvStore`], an ordered key-value store with atomic,
//! durable batches: RocksDB in production, an in-memory map in unit tests. A
//! Paxos `Persist` output becomes exactly one batch, so a commit, the map it
//! produces and the Paxos bookkeeping land together or not at all.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use basalt_auth::{AuthChange, AuthDb};
use basalt_maps::{decode, encode, Epoch, Incremental, OsdMap};
use basalt_paxos::{PersistOp, PersistentState, Version};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("monitor store at {path}: {message}")]
    Open { path: String, message: String },
    #[error(
        "monitor store I/O failed: {0}; check the disk (full? read-only?) and restart the monitor"
    )]
    Io(String),
    #[error("monitor store is corrupt: {0}")]
    Corrupt(String),
}

/// One atomic, durable group of writes.
#[derive(Default)]
pub struct Batch {
    puts: Vec<(Vec<u8>, Vec<u8>)>,
    deletes: Vec<Vec<u8>>,
    /// Half-open key ranges to delete.
    delete_ranges: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Batch {
    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.puts.push((key, value));
    }
    pub fn delete(&mut self, key: Vec<u8>) {
        self.deletes.push(key);
    }
    pub fn delete_range(&mut self, from: Vec<u8>, to: Vec<u8>) {
        self.delete_ranges.push((from, to));
    }
}

pub trait KvStore: Send + Sync + 'static {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Applies the batch atomically and durably (fsynced) before returning.
    fn write(&self, batch: Batch) -> Result<(), StoreError>;
}

pub struct RocksStore {
    db: rocksdb::DB,
}

impl RocksStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        // Recycled WAL files avoid the metadata journal commit of a growing file per fsync.
        opts.set_recycle_log_file_num(4);
        let db = rocksdb::DB::open(&opts, path).map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(RocksStore { db })
    }
}

impl KvStore for RocksStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.db.get(key).map_err(|e| StoreError::Io(e.to_string()))
    }

    fn write(&self, batch: Batch) -> Result<(), StoreError> {
        let mut wb = rocksdb::WriteBatch::default();
        for (from, to) in &batch.delete_ranges {
            wb.delete_range(from, to);
        }
        for k in &batch.deletes {
            wb.delete(k);
        }
        for (k, v) in &batch.puts {
            wb.put(k, v);
        }
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        self.db
            .write_opt(wb, &wo)
            .map_err(|e| StoreError::Io(e.to_string()))
    }
}

/// In-memory [`KvStore`] for tests of the monitor logic without RocksDB.
#[derive(Default, Clone)]
pub struct MemStore {
    map: Arc<Mutex<BTreeMap<Vec<u8>, Vec<u8>>>>,
}

impl KvStore for MemStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let map = self.map.lock().map_err(|e| StoreError::Io(e.to_string()))?;
        Ok(map.get(key).cloned())
    }

    fn write(&self, batch: Batch) -> Result<(), StoreError> {
        let mut map = self.map.lock().map_err(|e| StoreError::Io(e.to_string()))?;
        for (from, to) in batch.delete_ranges {
            let doomed: Vec<Vec<u8>> = map.range(from..to).map(|(k, _)| k.clone()).collect();
            for k in doomed {
                map.remove(&k);
            }
        }
        for k in batch.deletes {
            map.remove(&k);
        }
        map.extend(batch.puts);
        Ok(())
    }
}

const KEY_PAXOS_STATE: &[u8] = b"s";
const KEY_OSDMAP_LATEST: &[u8] = b"m";
const KEY_OSDMAP_FIRST: &[u8] = b"f";
const KEY_AUTH_DB: &[u8] = b"a";
const PREFIX_PAXOS_VALUE: u8 = b'p';
const PREFIX_OSDMAP_INC: u8 = b'i';
const PREFIX_OSDMAP_FULL: u8 = b'F';

fn key(prefix: u8, n: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(prefix);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// What one Paxos version carries: the map changes every service agreed on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonValue {
    pub osdmap: Option<Incremental>,
    /// Auth database changes, applied as one batch (one auth version) when non-empty.
    pub auth: Vec<AuthChange>,
}

/// The replicated state a lagging monitor installs wholesale.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonSnapshot {
    pub osdmap: OsdMap,
    pub auth: AuthDb,
}

/// What a persisted Paxos step changed in the replicated state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changed {
    pub osdmap: bool,
    pub auth: bool,
}

/// History retention for the OSDMap.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    pub full_map_interval: u64,
    pub keep_epochs: u64,
}

/// The monitor's durable state with typed accessors.
pub struct MonStore {
    kv: Arc<dyn KvStore>,
    paxos: PersistentState,
    osdmap: Arc<OsdMap>,
    first_epoch: Epoch,
    retention: Retention,
    auth: Arc<AuthDb>,
}

impl MonStore {
    /// Loads the state, or starts a new monitor with an empty map of cluster `fsid`.
    pub fn load(
        kv: Arc<dyn KvStore>,
        fsid: &str,
        retention: Retention,
    ) -> Result<Self, StoreError> {
        let paxos = match kv.get(KEY_PAXOS_STATE)? {
            Some(b) => decode(&b, "paxos state").map_err(|e| StoreError::Corrupt(e.to_string()))?,
            None => PersistentState::default(),
        };
        let osdmap: OsdMap = match kv.get(KEY_OSDMAP_LATEST)? {
            Some(b) => decode(&b, "osdmap").map_err(|e| StoreError::Corrupt(e.to_string()))?,
            None => OsdMap::new(fsid),
        };
        if osdmap.fsid != fsid {
            return Err(StoreError::Corrupt(format!(
                "the store belongs to cluster {} but the config names {fsid}; point --data elsewhere",
                osdmap.fsid
            )));
        }
        let first_epoch = match kv.get(KEY_OSDMAP_FIRST)? {
            Some(b) => decode(&b, "first epoch").map_err(|e| StoreError::Corrupt(e.to_string()))?,
            None => osdmap.epoch,
        };
        let auth: AuthDb = match kv.get(KEY_AUTH_DB)? {
            Some(b) => {
                decode(&b, "auth database").map_err(|e| StoreError::Corrupt(e.to_string()))?
            }
            None => AuthDb::default(),
        };
        Ok(MonStore {
            kv,
            paxos,
            osdmap: Arc::new(osdmap),
            first_epoch,
            retention,
            auth: Arc::new(auth),
        })
    }

    pub fn paxos_state(&self) -> &PersistentState {
        &self.paxos
    }

    pub fn osdmap(&self) -> &Arc<OsdMap> {
        &self.osdmap
    }

    /// The committed auth database.
    pub fn auth(&self) -> &Arc<AuthDb> {
        &self.auth
    }

    /// Oldest OSDMap epoch whose incremental (or full map) is still kept.
    pub fn first_epoch(&self) -> Epoch {
        self.first_epoch
    }

    /// A handle for reading map history outside the state owner.
    pub fn reader(&self) -> MapHistory {
        MapHistory {
            kv: self.kv.clone(),
        }
    }

    /// Makes one Paxos `Persist` output durable: Paxos bookkeeping, committed
    /// values, and the OSDMap epochs they produce, in one atomic batch. The
    /// Paxos fields change exactly as the core changes its own copy, so a
    /// restarted monitor resumes from the state it had in memory.
    /// Returns what changed.
    pub fn persist(&mut self, ops: &[PersistOp]) -> Result<Changed, StoreError> {
        let mut batch = Batch::default();
        let mut paxos = self.paxos.clone();
        let mut map = (*self.osdmap).clone();
        let mut first_epoch = self.first_epoch;
        let mut map_changed = false;
        let mut auth: Option<AuthDb> = None;
        for op in ops {
            if matches!(op, PersistOp::Commit { version, .. } if *version <= paxos.last_committed) {
                // Already applied; applying an incremental twice would fail.
                continue;
            }
            let old_first = paxos.first_committed;
            paxos.apply(op);
            match op {
                PersistOp::Commit { version, value } => {
                    batch.put(key(PREFIX_PAXOS_VALUE, *version), value.to_vec());
                    let value: MonValue = decode(value, "paxos value")
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                    if let Some(inc) = value.osdmap {
                        map.apply(&inc)
                            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                        batch.put(key(PREFIX_OSDMAP_INC, inc.epoch), encode(&inc));
                        if inc.epoch % self.retention.full_map_interval == 0 {
                            batch.put(key(PREFIX_OSDMAP_FULL, inc.epoch), encode(&map));
                        }
                        map_changed = true;
                    }
                    if !value.auth.is_empty() {
                        auth.get_or_insert_with(|| (*self.auth).clone())
                            .apply(&value.auth);
                    }
                }
                PersistOp::InstallSnapshot { data, .. } => {
                    let snap: MonSnapshot = decode(data, "monitor snapshot")
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                    batch.delete_range(
                        key(PREFIX_PAXOS_VALUE, 0),
                        key(PREFIX_PAXOS_VALUE, u64::MAX),
                    );
                    batch.delete_range(key(PREFIX_OSDMAP_INC, 0), key(PREFIX_OSDMAP_INC, u64::MAX));
                    batch.delete_range(
                        key(PREFIX_OSDMAP_FULL, 0),
                        key(PREFIX_OSDMAP_FULL, u64::MAX),
                    );
                    map = snap.osdmap;
                    auth = Some(snap.auth);
                    batch.put(key(PREFIX_OSDMAP_FULL, map.epoch), encode(&map));
                    first_epoch = map.epoch;
                    map_changed = true;
                }
                PersistOp::Trim { first_committed } => {
                    if *first_committed > old_first {
                        batch.delete_range(
                            key(PREFIX_PAXOS_VALUE, 0),
                            key(PREFIX_PAXOS_VALUE, *first_committed),
                        );
                    }
                }
                _ => {}
            }
        }
        // Keep `keep_epochs` of OSDMap history and a full map at the new oldest epoch,
        // so a subscriber from any kept epoch can be served.
        if map.epoch > first_epoch + self.retention.keep_epochs * 2 {
            let new_first = map.epoch - self.retention.keep_epochs;
            batch.put(
                key(PREFIX_OSDMAP_FULL, new_first),
                self.full_at(new_first, &map)?,
            );
            batch.delete_range(
                key(PREFIX_OSDMAP_INC, 0),
                key(PREFIX_OSDMAP_INC, new_first + 1),
            );
            batch.delete_range(
                key(PREFIX_OSDMAP_FULL, 0),
                key(PREFIX_OSDMAP_FULL, new_first),
            );
            first_epoch = new_first;
        }
        if map_changed {
            batch.put(KEY_OSDMAP_LATEST.to_vec(), encode(&map));
        }
        batch.put(KEY_OSDMAP_FIRST.to_vec(), encode(&first_epoch));
        if let Some(db) = &auth {
            batch.put(KEY_AUTH_DB.to_vec(), encode(db));
        }
        batch.put(KEY_PAXOS_STATE.to_vec(), encode(&paxos));
        self.kv.write(batch)?;
        self.paxos = paxos;
        if map_changed {
            self.osdmap = Arc::new(map);
        }
        self.first_epoch = first_epoch;
        let auth_changed = auth.is_some();
        if let Some(db) = auth {
            self.auth = Arc::new(db);
        }
        Ok(Changed {
            osdmap: map_changed,
            auth: auth_changed,
        })
    }

    /// The full map at `epoch` (≤ the latest), rebuilt from the nearest full map.
    fn full_at(&self, epoch: Epoch, latest: &OsdMap) -> Result<Vec<u8>, StoreError> {
        if epoch == latest.epoch {
            return Ok(encode(latest));
        }
        let map = self.reader().full_map(epoch)?.ok_or_else(|| {
            StoreError::Corrupt(format!("osdmap epoch {epoch} cannot be rebuilt"))
        })?;
        Ok(encode(&map))
    }

    pub fn committed_value(&self, v: Version) -> Option<Bytes> {
        if v < self.paxos.first_committed || v > self.paxos.last_committed {
            return None;
        }
        // A read error here only makes the leader skip a catch-up; the peer asks again.
        self.kv
            .get(&key(PREFIX_PAXOS_VALUE, v))
            .ok()
            .flatten()
            .map(Bytes::from)
    }

    pub fn snapshot(&self) -> (Version, Bytes) {
        let snap = MonSnapshot {
            osdmap: (*self.osdmap).clone(),
            auth: (*self.auth).clone(),
        };
        (self.paxos.last_committed, Bytes::from(encode(&snap)))
    }
}

impl basalt_paxos::CommittedLog for MonStore {
    fn committed_value(&self, v: Version) -> Option<Bytes> {
        MonStore::committed_value(self, v)
    }

    fn snapshot(&self) -> (Version, Bytes) {
        MonStore::snapshot(self)
    }
}

/// Read-only access to kept OSDMap history, shared with subscription streams.
#[derive(Clone)]
pub struct MapHistory {
    kv: Arc<dyn KvStore>,
}

impl MapHistory {
    pub fn incremental(&self, epoch: Epoch) -> Result<Option<Incremental>, StoreError> {
        match self.kv.get(&key(PREFIX_OSDMAP_INC, epoch))? {
            Some(b) => decode(&b, "incremental")
                .map(Some)
                .map_err(|e| StoreError::Corrupt(e.to_string())),
            None => Ok(None),
        }
    }

    /// The full map at `epoch`: a stored full map plus the incrementals after it.
    pub fn full_map(&self, epoch: Epoch) -> Result<Option<OsdMap>, StoreError> {
        let first: Epoch = match self.kv.get(KEY_OSDMAP_FIRST)? {
            Some(b) => decode(&b, "first epoch").map_err(|e| StoreError::Corrupt(e.to_string()))?,
            None => 0,
        };
        if epoch < first {
            return Ok(None);
        }
        let Some(b) = self.kv.get(KEY_OSDMAP_LATEST)? else {
            return Ok(None);
        };
        let latest: OsdMap =
            decode(&b, "osdmap").map_err(|e| StoreError::Corrupt(e.to_string()))?;
        if latest.epoch == epoch {
            return Ok(Some(latest));
        }
        if latest.epoch < epoch {
            return Ok(None);
        }
        let mut base = epoch;
        let mut map = loop {
            if let Some(b) = self.kv.get(&key(PREFIX_OSDMAP_FULL, base))? {
                break decode::<OsdMap>(&b, "osdmap")
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            }
            if base == 0 {
                // Untrimmed history starts from the empty map every cluster is born with.
                break OsdMap::new(&latest.fsid);
            }
            if base <= first {
                return Ok(None);
            }
            base -= 1;
        };
        while map.epoch < epoch {
            let Some(inc) = self.incremental(map.epoch + 1)? else {
                return Ok(None);
            };
            map.apply(&inc)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        }
        Ok(Some(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use basalt_maps::Change;

    fn value(epoch: Epoch, pool: &str) -> Bytes {
        let mut map = OsdMap::new("f");
        map.epoch = epoch - 1;
        map.next_pool_id = epoch as u32;
        let pool = map.new_pool(pool, 1, 1, 1).expect("pool");
        let inc = Incremental {
            epoch,
            stamp_ms: epoch,
            changes: vec![Change::CreatePool(pool)],
        };
        Bytes::from(encode(&MonValue {
            osdmap: Some(inc),
            auth: Vec::new(),
        }))
    }

    fn store(kv: &MemStore, keep: u64) -> MonStore {
        let retention = Retention {
            full_map_interval: 4,
            keep_epochs: keep,
        };
        MonStore::load(Arc::new(kv.clone()), "f", retention).expect("load")
    }

    #[test]
    fn commits_survive_reload_and_history_is_kept() {
        let kv = MemStore::default();
        let mut s = store(&kv, 100);
        for v in 1..=10 {
            let changed = s
                .persist(&[
                    PersistOp::AcceptedPn(100 + v),
                    PersistOp::Commit {
                        version: v,
                        value: value(v, &format!("p{v}")),
                    },
                ])
                .expect("persist");
            assert!(changed.osdmap && !changed.auth);
        }
        let s = store(&kv, 100);
        assert_eq!(s.paxos_state().last_committed, 10);
        assert_eq!(s.paxos_state().first_committed, 1);
        assert_eq!(s.paxos_state().accepted_pn, 110);
        assert_eq!(s.osdmap().epoch, 10);
        assert_eq!(s.osdmap().pools.len(), 10);
        assert!(s.committed_value(3).is_some());
        let at3 = s.reader().full_map(3).expect("read").expect("kept");
        assert_eq!((at3.epoch, at3.pools.len()), (3, 3));
        let at5 = s.reader().full_map(5).expect("read").expect("kept");
        assert_eq!(at5.epoch, 5);
        assert_eq!(at5.pools.len(), 5);
        assert!(s.reader().full_map(11).expect("read").is_none());
    }

    #[test]
    fn old_history_is_trimmed_and_snapshots_install() {
        let kv = MemStore::default();
        let mut s = store(&kv, 3);
        for v in 1..=20 {
            s.persist(&[PersistOp::Commit {
                version: v,
                value: value(v, &format!("p{v}")),
            }])
            .expect("persist");
        }
        assert!(s.first_epoch() > 1, "history trimmed");
        let first = s.first_epoch();
        assert!(s.reader().full_map(first).expect("read").is_some());
        assert!(s.reader().full_map(first - 1).expect("read").is_none());
        s.persist(&[PersistOp::Trim {
            first_committed: 15,
        }])
        .expect("trim");
        assert!(s.committed_value(14).is_none());
        assert!(s.committed_value(15).is_some());

        let (v, snap) = s.snapshot();
        let kv2 = MemStore::default();
        let mut behind = store(&kv2, 3);
        behind
            .persist(&[PersistOp::InstallSnapshot {
                version: v,
                data: snap,
            }])
            .expect("install");
        let behind = store(&kv2, 3);
        assert_eq!(behind.paxos_state().last_committed, 20);
        assert_eq!(behind.osdmap().as_ref(), s.osdmap().as_ref());
    }

    #[test]
    fn auth_changes_commit_with_the_value_and_travel_in_snapshots() {
        use basalt_auth::{Caps, Secret};
        let kv = MemStore::default();
        let mut s = store(&kv, 100);
        let admin: basalt_auth::EntityName = "client.admin".parse().expect("name");
        let key = Secret::generate().expect("random");
        let value = MonValue {
            osdmap: None,
            auth: vec![AuthChange::Put {
                entity: admin.clone(),
                key: key.clone(),
                caps: Caps::from_pairs(&["mon", "allow *"]).expect("caps"),
            }],
        };
        let changed = s
            .persist(&[PersistOp::Commit {
                version: 1,
                value: Bytes::from(encode(&value)),
            }])
            .expect("persist");
        assert_eq!(
            changed,
            Changed {
                osdmap: false,
                auth: true
            }
        );
        let s = store(&kv, 100);
        assert_eq!(s.auth().version, 1);
        assert_eq!(s.auth().get(&admin).expect("kept").key, key);

        let (v, snap) = s.snapshot();
        let kv2 = MemStore::default();
        let mut behind = store(&kv2, 100);
        behind
            .persist(&[PersistOp::InstallSnapshot {
                version: v,
                data: snap,
            }])
            .expect("install");
        assert_eq!(store(&kv2, 100).auth().as_ref(), s.auth().as_ref());
    }
}
