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
    /// The store's use as the OSD last reported it and the leader recorded it (None until
    /// the first report). Recorded when the OSD's fullness changes or its use moves by a
    /// percentage point (see [`OsdUsage::worth_recording`]), not at every beacon.
    pub usage: Option<OsdUsage>,
}

/// Ratios are kept in units of 1/10000 (0.85 is 8500), so the map stays integer-only and
/// every monitor and client classifies an OSD the same way.
pub const RATIO_ONE: u32 = 10_000;

/// When an OSD counts as nearfull, backfillfull and full (Ceph's `mon_osd_nearfull_ratio`,
/// `mon_osd_backfillfull_ratio`, `mon_osd_full_ratio`), in units of 1/[`RATIO_ONE`].
/// Always `0 < nearfull <= backfillfull <= full <= RATIO_ONE` ([`FullRatios::validate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FullRatios {
    pub nearfull: u32,
    pub backfillfull: u32,
    pub full: u32,
}

impl Default for FullRatios {
    /// Ceph's defaults: 0.85 / 0.90 / 0.95.
    fn default() -> Self {
        FullRatios {
            nearfull: 8_500,
            backfillfull: 9_000,
            full: 9_500,
        }
    }
}

/// Which of the three ratios a command sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RatioKind {
    Nearfull,
    Backfillfull,
    Full,
}

impl RatioKind {
    pub fn name(self) -> &'static str {
        match self {
            RatioKind::Nearfull => "nearfull",
            RatioKind::Backfillfull => "backfillfull",
            RatioKind::Full => "full",
        }
    }

    pub fn parse(s: &str) -> Result<RatioKind, MapError> {
        match s {
            "nearfull" => Ok(RatioKind::Nearfull),
            "backfillfull" => Ok(RatioKind::Backfillfull),
            "full" => Ok(RatioKind::Full),
            other => Err(MapError::InvalidArgument(format!(
                "unknown ratio '{other}'; ratios: nearfull, backfillfull, full"
            ))),
        }
    }
}

/// A ratio in units of 1/[`RATIO_ONE`] as a decimal, e.g. 8500 → "0.85".
pub fn ratio_str(r: u32) -> String {
    let s = format!("{}.{:04}", r / RATIO_ONE, r % RATIO_ONE);
    let s = s.trim_end_matches('0');
    if s.ends_with('.') {
        format!("{s}0")
    } else {
        s.to_string()
    }
}

/// Parses a decimal ratio ("0.9", "0.875", "1") into units of 1/[`RATIO_ONE`].
pub fn parse_ratio(s: &str) -> Result<u32, MapError> {
    let bad = || {
        MapError::InvalidArgument(format!(
            "ratio '{s}' must be a decimal between 0 and 1 with at most 4 places, e.g. 0.9"
        ))
    };
    let (int, frac) = s.trim().split_once('.').unwrap_or((s.trim(), ""));
    if int.is_empty() && frac.is_empty() || frac.len() > 4 {
        return Err(bad());
    }
    if !int.chars().chain(frac.chars()).all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let int: u32 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| bad())?
    };
    let frac: u32 = format!("{frac:0<4}").parse().map_err(|_| bad())?;
    int.checked_mul(RATIO_ONE)
        .and_then(|i| i.checked_add(frac))
        .ok_or_else(bad)
}

impl FullRatios {
    /// Ceph's rule: each ratio in (0, 1], nearfull ≤ backfillfull ≤ full (an OSD must warn
    /// before it stops taking backfill, and stop taking backfill before it stops writes).
    pub fn validate(&self) -> Result<(), MapError> {
        let bad = |m: String| Err(MapError::InvalidArgument(m));
        for (kind, r) in [
            (RatioKind::Nearfull, self.nearfull),
            (RatioKind::Backfillfull, self.backfillfull),
            (RatioKind::Full, self.full),
        ] {
            if r == 0 || r > RATIO_ONE {
                return bad(format!(
                    "{}_ratio {} must be above 0 and at most 1",
                    kind.name(),
                    ratio_str(r)
                ));
            }
        }
        if !(self.nearfull <= self.backfillfull && self.backfillfull <= self.full) {
            return bad(format!(
                "ratios must keep nearfull <= backfillfull <= full, and would be {} / {} / {}; \
                 change the others first",
                ratio_str(self.nearfull),
                ratio_str(self.backfillfull),
                ratio_str(self.full)
            ));
        }
        Ok(())
    }

    pub fn with(mut self, kind: RatioKind, ratio: u32) -> FullRatios {
        match kind {
            RatioKind::Nearfull => self.nearfull = ratio,
            RatioKind::Backfillfull => self.backfillfull = ratio,
            RatioKind::Full => self.full = ratio,
        }
        self
    }

    /// How full `usage` is by these ratios.
    pub fn classify(&self, usage: &OsdUsage) -> Fullness {
        let at = |ratio: u32| {
            usage.total_bytes > 0
                && u128::from(usage.used_bytes) * u128::from(RATIO_ONE)
                    >= u128::from(usage.total_bytes) * u128::from(ratio)
        };
        if at(self.full) {
            Fullness::Full
        } else if at(self.backfillfull) {
            Fullness::Backfillfull
        } else if at(self.nearfull) {
            Fullness::Nearfull
        } else {
            Fullness::Fine
        }
    }
}

/// An OSD's state against the [`FullRatios`], least full first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Fullness {
    Fine,
    /// At or past `nearfull`: a warning only.
    Nearfull,
    /// At or past `backfillfull`: backfill and recovery do not push to it.
    Backfillfull,
    /// At or past `full`: the pools it serves take no new writes.
    Full,
}

impl Fullness {
    pub fn name(self) -> &'static str {
        match self {
            Fullness::Fine => "",
            Fullness::Nearfull => "nearfull",
            Fullness::Backfillfull => "backfillfull",
            Fullness::Full => "full",
        }
    }
}

/// Bytes an OSD's store uses and may use: its `--capacity-bytes` and the store's charged
/// bytes, or its filesystem's size and use when that is smaller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsdUsage {
    pub used_bytes: u64,
    pub total_bytes: u64,
}

impl OsdUsage {
    /// Use in units of 1/[`RATIO_ONE`] (may exceed it when the store is over its capacity).
    pub fn ratio(&self) -> u64 {
        if self.total_bytes == 0 {
            return 0;
        }
        (u128::from(self.used_bytes) * u128::from(RATIO_ONE) / u128::from(self.total_bytes)) as u64
    }

    /// Use as a percentage with one decimal, e.g. "96.1%".
    pub fn percent_str(&self) -> String {
        let r = self.ratio();
        format!("{}.{}%", r / 100, (r % 100) / 10)
    }

    /// Whether a report of `self` should become a map change when the map records `old`:
    /// when it changes the OSD's [`Fullness`] under `ratios` (which must never lag), when the
    /// use moved by a percentage point or more, or when the total changed by 1% or more.
    /// Smaller moves are not worth an epoch (the map would change at every beacon).
    pub fn worth_recording(&self, old: Option<&OsdUsage>, ratios: &FullRatios) -> bool {
        let Some(old) = old else {
            return true;
        };
        if ratios.classify(self) != ratios.classify(old) {
            return true;
        }
        let moved = self.ratio().abs_diff(old.ratio()) >= u64::from(RATIO_ONE / 100);
        let resized = self.total_bytes.abs_diff(old.total_bytes) >= old.total_bytes / 100;
        moved || (resized && self.total_bytes != old.total_bytes)
    }
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
    /// The newest self-managed snapshot id handed out in this pool (0: none yet). Ids grow
    /// and are never reused, so a write's snap context (its newest id) orders it against
    /// every snapshot of the pool.
    pub snap_seq: u64,
    /// Snapshot ids deleted by their owners: their clones are trimmed in the background by
    /// each PG's primary, and no new write may name them.
    pub removed_snaps: BTreeSet<u64>,
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
    /// `pg`'s acting set is `acting` instead of what CRUSH gives it (empty: CRUSH's again).
    /// Asked for by the CRUSH primary when it must catch up before it could serve: the
    /// temporary set leads with a complete copy, so the PG serves at once (see
    /// [`OsdMap::pg_temp`]).
    PgTemp {
        pg: PgId,
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
    /// The OSD reported this use of its store (see [`OsdInfo::usage`]).
    OsdUsage {
        id: OsdId,
        usage: OsdUsage,
    },
    /// New nearfull/backfillfull/full ratios (validated by the monitor).
    FullRatios(FullRatios),
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
    /// When OSDs count as nearfull, backfillfull and full.
    pub full_ratios: FullRatios,
    /// Temporary acting sets (Ceph's `pg_temp`): while a PG's CRUSH primary catches up, the
    /// PG is served by this set, which leads with a complete copy; its primary removes the
    /// entry once every member is complete. Members that are down are skipped, as in Ceph.
    pub pg_temp: BTreeMap<PgId, Vec<OsdId>>,
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
            full_ratios: FullRatios::default(),
            pg_temp: BTreeMap::new(),
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
                            usage: None,
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
                self.pg_temp.retain(|pg, _| pg.pool != *id);
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
            Change::PgTemp { pg, acting } => {
                let known = self.pools.get(&pg.pool).is_some_and(|p| pg.seed < p.pg_num);
                if acting.is_empty() {
                    self.pg_temp.remove(pg);
                } else if known {
                    self.pg_temp.insert(*pg, acting.clone());
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
            Change::OsdUsage { id, usage } => {
                if let Some(o) = self.osds.get_mut(id) {
                    o.usage = Some(*usage);
                }
            }
            Change::FullRatios(r) => {
                // The monitor validated them; a map never holds ratios out of order.
                if r.validate().is_ok() {
                    self.full_ratios = *r;
                }
            }
        }
    }

    /// How full OSD `id` is. Only an up and in OSD counts: a down or out one takes no
    /// writes, so its last report must not stop the cluster's.
    pub fn fullness(&self, id: OsdId) -> Fullness {
        match self.osds.get(&id) {
            Some(o) if o.up && o.is_in() => o
                .usage
                .as_ref()
                .map_or(Fullness::Fine, |u| self.full_ratios.classify(u)),
            _ => Fullness::Fine,
        }
    }

    /// The OSDs at `level` or fuller, with their use.
    pub fn osds_at_least(&self, level: Fullness) -> Vec<(OsdId, OsdUsage)> {
        self.osds
            .iter()
            .filter(|(id, _)| self.fullness(**id) >= level)
            .filter_map(|(id, o)| o.usage.map(|u| (*id, u)))
            .collect()
    }

    /// The full OSDs whose fullness stops writes to `pool`: every OSD its CRUSH rule can
    /// place on. basalt has one hierarchy that every rule takes from, so a full OSD makes
    /// every pool full, as a full OSD under a pool's root does in Ceph.
    pub fn full_osds_of_pool(&self, pool: PoolId) -> Vec<OsdId> {
        if !self.pools.contains_key(&pool) {
            return Vec::new();
        }
        self.osds_at_least(Fullness::Full)
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    }

    /// Whether `pool` takes no new writes (Ceph's pool `FLAG_FULL`).
    pub fn is_pool_full(&self, pool: PoolId) -> bool {
        !self.full_osds_of_pool(pool).is_empty()
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
            snap_seq: 0,
            removed_snaps: BTreeSet::new(),
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

    /// `name` with one more self-managed snapshot id allocated; the new id is its `snap_seq`.
    pub fn pool_with_new_snap(&self, name: &str) -> Result<Pool, MapError> {
        let mut pool = self.pool_named(name)?.clone();
        pool.snap_seq += 1;
        Ok(pool)
    }

    /// `name` with snapshot `snap` marked removed. Removing an id the pool never handed out
    /// is refused (it would poison a future snapshot); removing one twice is a no-op.
    pub fn pool_with_removed_snap(&self, name: &str, snap: u64) -> Result<Pool, MapError> {
        let mut pool = self.pool_named(name)?.clone();
        if snap == 0 || snap > pool.snap_seq {
            return Err(MapError::InvalidArgument(format!(
                "pool '{name}' has not allocated snapshot id {snap} (its newest is {})",
                pool.snap_seq
            )));
        }
        pool.removed_snaps.insert(snap);
        Ok(pool)
    }

    /// Where an object of a pool lives: its PG and that PG's OSDs.
    pub fn map_object(&self, pool: &str, object: &str) -> Result<(PgId, PgMapping), MapError> {
        let pool = self.pool_named(pool)?;
        let pg = object_to_pg(&pool.placement(), object);
        let mapping = self.map_pg(pool, pg)?;
        Ok((pg, mapping))
    }

    /// Where a PG lives: CRUSH's up set, and its acting set (its `pg_temp` if it has one).
    pub fn map_pg(&self, pool: &Pool, pg: PgId) -> Result<PgMapping, MapError> {
        let temp = self.pg_temp.get(&pg).map(Vec::as_slice);
        map_pg(&self.crush, &pool.placement(), pg, self, temp).map_err(placement_error)
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

    #[test]
    fn ratios_parse_print_and_validate() {
        assert_eq!(parse_ratio("0.85"), Ok(8_500));
        assert_eq!(parse_ratio("0.9"), Ok(9_000));
        assert_eq!(parse_ratio(".875"), Ok(8_750));
        assert_eq!(parse_ratio("1"), Ok(RATIO_ONE));
        for bad in ["", ".", "0.12345", "-0.5", "x", "0.9.1", "1e-1"] {
            assert!(parse_ratio(bad).is_err(), "{bad}");
        }
        assert_eq!(ratio_str(8_500), "0.85");
        assert_eq!(ratio_str(RATIO_ONE), "1.0");
        assert_eq!(ratio_str(8_755), "0.8755");
        assert_eq!(FullRatios::default().validate(), Ok(()));
        let d = FullRatios::default();
        assert!(
            d.with(RatioKind::Full, 8_000).validate().is_err(),
            "full below backfillfull"
        );
        assert!(
            d.with(RatioKind::Nearfull, 9_100).validate().is_err(),
            "nearfull above backfillfull"
        );
        assert!(
            d.with(RatioKind::Full, 10_001).validate().is_err(),
            "above 1"
        );
        assert!(d.with(RatioKind::Nearfull, 0).validate().is_err(), "zero");
        assert_eq!(d.with(RatioKind::Full, RATIO_ONE).validate(), Ok(()));
        assert_eq!(
            d.with(RatioKind::Nearfull, 9_000).validate(),
            Ok(()),
            "equal is allowed"
        );
        assert_eq!(
            RatioKind::parse("backfillfull"),
            Ok(RatioKind::Backfillfull)
        );
        assert!(RatioKind::parse("half").is_err());
    }

    #[test]
    fn fullness_is_classified_at_each_ratio() {
        let r = FullRatios::default();
        let u = |used| OsdUsage {
            used_bytes: used,
            total_bytes: 1_000,
        };
        assert_eq!(r.classify(&u(0)), Fullness::Fine);
        assert_eq!(r.classify(&u(849)), Fullness::Fine);
        assert_eq!(r.classify(&u(850)), Fullness::Nearfull);
        assert_eq!(r.classify(&u(900)), Fullness::Backfillfull);
        assert_eq!(r.classify(&u(949)), Fullness::Backfillfull);
        assert_eq!(r.classify(&u(950)), Fullness::Full);
        assert_eq!(r.classify(&u(2_000)), Fullness::Full, "over capacity");
        let none = OsdUsage {
            used_bytes: 5,
            total_bytes: 0,
        };
        assert_eq!(r.classify(&none), Fullness::Fine, "nothing measured");
        assert_eq!(u(961).percent_str(), "96.1%");
        // Huge disks do not overflow.
        let big = OsdUsage {
            used_bytes: u64::MAX,
            total_bytes: u64::MAX,
        };
        assert_eq!(r.classify(&big), Fullness::Full);
    }

    #[test]
    fn usage_is_recorded_on_a_state_change_or_a_point_of_movement() {
        let r = FullRatios::default();
        let u = |used, total| OsdUsage {
            used_bytes: used,
            total_bytes: total,
        };
        assert!(u(1, 1_000).worth_recording(None, &r), "first report");
        let old = u(500, 1_000);
        assert!(
            !u(505, 1_000).worth_recording(Some(&old), &r),
            "half a point"
        );
        assert!(u(510, 1_000).worth_recording(Some(&old), &r), "one point");
        assert!(
            u(490, 1_000).worth_recording(Some(&old), &r),
            "one point down"
        );
        // Crossing a ratio is recorded however small the move.
        let below = u(9_499, 10_000);
        assert!(u(9_500, 10_000).worth_recording(Some(&below), &r));
        assert!(
            below.worth_recording(Some(&u(9_500, 10_000)), &r),
            "and back"
        );
        // A grown disk with the same share.
        assert!(u(1_000, 2_000).worth_recording(Some(&old), &r));
        assert!(
            !u(500, 1_005).worth_recording(Some(&old), &r),
            "tiny resize"
        );
    }

    #[test]
    fn only_up_and_in_full_osds_make_pools_full_and_raise_health() {
        let mut map = cluster();
        let pool = map.new_pool("rbd", 3, 2, 8).expect("pool");
        let i = inc(&map, vec![Change::CreatePool(pool)]);
        map.apply(&i).expect("apply");
        let usage = |used| OsdUsage {
            used_bytes: used,
            total_bytes: 100,
        };
        let i = inc(
            &map,
            vec![
                Change::OsdUsage {
                    id: 0,
                    usage: usage(96),
                },
                Change::OsdUsage {
                    id: 1,
                    usage: usage(91),
                },
                Change::OsdUsage {
                    id: 2,
                    usage: usage(86),
                },
                Change::OsdUsage {
                    id: 3,
                    usage: usage(10),
                },
            ],
        );
        map.apply(&i).expect("apply");
        assert_eq!(map.fullness(0), Fullness::Full);
        assert_eq!(map.fullness(1), Fullness::Backfillfull);
        assert_eq!(map.fullness(2), Fullness::Nearfull);
        assert_eq!(map.fullness(3), Fullness::Fine);
        assert_eq!(map.full_osds_of_pool(1), vec![0]);
        assert!(map.is_pool_full(1));
        assert!(!map.is_pool_full(9), "no such pool");
        let codes =
            |m: &OsdMap| -> Vec<String> { m.health().into_iter().map(|c| c.code).collect() };
        assert_eq!(
            codes(&map),
            ["OSD_FULL", "OSD_BACKFILLFULL", "OSD_NEARFULL", "POOL_FULL"]
        );
        let full = map.health().into_iter().next().expect("check");
        assert_eq!(full.severity, crate::Severity::Err);
        assert!(
            full.detail[0].contains("osd.0 is full at 96.0%"),
            "{:?}",
            full.detail
        );
        // Raising the full ratio clears it at once; each OSD is listed once, at its level.
        let i = inc(
            &map,
            vec![Change::FullRatios(
                FullRatios::default().with(RatioKind::Full, 9_700),
            )],
        );
        map.apply(&i).expect("apply");
        assert!(!map.is_pool_full(1));
        assert_eq!(codes(&map), ["OSD_BACKFILLFULL", "OSD_NEARFULL"]);
        assert_eq!(map.health()[0].detail.len(), 2, "osd.0 and osd.1");
        // Ratios out of order never land, whatever a buggy leader proposes.
        let bad = FullRatios {
            nearfull: 9_900,
            backfillfull: 9_000,
            full: 9_500,
        };
        let i = inc(&map, vec![Change::FullRatios(bad)]);
        map.apply(&i).expect("apply");
        assert_eq!(map.full_ratios.full, 9_700);
        // A full OSD that is down or out no longer stops writes.
        let i = inc(
            &map,
            vec![
                Change::FullRatios(FullRatios::default()),
                Change::OsdDown { id: 0 },
            ],
        );
        map.apply(&i).expect("apply");
        assert!(!map.is_pool_full(1));
        assert_eq!(map.fullness(0), Fullness::Fine);
    }
}
