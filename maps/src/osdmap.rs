use std::collections::{BTreeMap, BTreeSet};

use basalt_placement::{
    map_pg, object_to_pg, split_parent, CrushMap, DeviceStates, PgId, PgMapping, PlacementError,
    PoolPlacement, DEFAULT_RULE, WEIGHT_ONE,
};
use serde::{Deserialize, Serialize};

use crate::{Epoch, MapError, OsdId, PoolId};

/// Flags an operator can set on the OSDMap, each enforced by monitor policy.
pub const KNOWN_FLAGS: &[&str] = &[
    // Down OSDs are not marked out (maintenance, reboots).
    "noout",  // Beacon loss and failure reports do not mark OSDs down.
    "nodown", // Booting OSDs are not marked in.
    "noin",
];

/// Default blocklist expiry, as Ceph's `mon_osd_blocklist_default_expire` (1 h).
pub const DEFAULT_BLOCKLIST_SECS: u64 = 3600;
pub const MAX_POOL_SIZE: u32 = 10;
pub const MAX_PG_NUM: u32 = 65_536;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsdInfo {
    /// Identity of the OSD's data directory: a restarted OSD gets its id back.
    pub uuid: String,
    pub addr: String,
    pub host: String,
    pub up: bool,
    /// In-weight, 16.16: 0 = out, `WEIGHT_ONE` = fully in.
    pub reweight: u32,
    /// Epoch the OSD last came up (start of its current up interval).
    pub up_from: Epoch,
    /// Epoch the OSD was last marked down (0 = never).
    pub down_at: Epoch,
    /// Wall time (unix ms) it was marked down, for the down→out interval.
    pub down_stamp_ms: u64,
    /// Marked out by the monitor (not an operator): it is marked in again on boot.
    pub auto_out: bool,
}

impl OsdInfo {
    pub fn is_in(&self) -> bool {
        self.reweight > 0
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub id: PoolId,
    pub name: String,
    pub size: u32,
    pub min_size: u32,
    pub pg_num: u32,
    pub pgp_num: u32,
    pub rule: u32,
    pub created: Epoch,
}

impl Pool {
    pub fn placement(&self) -> PoolPlacement {
        PoolPlacement {
            id: self.id,
            pg_num: self.pg_num,
            pgp_num: self.pgp_num,
            size: self.size,
            rule: self.rule,
        }
    }

    /// Checks a pool's parameters; `crush` validates the rule.
    pub fn validate(&self, crush: &CrushMap) -> Result<(), MapError> {
        let bad = |m: String| Err(MapError::InvalidPool(m));
        if self.name.is_empty() || self.name.len() > 128 {
            return bad("pool name must be 1..=128 characters".into());
        }
        if self.name.chars().any(|c| c.is_whitespace() || c == '/') {
            return bad(format!(
                "pool name '{}' must not contain whitespace or '/'",
                self.name
            ));
        }
        if self.size == 0 || self.size > MAX_POOL_SIZE {
            return bad(format!("size {} must be in 1..={MAX_POOL_SIZE}", self.size));
        }
        if self.min_size == 0 || self.min_size > self.size {
            return bad(format!(
                "min_size {} must be in 1..=size ({}); size < min_size would block all I/O",
                self.min_size, self.size
            ));
        }
        if self.pg_num == 0 || self.pg_num > MAX_PG_NUM {
            return bad(format!(
                "pg_num {} must be in 1..={MAX_PG_NUM}",
                self.pg_num
            ));
        }
        if self.pgp_num == 0 || self.pgp_num > self.pg_num {
            return bad(format!(
                "pgp_num {} must be in 1..=pg_num ({})",
                self.pgp_num, self.pg_num
            ));
        }
        if !crush.contains_rule(self.rule) {
            return bad(format!("CRUSH rule {} does not exist", self.rule));
        }
        Ok(())
    }
}

/// One step of an [`Incremental`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// A new OSD id (or a re-registration of a removed one).
    NewOsd {
        id: OsdId,
        uuid: String,
        host: String,
        crush_weight: u32,
    },
    /// The OSD booted at `addr`; it is up from this incremental's epoch.
    OsdUp {
        id: OsdId,
        addr: String,
    },
    OsdDown {
        id: OsdId,
    },
    /// Set the in-weight; `auto` records that policy (not an operator) did it.
    Reweight {
        id: OsdId,
        weight: u32,
        auto: bool,
    },
    CrushWeight {
        id: OsdId,
        weight: u32,
    },
    /// The primary of `pg` finished peering for the interval that began at `interval`
    /// with `acting`, and is about to serve I/O: every later peering must hear from one
    /// of `acting` (see [`PgActivation`]).
    PgActivated {
        pg: PgId,
        interval: Epoch,
        acting: Vec<OsdId>,
    },
    /// An operator declared `id`'s data gone for good: PGs stop waiting for it.
    OsdLost {
        id: OsdId,
    },
    RemoveOsd {
        id: OsdId,
    },
    CreatePool(Pool),
    RemovePool {
        id: PoolId,
    },
    UpdatePool(Pool),
    BlocklistAdd {
        entity: String,
        expires_ms: u64,
    },
    BlocklistRemove {
        entity: String,
    },
    SetFlag(String),
    UnsetFlag(String),
}

/// The changes that take an `OsdMap` from `epoch - 1` to `epoch`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incremental {
    pub epoch: Epoch,
    /// Leader's wall clock when it built the incremental (unix ms).
    pub stamp_ms: u64,
    pub changes: Vec<Change>,
}

/// The last interval in which a PG went active, as its primary recorded it before serving.
///
/// This is basalt's replacement for Ceph's `up_thru` + past-intervals analysis (DESIGN.md
/// §3): rather than every peering primary rebuilding from map history which intervals
/// *might* have accepted writes (which needs that history to outlive monitor trimming),
/// a primary records the fact itself, through Paxos, after recovery and before its first
/// write. Every member of `acting` then holds every acknowledged write, so a later peering
/// needs one of them — and without one the PG is `down`. The cost is one map change per
/// activation batch, which is small at the PG counts basalt runs (Kafka keeps its in-sync
/// replica sets in the controller the same way).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgActivation {
    /// Epoch the activated interval began.
    pub interval: Epoch,
    /// Its acting set, minus OSDs an operator has since declared lost.
    pub acting: Vec<OsdId>,
}

/// Where every OSD is, whether it is up and in, the CRUSH hierarchy, pools,
/// the client blocklist and flags, at one epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsdMap {
    pub epoch: Epoch,
    pub fsid: String,
    /// Wall time of the incremental that produced this epoch (unix ms).
    pub modified_ms: u64,
    pub osds: BTreeMap<OsdId, OsdInfo>,
    pub crush: CrushMap,
    pub pools: BTreeMap<PoolId, Pool>,
    pub next_pool_id: PoolId,
    /// Fenced client entities and when each fence lapses (unix ms).
    pub blocklist: BTreeMap<String, u64>,
    pub flags: BTreeSet<String>,
    /// Per PG, the last interval that went active (absent: never active yet).
    pub pg_activations: BTreeMap<PgId, PgActivation>,
}

impl OsdMap {
    /// The empty map a new cluster starts from (epoch 0; the first commit makes epoch 1).
    pub fn new(fsid: &str) -> Self {
        OsdMap {
            epoch: 0,
            fsid: fsid.to_string(),
            modified_ms: 0,
            osds: BTreeMap::new(),
            crush: CrushMap::new(),
            pools: BTreeMap::new(),
            next_pool_id: 1,
            blocklist: BTreeMap::new(),
            flags: BTreeSet::new(),
            pg_activations: BTreeMap::new(),
        }
    }

    /// Applies the next incremental. Deterministic and total for any
    /// incremental of the right epoch (see the crate docs).
    pub fn apply(&mut self, inc: &Incremental) -> Result<(), MapError> {
        if inc.epoch != self.epoch + 1 {
            return Err(MapError::EpochGap {
                have: self.epoch,
                got: inc.epoch,
            });
        }
        self.epoch = inc.epoch;
        self.modified_ms = inc.stamp_ms;
        for change in &inc.changes {
            self.apply_change(inc.epoch, inc.stamp_ms, change);
        }
        Ok(())
    }

    fn apply_change(&mut self, epoch: Epoch, stamp_ms: u64, change: &Change) {
        match change {
            Change::NewOsd {
                id,
                uuid,
                host,
                crush_weight,
            } => {
                // A stale CRUSH entry (e.g. left by a removal) must not block the new one.
                let _ = self.crush.remove_osd(*id);
                if self.crush.add_osd(*id, host, *crush_weight).is_ok() {
                    self.osds.insert(
                        *id,
                        OsdInfo {
                            uuid: uuid.clone(),
                            addr: String::new(),
                            host: host.clone(),
                            up: false,
                            reweight: WEIGHT_ONE,
                            up_from: 0,
                            down_at: 0,
                            down_stamp_ms: 0,
                            auto_out: false,
                        },
                    );
                }
            }
            Change::OsdUp { id, addr } => {
                if let Some(o) = self.osds.get_mut(id) {
                    o.up = true;
                    o.addr = addr.clone();
                    o.up_from = epoch;
                }
            }
            Change::OsdDown { id } => {
                if let Some(o) = self.osds.get_mut(id) {
                    if o.up {
                        o.up = false;
                        o.down_at = epoch;
                        o.down_stamp_ms = stamp_ms;
                    }
                }
            }
            Change::Reweight { id, weight, auto } => {
                if let Some(o) = self.osds.get_mut(id) {
                    o.reweight = (*weight).min(WEIGHT_ONE);
                    o.auto_out = *auto && *weight == 0;
                }
            }
            Change::CrushWeight { id, weight } => {
                let _ = self.crush.set_weight(*id, *weight);
            }
            Change::RemoveOsd { id } => {
                self.osds.remove(id);
                let _ = self.crush.remove_osd(*id);
            }
            Change::CreatePool(pool) => {
                if !self.pools.values().any(|p| p.name == pool.name) {
                    self.next_pool_id = self.next_pool_id.max(pool.id + 1);
                    self.pools.insert(pool.id, pool.clone());
                }
            }
            Change::RemovePool { id } => {
                self.pools.remove(id);
                self.pg_activations.retain(|pg, _| pg.pool != *id);
            }
            Change::PgActivated {
                pg,
                interval,
                acting,
            } => {
                // An activation older than the recorded one lost a race with a newer
                // interval; recording it would make peering wait for the wrong members.
                let newer = self
                    .pg_activations
                    .get(pg)
                    .is_none_or(|a| a.interval <= *interval);
                if self.pools.contains_key(&pg.pool) && newer {
                    self.pg_activations.insert(
                        *pg,
                        PgActivation {
                            interval: *interval,
                            acting: acting.clone(),
                        },
                    );
                }
            }
            Change::OsdLost { id } => {
                for a in self.pg_activations.values_mut() {
                    a.acting.retain(|o| o != id);
                }
            }
            Change::UpdatePool(pool) => {
                if let Some(p) = self.pools.get_mut(&pool.id) {
                    let old_pg_num = p.pg_num;
                    *p = pool.clone();
                    // A split child holds a share of its parent's objects on the parent's
                    // members, so the parent's last activation names every copy that may
                    // hold its acknowledged writes: peering the child needs one of them too.
                    for seed in old_pg_num..pool.pg_num {
                        let parent = PgId {
                            pool: pool.id,
                            seed: split_parent(seed, old_pg_num),
                        };
                        let child = PgId {
                            pool: pool.id,
                            seed,
                        };
                        if let Some(a) = self.pg_activations.get(&parent).cloned() {
                            self.pg_activations.entry(child).or_insert(a);
                        }
                    }
                }
            }
            Change::BlocklistAdd { entity, expires_ms } => {
                self.blocklist.insert(entity.clone(), *expires_ms);
            }
            Change::BlocklistRemove { entity } => {
                self.blocklist.remove(entity);
            }
            Change::SetFlag(f) => {
                self.flags.insert(f.clone());
            }
            Change::UnsetFlag(f) => {
                self.flags.remove(f);
            }
        }
    }

    pub fn pool_by_name(&self, name: &str) -> Option<&Pool> {
        self.pools.values().find(|p| p.name == name)
    }

    pub fn pool_named(&self, name: &str) -> Result<&Pool, MapError> {
        self.pool_by_name(name)
            .ok_or_else(|| MapError::PoolNotFound(name.to_string()))
    }

    pub fn osd(&self, id: OsdId) -> Result<&OsdInfo, MapError> {
        self.osds.get(&id).ok_or(MapError::OsdNotFound(id))
    }

    pub fn has_flag(&self, flag: &str) -> bool {
        self.flags.contains(flag)
    }

    /// Whether client `entity` is fenced at wall time `now_ms`. `entity` is a client instance,
    /// `<name>/<nonce>` (the nonce is random per client process, as Ceph's address nonce), or
    /// a bare name. An entry for the instance fences that process only, which is what a lock
    /// breaker adds, so a restarted process under the same name serves at once; an entry for
    /// the bare name fences every instance of that name (an operator's `osd blocklist add
    /// client.x`).
    pub fn is_blocklisted(&self, entity: &str, now_ms: u64) -> bool {
        let listed = |e: &str| {
            self.blocklist
                .get(e)
                .is_some_and(|&expires| expires > now_ms)
        };
        listed(entity)
            || entity
                .rsplit_once('/')
                .is_some_and(|(name, _)| listed(name))
    }

    pub fn num_up(&self) -> usize {
        self.osds.values().filter(|o| o.up).count()
    }

    pub fn num_in(&self) -> usize {
        self.osds.values().filter(|o| o.is_in()).count()
    }

    /// Builds a new pool record with the next id, checked against this map.
    pub fn new_pool(
        &self,
        name: &str,
        size: u32,
        min_size: u32,
        pg_num: u32,
    ) -> Result<Pool, MapError> {
        if self.pool_by_name(name).is_some() {
            return Err(MapError::PoolExists(name.to_string()));
        }
        let pool = Pool {
            id: self.next_pool_id,
            name: name.to_string(),
            size,
            min_size,
            pg_num,
            pgp_num: pg_num,
            rule: DEFAULT_RULE,
            created: self.epoch + 1,
        };
        pool.validate(&self.crush)?;
        Ok(pool)
    }

    /// A copy of pool `name` with `key` set to `value` (`size`, `min_size`, `pg_num`, `pgp_num`).
    pub fn pool_with(&self, name: &str, key: &str, value: &str) -> Result<Pool, MapError> {
        let mut pool = self.pool_named(name)?.clone();
        let field = match key {
            "size" => &mut pool.size,
            "min_size" => &mut pool.min_size,
            "pg_num" => &mut pool.pg_num,
            "pgp_num" => &mut pool.pgp_num,
            other => {
                return Err(MapError::InvalidPool(format!(
                    "unknown pool setting '{other}'; settable: size, min_size, pg_num, pgp_num"
                )))
            }
        };
        let n: u32 = value.parse().map_err(|_| {
            MapError::InvalidPool(format!("{key} needs a whole number, got '{value}'"))
        })?;
        // Growing pg_num splits PGs (every OSD splits its copies when it applies the map);
        // shrinking would need PG merging, which is not built.
        if key == "pg_num" && n < *field {
            return Err(MapError::InvalidPool(format!(
                "pg_num cannot shrink (it is {}, asked {n}): merging PGs is not built; keep \
                 pg_num, or create a pool with the pg_num you need (`basalt pool create NAME \
                 --pg-num {n}`) and copy the data into it",
                *field
            )));
        }
        *field = n;
        pool.validate(&self.crush)?;
        Ok(pool)
    }

    /// Where an object of a pool lives: its PG and that PG's OSDs.
    pub fn map_object(&self, pool: &str, object: &str) -> Result<(PgId, PgMapping), MapError> {
        let pool = self.pool_named(pool)?;
        let pg = object_to_pg(&pool.placement(), object);
        let mapping = self.map_pg(pool, pg)?;
        Ok((pg, mapping))
    }

    pub fn map_pg(&self, pool: &Pool, pg: PgId) -> Result<PgMapping, MapError> {
        map_pg(&self.crush, &pool.placement(), pg, self, None).map_err(placement_error)
    }
}

fn placement_error(e: PlacementError) -> MapError {
    MapError::InvalidArgument(e.to_string())
}

impl DeviceStates for OsdMap {
    fn exists(&self, osd: OsdId) -> bool {
        self.osds.contains_key(&osd)
    }

    fn is_up(&self, osd: OsdId) -> bool {
        self.osds.get(&osd).is_some_and(|o| o.up)
    }

    fn reweight(&self, osd: OsdId) -> u32 {
        self.osds.get(&osd).map_or(0, |o| o.reweight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inc(map: &OsdMap, changes: Vec<Change>) -> Incremental {
        Incremental {
            epoch: map.epoch + 1,
            stamp_ms: 1_000 * (map.epoch + 1),
            changes,
        }
    }

    fn cluster() -> OsdMap {
        let mut map = OsdMap::new("fsid");
        let mut changes = Vec::new();
        for id in 0..6 {
            changes.push(Change::NewOsd {
                id,
                uuid: format!("uuid-{id}"),
                host: format!("host{}", id / 2),
                crush_weight: WEIGHT_ONE,
            });
            changes.push(Change::OsdUp {
                id,
                addr: format!("127.0.0.1:{}", 7000 + id),
            });
        }
        let i = inc(&map, changes);
        map.apply(&i).expect("first epoch");
        map
    }

    #[test]
    fn apply_builds_the_map_and_checks_epochs() {
        let mut map = cluster();
        assert_eq!(map.epoch, 1);
        assert_eq!(map.num_up(), 6);
        assert_eq!(map.num_in(), 6);
        assert_eq!(map.osds[&0].up_from, 1);
        let pool = map.new_pool("rbd", 3, 2, 32).expect("pool");
        let i = inc(&map, vec![Change::CreatePool(pool)]);
        let mut skipped = i.clone();
        skipped.epoch += 1;
        assert_eq!(
            map.apply(&skipped),
            Err(MapError::EpochGap { have: 1, got: 3 })
        );
        map.apply(&i).expect("apply");
        assert_eq!(map.pool_named("rbd").map(|p| p.id), Ok(1));
        assert_eq!(map.next_pool_id, 2);
        let (pg, m) = map.map_object("rbd", "obj").expect("maps");
        assert_eq!(pg.pool, 1);
        assert_eq!(m.up.len(), 3);
    }

    #[test]
    fn round_trips_through_the_encoding() {
        let map = cluster();
        let bytes = crate::encode(&map);
        let back: OsdMap = crate::decode(&bytes, "osdmap").expect("decode");
        assert_eq!(back, map);
        assert!(matches!(
            crate::decode::<OsdMap>(&bytes[..bytes.len() / 2], "osdmap"),
            Err(MapError::Decode { what: "osdmap", .. })
        ));
    }

    #[test]
    fn pool_validation_names_the_problem() {
        let map = cluster();
        let err = |r: Result<Pool, MapError>| r.expect_err("invalid").to_string();
        assert!(err(map.new_pool("p", 2, 3, 8)).contains("min_size 3"));
        assert!(err(map.new_pool("p", 0, 0, 8)).contains("size 0"));
        assert!(err(map.new_pool("p", 3, 2, 0)).contains("pg_num 0"));
        assert!(err(map.new_pool("a b", 3, 2, 8)).contains("whitespace"));
        let mut map = map;
        let pool = map.new_pool("rbd", 3, 2, 8).expect("pool");
        let i = inc(&map, vec![Change::CreatePool(pool)]);
        map.apply(&i).expect("apply");
        assert_eq!(
            map.new_pool("rbd", 3, 2, 8),
            Err(MapError::PoolExists("rbd".into()))
        );
        assert!(err(map.pool_with("rbd", "pg_num", "4")).contains("pg_num cannot shrink"));
        assert!(err(map.pool_with("rbd", "pg_num", "4")).contains("merging"));
        assert_eq!(map.pool_with("rbd", "pg_num", "8").map(|p| p.pg_num), Ok(8));
        let grown = map.pool_with("rbd", "pg_num", "16").expect("grow");
        assert_eq!(
            (grown.pg_num, grown.pgp_num),
            (16, 8),
            "pgp_num moves separately"
        );
        assert_eq!(
            map.pool_with("rbd", "pgp_num", "4").map(|p| p.pgp_num),
            Ok(4)
        );
        assert!(err(map.pool_with("rbd", "pgp_num", "16")).contains("pgp_num 16"));
        assert!(err(map.pool_with("rbd", "colour", "4")).contains("unknown pool setting"));
        assert!(err(map.pool_with("nope", "size", "4")).contains("does not exist"));
        assert_eq!(map.pool_with("rbd", "size", "2").map(|p| p.size), Ok(2));
    }

    #[test]
    fn a_split_gives_each_child_its_parents_activation() {
        let mut map = cluster();
        let pool = map.new_pool("rbd", 3, 2, 4).expect("pool");
        let i = inc(&map, vec![Change::CreatePool(pool)]);
        map.apply(&i).expect("apply");
        let pg = |seed| PgId { pool: 1, seed };
        let i = inc(
            &map,
            vec![Change::PgActivated {
                pg: pg(1),
                interval: 2,
                acting: vec![0, 2, 4],
            }],
        );
        map.apply(&i).expect("apply");
        let grown = map.pool_with("rbd", "pg_num", "16").expect("grow");
        let i = inc(&map, vec![Change::UpdatePool(grown)]);
        map.apply(&i).expect("apply");
        let recorded: Vec<u32> = map.pg_activations.keys().map(|p| p.seed).collect();
        assert_eq!(recorded, vec![1, 5, 9, 13], "pg 1's children are 5, 9, 13");
        for seed in [5, 9, 13] {
            assert_eq!(map.pg_activations[&pg(seed)], map.pg_activations[&pg(1)]);
        }
    }

    #[test]
    fn changes_to_missing_things_are_noops() {
        let mut map = cluster();
        let before = map.clone();
        let i = inc(
            &map,
            vec![
                Change::OsdUp {
                    id: 99,
                    addr: "x".into(),
                },
                Change::OsdDown { id: 98 },
                Change::RemovePool { id: 7 },
                Change::OsdLost { id: 97 },
                Change::PgActivated {
                    pg: PgId { pool: 7, seed: 0 },
                    interval: 1,
                    acting: vec![0],
                },
            ],
        );
        map.apply(&i).expect("apply");
        assert_eq!(map.osds, before.osds);
        assert_eq!(map.pools, before.pools);
        assert!(
            map.pg_activations.is_empty(),
            "no activation for a missing pool"
        );
    }

    #[test]
    fn down_and_out_and_blocklist() {
        let mut map = cluster();
        let i = inc(&map, vec![Change::OsdDown { id: 2 }]);
        map.apply(&i).expect("apply");
        let o = &map.osds[&2];
        assert!(!o.up && o.is_in());
        assert_eq!((o.down_at, o.down_stamp_ms), (2, 2_000));
        let i = inc(
            &map,
            vec![
                Change::Reweight {
                    id: 2,
                    weight: 0,
                    auto: true,
                },
                Change::BlocklistAdd {
                    entity: "client.a".into(),
                    expires_ms: 10_000,
                },
            ],
        );
        map.apply(&i).expect("apply");
        assert!(map.osds[&2].auto_out && !map.osds[&2].is_in());
        assert!(map.is_blocklisted("client.a", 9_999));
        assert!(!map.is_blocklisted("client.a", 10_000));
        assert!(!map.is_blocklisted("client.b", 0));
        // A bare name fences every instance of it; an instance fences only itself.
        assert!(map.is_blocklisted("client.a/17", 9_999));
        map.blocklist.insert("client.b/17".into(), 10_000);
        assert!(map.is_blocklisted("client.b/17", 9_999));
        assert!(!map.is_blocklisted("client.b/18", 9_999));
        assert!(!map.is_blocklisted("client.b", 9_999));
    }
}
