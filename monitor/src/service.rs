//! OSDMap service: turns commands, OSD boots, beacons and failure reports
//! into pending [`Change`]s, and runs the down/out policy. Pure: the node
//! calls it with the time and executes what it returns.
//!
//! Only the leader has pending changes. Commands are validated against the
//! *pending* map (committed map + pending changes) so two creations of one
//! pool in the same batch are caught; the committed incremental is then
//! applied on every monitor with the total `OsdMap::apply`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use basalt_maps::{
    ratio_str, Change, Epoch, Incremental, MapError, OsdId, OsdMap, OsdUsage, RatioKind,
    DEFAULT_BLOCKLIST_SECS, KNOWN_FLAGS,
};
use basalt_placement::{PgId, WEIGHT_ONE};

/// An operator command, decoded from the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    PoolCreate {
        name: String,
        size: u32,
        min_size: u32,
        pg_num: u32,
    },
    PoolRm {
        name: String,
    },
    PoolSet {
        name: String,
        key: String,
        value: String,
    },
    OsdOut(OsdId),
    OsdIn(OsdId),
    OsdDown(OsdId),
    OsdReweight {
        id: OsdId,
        weight: u32,
    },
    OsdRm(OsdId),
    /// The operator gives up on `id`'s data: PGs waiting for it may go active without it.
    OsdLost(OsdId),
    /// A PG's primary finished peering (see `basalt_maps::PgActivation`).
    PgActivated {
        pg: PgId,
        interval: Epoch,
        acting: Vec<OsdId>,
    },
    /// A PG's CRUSH primary asks for a temporary acting set (empty: remove it); see
    /// `basalt_maps::OsdMap::pg_temp`.
    PgTemp {
        pg: PgId,
        acting: Vec<OsdId>,
    },
    BlocklistAdd {
        entity: String,
        expire_secs: u64,
    },
    BlocklistRm {
        entity: String,
    },
    SetFlag(String),
    UnsetFlag(String),
    /// `osd set-nearfull-ratio|set-backfillfull-ratio|set-full-ratio` (units of 1/10000).
    SetFullRatio {
        kind: RatioKind,
        ratio: u32,
    },
    /// Allocates the next self-managed snapshot id of a pool (librados'
    /// `selfmanaged_snap_create`).
    SnapCreate {
        pool: String,
    },
    /// Marks a self-managed snapshot id removed; the PGs trim its clones.
    SnapRemove {
        pool: String,
        snap: u64,
    },
}

/// What a committed command produced: the message for the operator, and the snapshot id a
/// `SnapCreate` allocated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub message: String,
    pub snap_id: Option<u64>,
}

/// An activation is recorded only for the interval that is current in the pending map (its
/// members being of that interval's acting set): a primary whose interval has already ended
/// must not overwrite what its successor records.
fn check_activation(
    map: &OsdMap,
    pg: PgId,
    interval: Epoch,
    acting: &[OsdId],
) -> Result<(), MapError> {
    let stale = |why: String| Err(MapError::InvalidArgument(format!("pg {pg}: {why}")));
    let Some(pool) = map.pools.get(&pg.pool) else {
        return stale(format!("pool {} does not exist", pg.pool));
    };
    if pg.seed >= pool.pg_num {
        return stale(format!("the pool has {} PGs", pool.pg_num));
    }
    if interval > map.epoch {
        return stale(format!("interval {interval} is newer than the map"));
    }
    if let Some(a) = map.pg_activations.get(&pg) {
        if a.interval > interval {
            return stale(format!(
                "interval {interval} is older than the recorded activation at {}",
                a.interval
            ));
        }
    }
    // The recorded members are the primary and the replicas already complete: a subset of
    // the current acting set, led by its primary.
    let mapping = map.map_pg(pool, pg)?;
    let current = acting.first() == mapping.acting_primary.as_ref()
        && acting.iter().all(|o| mapping.acting.contains(o));
    if !current {
        return stale(format!(
            "members {acting:?} are not of the current acting set {:?}; re-peer",
            mapping.acting
        ));
    }
    Ok(())
}

/// Checks a requested `pg_temp`: a PG that exists and, unless the request removes the entry,
/// exactly the members of its CRUSH up set (all up, each once) in another order. Only a
/// reordering is accepted: it changes who serves, never which OSDs hold the PG.
fn check_pg_temp(map: &OsdMap, pg: PgId, acting: &[OsdId]) -> Result<(), MapError> {
    let refuse = |why: String| Err(MapError::InvalidArgument(format!("pg {pg}: {why}")));
    let Some(pool) = map.pools.get(&pg.pool) else {
        return refuse(format!("pool {} does not exist", pg.pool));
    };
    if pg.seed >= pool.pg_num {
        return refuse(format!("the pool has {} PGs", pool.pg_num));
    }
    if acting.is_empty() {
        return Ok(());
    }
    let up: BTreeSet<OsdId> = map
        .map_pg(pool, pg)?
        .up
        .into_iter()
        .filter(|&o| o != basalt_placement::NONE)
        .collect();
    let asked: BTreeSet<OsdId> = acting.iter().copied().collect();
    if asked.len() != acting.len() {
        return refuse(format!("{acting:?} names an OSD twice"));
    }
    if let Some(down) = acting
        .iter()
        .find(|o| !map.osds.get(o).is_some_and(|i| i.up))
    {
        return refuse(format!("osd.{down} is not up"));
    }
    if asked != up {
        return refuse(format!(
            "{acting:?} is not a reordering of the up set {up:?}; re-peer"
        ));
    }
    Ok(())
}

/// The PGs (sorted, as `pool.seed`) whose recorded activation names OSD `id`.
fn activations_naming(map: &OsdMap, id: OsdId) -> Vec<String> {
    let mut pgs: Vec<PgId> = map
        .pg_activations
        .iter()
        .filter(|(_, a)| a.acting.contains(&id))
        .map(|(pg, _)| *pg)
        .collect();
    pgs.sort();
    pgs.iter().map(|pg| pg.to_string()).collect()
}

/// Policy knobs from `cluster.toml`.
#[derive(Clone, Debug)]
pub struct Policy {
    pub beacon_grace_ms: u64,
    pub heartbeat_grace_ms: u64,
    pub min_down_reporters: u32,
    pub down_out_interval_ms: u64,
}

pub struct OsdMapService {
    committed: Arc<OsdMap>,
    /// The incremental proposed and not yet committed (one value in flight).
    in_flight: Option<Incremental>,
    pending: Vec<Change>,
    /// committed + in_flight + pending: what commands are validated against.
    pending_map: OsdMap,
    policy: Policy,
    /// Leader-local soft state: monotonic ms of each OSD's last beacon.
    last_beacon: HashMap<OsdId, u64>,
    /// target → reporter → monotonic ms of the report.
    failure_reports: BTreeMap<OsdId, BTreeMap<OsdId, u64>>,
    /// Monotonic ms this monitor became leader: beacons are measured from then.
    leader_since_ms: u64,
}

/// Boot of an OSD daemon.
#[derive(Clone, Debug)]
pub struct Boot {
    /// The id the OSD authenticated as (`osd.N`): its key exists before it boots, so the id
    /// is chosen by whoever made the key (`basalt cluster up`, `basalt auth get-or-create
    /// osd.N`), not by the monitors.
    pub id: OsdId,
    pub uuid: String,
    pub addr: String,
    pub host: String,
    pub crush_weight: u32,
}

impl OsdMapService {
    pub fn new(committed: Arc<OsdMap>, policy: Policy) -> Self {
        OsdMapService {
            pending_map: (*committed).clone(),
            committed,
            in_flight: None,
            pending: Vec::new(),
            policy,
            last_beacon: HashMap::new(),
            failure_reports: BTreeMap::new(),
            leader_since_ms: 0,
        }
    }

    pub fn committed(&self) -> &Arc<OsdMap> {
        &self.committed
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// A new committed map arrived: rebase pending changes on it.
    pub fn on_commit(&mut self, map: Arc<OsdMap>) {
        if self
            .in_flight
            .as_ref()
            .is_some_and(|i| i.epoch <= map.epoch)
        {
            self.in_flight = None;
        }
        self.committed = map;
        self.rebuild_pending_map();
    }

    fn rebuild_pending_map(&mut self) {
        let mut m = (*self.committed).clone();
        let changes: Vec<Change> = self
            .in_flight
            .iter()
            .flat_map(|i| i.changes.iter())
            .chain(self.pending.iter())
            .cloned()
            .collect();
        apply_unnumbered(&mut m, changes);
        self.pending_map = m;
    }

    /// This monitor became leader (or stopped being it): reset soft state.
    pub fn reset(&mut self, now_ms: u64) {
        self.in_flight = None;
        self.pending.clear();
        self.last_beacon.clear();
        self.failure_reports.clear();
        self.leader_since_ms = now_ms;
        self.rebuild_pending_map();
    }

    /// Takes the pending changes as the next incremental to propose.
    pub fn take_incremental(&mut self, wall_ms: u64) -> Option<Incremental> {
        if self.pending.is_empty() || self.in_flight.is_some() {
            return None;
        }
        let inc = Incremental {
            epoch: self.committed.epoch + 1,
            stamp_ms: wall_ms.max(self.committed.modified_ms),
            changes: std::mem::take(&mut self.pending),
        };
        self.in_flight = Some(inc.clone());
        Some(inc)
    }

    /// The proposal failed (leadership lost): its changes are no longer ours to track.
    pub fn abandon_in_flight(&mut self) {
        self.in_flight = None;
        self.rebuild_pending_map();
    }

    fn push(&mut self, changes: Vec<Change>) {
        apply_unnumbered(&mut self.pending_map, changes.clone());
        self.pending.extend(changes);
    }

    /// Validates a command and queues its changes; the message describes the outcome.
    pub fn command(&mut self, cmd: Command, wall_ms: u64) -> Result<Outcome, MapError> {
        let map = &self.pending_map;
        let mut snap_id = None;
        let (changes, message) = match cmd {
            Command::SnapCreate { pool } => {
                let p = map.pool_with_new_snap(&pool)?;
                snap_id = Some(p.snap_seq);
                let msg = format!("pool '{pool}': allocated snapshot id {}", p.snap_seq);
                (vec![Change::UpdatePool(p)], msg)
            }
            Command::SnapRemove { pool, snap } => {
                let p = map.pool_with_removed_snap(&pool, snap)?;
                (
                    vec![Change::UpdatePool(p)],
                    format!("pool '{pool}': snapshot id {snap} removed"),
                )
            }
            Command::PoolCreate {
                name,
                size,
                min_size,
                pg_num,
            } => {
                let pool = map.new_pool(&name, size, min_size, pg_num)?;
                (
                    vec![Change::CreatePool(pool)],
                    format!("pool '{name}' created"),
                )
            }
            Command::PoolRm { name } => {
                let id = map.pool_named(&name)?.id;
                (
                    vec![Change::RemovePool { id }],
                    format!("pool '{name}' removed"),
                )
            }
            Command::PoolSet { name, key, value } => {
                let pool = map.pool_with(&name, &key, &value)?;
                (
                    vec![Change::UpdatePool(pool)],
                    format!("set pool '{name}' {key} to {value}"),
                )
            }
            Command::OsdOut(id) => {
                map.osd(id)?;
                (
                    vec![Change::Reweight {
                        id,
                        weight: 0,
                        auto: false,
                    }],
                    format!("marked out osd.{id}"),
                )
            }
            Command::OsdIn(id) => {
                map.osd(id)?;
                (
                    vec![Change::Reweight {
                        id,
                        weight: WEIGHT_ONE,
                        auto: false,
                    }],
                    format!("marked in osd.{id}"),
                )
            }
            Command::OsdDown(id) => {
                map.osd(id)?;
                (
                    vec![Change::OsdDown { id }],
                    format!("marked down osd.{id}"),
                )
            }
            Command::OsdReweight { id, weight } => {
                map.osd(id)?;
                if weight > WEIGHT_ONE {
                    return Err(MapError::InvalidArgument(format!(
                        "reweight must be between 0.0 and 1.0, got {:.4}",
                        weight as f64 / WEIGHT_ONE as f64
                    )));
                }
                (
                    vec![Change::Reweight {
                        id,
                        weight,
                        auto: false,
                    }],
                    format!(
                        "reweighted osd.{id} to {:.4}",
                        weight as f64 / WEIGHT_ONE as f64
                    ),
                )
            }
            Command::OsdRm(id) => {
                if map.osd(id)?.up {
                    return Err(MapError::OsdStillUp(id));
                }
                // Peering waits for every member of a PG's last activation: removing one
                // would leave that PG down for good.
                let needed = activations_naming(map, id);
                if !needed.is_empty() {
                    return Err(MapError::OsdStillNeeded {
                        id,
                        pgs: needed.join(", "),
                    });
                }
                (vec![Change::RemoveOsd { id }], format!("removed osd.{id}"))
            }
            Command::OsdLost(id) => {
                // An OSD removed before `osd rm` checked activations may still be named in
                // one: it can be declared lost all the same.
                let named = !activations_naming(map, id).is_empty();
                match map.osd(id) {
                    Ok(o) if o.up => return Err(MapError::OsdStillUp(id)),
                    Ok(_) => {}
                    Err(MapError::OsdNotFound(_)) if named => {}
                    Err(e) => return Err(e),
                }
                (
                    vec![Change::OsdLost { id }],
                    format!("marked osd.{id} lost; PGs no longer wait for its data"),
                )
            }
            Command::PgActivated {
                pg,
                interval,
                acting,
            } => {
                check_activation(map, pg, interval, &acting)?;
                (
                    vec![Change::PgActivated {
                        pg,
                        interval,
                        acting,
                    }],
                    format!("pg {pg} active from epoch {interval}"),
                )
            }
            Command::PgTemp { pg, acting } => {
                check_pg_temp(map, pg, &acting)?;
                let what = if acting.is_empty() {
                    format!("pg {pg} back on its CRUSH acting set")
                } else {
                    format!("pg {pg} acting set {acting:?} while its CRUSH primary catches up")
                };
                (vec![Change::PgTemp { pg, acting }], what)
            }
            Command::BlocklistAdd {
                entity,
                expire_secs,
            } => {
                if entity.trim().is_empty() {
                    return Err(MapError::InvalidArgument(
                        "blocklist entity must not be empty".into(),
                    ));
                }
                let secs = if expire_secs == 0 {
                    DEFAULT_BLOCKLIST_SECS
                } else {
                    expire_secs
                };
                let expires_ms = wall_ms.saturating_add(secs.saturating_mul(1000));
                (
                    vec![Change::BlocklistAdd {
                        entity: entity.clone(),
                        expires_ms,
                    }],
                    format!("blocklisting {entity} for {secs} s"),
                )
            }
            Command::BlocklistRm { entity } => {
                if !map.blocklist.contains_key(&entity) {
                    return Err(MapError::InvalidArgument(format!(
                        "{entity} is not blocklisted"
                    )));
                }
                (
                    vec![Change::BlocklistRemove {
                        entity: entity.clone(),
                    }],
                    format!("un-blocklisted {entity}"),
                )
            }
            Command::SetFlag(flag) => {
                check_flag(&flag)?;
                (
                    vec![Change::SetFlag(flag.clone())],
                    format!("{flag} is set"),
                )
            }
            Command::UnsetFlag(flag) => {
                check_flag(&flag)?;
                (
                    vec![Change::UnsetFlag(flag.clone())],
                    format!("{flag} is unset"),
                )
            }
            Command::SetFullRatio { kind, ratio } => {
                let ratios = map.full_ratios.with(kind, ratio);
                ratios.validate()?;
                (
                    vec![Change::FullRatios(ratios)],
                    format!("{}_ratio set to {}", kind.name(), ratio_str(ratio)),
                )
            }
        };
        self.push(changes);
        Ok(Outcome { message, snap_id })
    }

    /// An OSD daemon booted as `boot.id`: check the id is its store's (or free) and mark it
    /// up (and in).
    pub fn boot(&mut self, boot: Boot, now_ms: u64) -> Result<OsdId, MapError> {
        if boot.addr.is_empty() || boot.host.is_empty() || boot.uuid.is_empty() {
            return Err(MapError::InvalidArgument(
                "osd boot needs a uuid, an address and a host".into(),
            ));
        }
        let map = &self.pending_map;
        let existing = map
            .osds
            .iter()
            .find(|(_, o)| o.uuid == boot.uuid)
            .map(|(id, o)| (*id, o.clone()));
        if let Some((id, _)) = &existing {
            if *id != boot.id {
                return Err(MapError::InvalidArgument(format!(
                    "this OSD's store (uuid {}) is osd.{id}, but it authenticated as osd.{}: start it with osd.{id}'s keyring",
                    boot.uuid, boot.id
                )));
            }
        } else if let Some(other) = map.osds.get(&boot.id) {
            return Err(MapError::InvalidArgument(format!(
                "osd.{} belongs to another store (uuid {}); give this OSD a key of its own id, or `basalt osd rm {}` the old one first",
                boot.id, other.uuid, boot.id
            )));
        }
        let mut changes = Vec::new();
        let id = match existing {
            Some((id, info)) => {
                if info.host != boot.host {
                    let weight = if boot.crush_weight > 0 {
                        boot.crush_weight
                    } else {
                        map.crush.osd_weight(id).unwrap_or(WEIGHT_ONE)
                    };
                    changes.push(Change::NewOsd {
                        id,
                        uuid: boot.uuid.clone(),
                        host: boot.host.clone(),
                        crush_weight: weight,
                    });
                } else if boot.crush_weight > 0
                    && map.crush.osd_weight(id) != Some(boot.crush_weight)
                {
                    changes.push(Change::CrushWeight {
                        id,
                        weight: boot.crush_weight,
                    });
                }
                if info.auto_out && !map.has_flag("noin") {
                    changes.push(Change::Reweight {
                        id,
                        weight: WEIGHT_ONE,
                        auto: false,
                    });
                }
                id
            }
            None => {
                let id = boot.id;
                changes.push(Change::NewOsd {
                    id,
                    uuid: boot.uuid.clone(),
                    host: boot.host.clone(),
                    crush_weight: if boot.crush_weight > 0 {
                        boot.crush_weight
                    } else {
                        WEIGHT_ONE
                    },
                });
                if map.has_flag("noin") {
                    changes.push(Change::Reweight {
                        id,
                        weight: 0,
                        auto: false,
                    });
                }
                id
            }
        };
        changes.push(Change::OsdUp {
            id,
            addr: boot.addr,
        });
        self.push(changes);
        self.last_beacon.insert(id, now_ms);
        self.failure_reports.remove(&id);
        Ok(id)
    }

    /// A beacon from OSD `id`, with its store's use when it measured one. The use becomes
    /// a map change only when it is worth an epoch ([`OsdUsage::worth_recording`]): always
    /// when it moves the OSD across a ratio, so fullness in the map never lags a report.
    pub fn beacon(
        &mut self,
        id: OsdId,
        usage: Option<OsdUsage>,
        now_ms: u64,
    ) -> Result<(), MapError> {
        let recorded = self.pending_map.osd(id)?.usage;
        self.last_beacon.insert(id, now_ms);
        if let Some(usage) = usage.filter(|u| u.total_bytes > 0) {
            if usage.worth_recording(recorded.as_ref(), &self.pending_map.full_ratios) {
                self.push(vec![Change::OsdUsage { id, usage }]);
            }
        }
        Ok(())
    }

    /// `reporter`, whose newest map is `epoch`, cannot reach `target` (or, with
    /// `still_failed` false, can again). Acted on at the next tick: reports from
    /// `min_down_reporters` distinct hosts other than the target's mark it down at once, with
    /// no grace of the monitor's own (the reporters already waited theirs, or saw the
    /// connection refused). A report made before the target's latest boot is about its
    /// previous life and is dropped, so a restarted OSD is not marked down by it.
    pub fn failure_report(
        &mut self,
        reporter: OsdId,
        target: OsdId,
        epoch: Epoch,
        still_failed: bool,
        now_ms: u64,
    ) -> Result<(), MapError> {
        self.pending_map.osd(reporter)?;
        let up_from = self.pending_map.osd(target)?.up_from;
        if still_failed && epoch < up_from {
            return Ok(());
        }
        let reports = self.failure_reports.entry(target).or_default();
        if still_failed {
            reports.insert(reporter, now_ms);
        } else {
            reports.remove(&reporter);
        }
        Ok(())
    }

    /// Periodic leader policy: beacon timeouts and failure reports mark OSDs
    /// down; long-down OSDs are marked out; expired blocklist entries go.
    pub fn tick(&mut self, now_ms: u64, wall_ms: u64) {
        let map = &self.pending_map;
        let mut changes = Vec::new();
        let nodown = map.has_flag("nodown");
        for (&id, osd) in &map.osds {
            if !osd.up || nodown {
                continue;
            }
            let last = self
                .last_beacon
                .get(&id)
                .copied()
                .unwrap_or(self.leader_since_ms)
                .max(self.leader_since_ms);
            let beacon_lost = now_ms.saturating_sub(last) > self.policy.beacon_grace_ms;
            let reporter_hosts: std::collections::BTreeSet<&str> = self
                .failure_reports
                .get(&id)
                .into_iter()
                .flatten()
                .filter(|(_, &at)| now_ms.saturating_sub(at) <= self.policy.heartbeat_grace_ms * 2)
                .filter_map(|(r, _)| map.osds.get(r).filter(|o| o.up).map(|o| o.host.as_str()))
                .filter(|h| *h != osd.host)
                .collect();
            let reported = reporter_hosts.len() as u32 >= self.policy.min_down_reporters.max(1);
            if beacon_lost || reported {
                changes.push(Change::OsdDown { id });
            }
        }
        if !map.has_flag("noout") {
            for (&id, osd) in &map.osds {
                if !osd.up
                    && osd.is_in()
                    && osd.down_stamp_ms > 0
                    && wall_ms.saturating_sub(osd.down_stamp_ms) >= self.policy.down_out_interval_ms
                {
                    changes.push(Change::Reweight {
                        id,
                        weight: 0,
                        auto: true,
                    });
                }
            }
        }
        for (entity, &expires) in &map.blocklist {
            if expires <= wall_ms {
                changes.push(Change::BlocklistRemove {
                    entity: entity.clone(),
                });
            }
        }
        for change in &changes {
            if let Change::OsdDown { id } = change {
                self.failure_reports.remove(id);
            }
        }
        self.push(changes);
    }
}

/// Applies changes to a scratch map without advancing its epoch: the pending
/// map stays "committed epoch" so ids and epochs derived from it are right.
fn apply_unnumbered(map: &mut OsdMap, changes: Vec<Change>) {
    if changes.is_empty() {
        return;
    }
    let epoch = map.epoch;
    let inc = Incremental {
        epoch: epoch + 1,
        stamp_ms: map.modified_ms,
        changes,
    };
    // The epoch is right by construction, so apply cannot fail.
    let _ = map.apply(&inc);
    map.epoch = epoch;
}

fn check_flag(flag: &str) -> Result<(), MapError> {
    if KNOWN_FLAGS.contains(&flag) {
        Ok(())
    } else {
        Err(MapError::UnknownFlag(flag.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            beacon_grace_ms: 1_000,
            heartbeat_grace_ms: 1_000,
            min_down_reporters: 2,
            down_out_interval_ms: 10_000,
        }
    }

    /// Commits whatever is pending, as the node does after Paxos agrees.
    fn commit(svc: &mut OsdMapService, wall_ms: u64) {
        if let Some(inc) = svc.take_incremental(wall_ms) {
            let mut map = (**svc.committed()).clone();
            map.apply(&inc).expect("apply");
            svc.on_commit(Arc::new(map));
        }
    }

    fn booted(n: u32) -> OsdMapService {
        let mut svc = OsdMapService::new(Arc::new(OsdMap::new("fsid")), policy());
        svc.reset(0);
        for i in 0..n {
            let boot = Boot {
                id: i,
                uuid: format!("u{i}"),
                addr: format!("a{i}"),
                host: format!("h{}", i / 2),
                crush_weight: 0,
            };
            assert_eq!(svc.boot(boot, 0), Ok(i));
        }
        commit(&mut svc, 1);
        svc
    }

    #[test]
    fn duplicate_pool_in_flight_or_pending_is_refused() {
        let mut svc = booted(0);
        let create = || Command::PoolCreate {
            name: "rbd".into(),
            size: 3,
            min_size: 2,
            pg_num: 8,
        };
        svc.command(create(), 0).expect("first");
        assert_eq!(
            svc.command(create(), 0),
            Err(MapError::PoolExists("rbd".into()))
        );
        let inc = svc.take_incremental(0).expect("proposal");
        // In flight, not committed: still a duplicate.
        assert_eq!(
            svc.command(create(), 0),
            Err(MapError::PoolExists("rbd".into()))
        );
        // A second pool gets the next id even before the first commits.
        svc.command(
            Command::PoolCreate {
                name: "two".into(),
                size: 3,
                min_size: 2,
                pg_num: 8,
            },
            0,
        )
        .expect("second");
        let mut map = (**svc.committed()).clone();
        map.apply(&inc).expect("apply");
        svc.on_commit(Arc::new(map));
        commit(&mut svc, 0);
        let map = svc.committed();
        assert_eq!(map.pool_named("rbd").map(|p| p.id), Ok(1));
        assert_eq!(map.pool_named("two").map(|p| p.id), Ok(2));
    }

    #[test]
    fn boot_keeps_ids_by_uuid_and_checks_the_authenticated_id() {
        let mut svc = booted(4);
        let again = Boot {
            id: 2,
            uuid: "u2".into(),
            addr: "new".into(),
            host: "h1".into(),
            crush_weight: 0,
        };
        assert_eq!(svc.boot(again, 5), Ok(2));
        // A store booting under another id's key, or a new store under a taken id: refused.
        let wrong = Boot {
            id: 1,
            uuid: "u2".into(),
            addr: "new".into(),
            host: "h1".into(),
            crush_weight: 0,
        };
        assert!(matches!(
            svc.boot(wrong, 5),
            Err(MapError::InvalidArgument(_))
        ));
        let taken = Boot {
            id: 3,
            uuid: "u8".into(),
            addr: "y".into(),
            host: "h8".into(),
            crush_weight: 0,
        };
        assert!(matches!(
            svc.boot(taken, 5),
            Err(MapError::InvalidArgument(_))
        ));
        let fresh = Boot {
            id: 4,
            uuid: "u9".into(),
            addr: "x".into(),
            host: "h9".into(),
            crush_weight: 0,
        };
        assert_eq!(svc.boot(fresh, 5), Ok(4));
        commit(&mut svc, 2);
        let map = svc.committed();
        assert_eq!(map.osds[&2].addr, "new");
        assert_eq!(map.osds[&4].host, "h9");
        assert_eq!(map.crush.osd_host(4), Some("h9"));
    }

    #[test]
    fn silent_osds_go_down_then_out_unless_noout() {
        let mut svc = booted(4);
        for t in (0..=1_500).step_by(100) {
            for id in 0..3 {
                svc.beacon(id, None, t).expect("beacon");
            }
            svc.tick(t, 1_000 + t);
        }
        commit(&mut svc, 2_500);
        let map = svc.committed().clone();
        assert!(!map.osds[&3].up, "silent osd.3 is down");
        assert!((0..3).all(|id| map.osds[&id].up));
        assert!(map.osds[&3].is_in(), "not out before the interval");
        svc.tick(1_600, 2_500 + 9_000);
        assert!(!svc.has_pending());
        svc.command(Command::SetFlag("noout".into()), 0)
            .expect("noout");
        commit(&mut svc, 3_000);
        svc.tick(1_700, 2_500 + 20_000);
        assert!(!svc.has_pending(), "noout keeps it in");
        svc.command(Command::UnsetFlag("noout".into()), 0)
            .expect("unset");
        svc.tick(1_800, 2_500 + 20_000);
        commit(&mut svc, 3_000);
        let map = svc.committed();
        assert!(!map.osds[&3].is_in() && map.osds[&3].auto_out);
        // It comes back: marked in again.
        let boot = Boot {
            id: 3,
            uuid: "u3".into(),
            addr: "a3".into(),
            host: "h1".into(),
            crush_weight: 0,
        };
        svc.boot(boot, 1_900).expect("boot");
        commit(&mut svc, 4_000);
        assert!(svc.committed().osds[&3].up && svc.committed().osds[&3].is_in());
    }

    #[test]
    fn failure_reports_need_distinct_other_hosts() {
        let mut svc = booted(6);
        let beat = |svc: &mut OsdMapService, t| {
            for id in 0..6 {
                svc.beacon(id, None, t).expect("beacon");
            }
        };
        beat(&mut svc, 100);
        let e = svc.committed().epoch;
        // osd.1 shares osd.0's host: its report does not count.
        svc.failure_report(1, 0, e, true, 100).expect("report");
        svc.failure_report(2, 0, e, true, 100).expect("report");
        svc.tick(200, 0);
        assert!(!svc.has_pending(), "one other host is not enough");
        svc.failure_report(4, 0, e, true, 150).expect("report");
        svc.tick(200, 0);
        commit(&mut svc, 1);
        assert!(!svc.committed().osds[&0].up);
        assert_eq!(
            svc.failure_report(9, 0, e, true, 0),
            Err(MapError::OsdNotFound(9))
        );
    }

    #[test]
    fn reports_from_before_the_targets_boot_are_dropped() {
        let mut svc = booted(6);
        for id in 0..6 {
            svc.beacon(id, None, 100).expect("beacon");
        }
        let before = svc.committed().epoch;
        svc.command(Command::OsdDown(0), 0).expect("down");
        commit(&mut svc, 1);
        let boot = Boot {
            id: 0,
            uuid: "u0".into(),
            addr: "a0".into(),
            host: "h0".into(),
            crush_weight: 0,
        };
        assert_eq!(svc.boot(boot, 100), Ok(0));
        commit(&mut svc, 1);
        let up_from = svc.committed().osds[&0].up_from;
        assert!(svc.committed().osds[&0].up && up_from > before);
        // Two hosts saw the old incarnation refuse connections, and tell only now.
        svc.failure_report(2, 0, before, true, 150).expect("report");
        svc.failure_report(4, 0, before, true, 150).expect("report");
        svc.tick(200, 0);
        assert!(
            !svc.has_pending(),
            "stale reports must not mark the new boot down"
        );
        // The same reporters, having seen the boot, still count.
        svc.failure_report(2, 0, up_from, true, 160)
            .expect("report");
        svc.failure_report(4, 0, up_from, true, 160)
            .expect("report");
        svc.tick(200, 0);
        commit(&mut svc, 1);
        assert!(!svc.committed().osds[&0].up);
    }

    #[test]
    fn blocklist_entries_expire() {
        let mut svc = booted(0);
        svc.command(
            Command::BlocklistAdd {
                entity: "client.a".into(),
                expire_secs: 10,
            },
            1_000,
        )
        .expect("add");
        commit(&mut svc, 1_000);
        assert!(svc.committed().is_blocklisted("client.a", 5_000));
        svc.tick(0, 10_999);
        assert!(!svc.has_pending());
        svc.tick(0, 11_000);
        commit(&mut svc, 11_000);
        assert!(svc.committed().blocklist.is_empty());
    }

    /// Six booted OSDs and a committed pool `rbd` (size 3, 8 PGs): the service, its map,
    /// PG 3 of the pool and that PG's acting set.
    fn with_pool_pg() -> (OsdMapService, Arc<OsdMap>, PgId, Vec<OsdId>) {
        let mut svc = booted(6);
        commit(&mut svc, 0);
        let create = Command::PoolCreate {
            name: "rbd".into(),
            size: 3,
            min_size: 2,
            pg_num: 8,
        };
        svc.command(create, 0).expect("pool");
        commit(&mut svc, 0);
        let map = svc.committed().clone();
        let pool = map.pool_named("rbd").expect("pool").clone();
        let pg = PgId {
            pool: pool.id,
            seed: 3,
        };
        let acting = map.map_pg(&pool, pg).expect("map").acting;
        (svc, map, pg, acting)
    }

    #[test]
    fn a_pg_temp_reorders_the_up_set_and_moves_the_acting_primary() {
        let (mut svc, _, pg, acting) = with_pool_pg();
        let temp = |acting: Vec<OsdId>| Command::PgTemp { pg, acting };
        let mut reordered = acting.clone();
        reordered.rotate_left(1);
        // A duplicate, a shorter set, an OSD outside the up set: refused.
        assert!(svc
            .command(temp(vec![reordered[0], reordered[0], reordered[2]]), 0)
            .is_err());
        assert!(svc.command(temp(reordered[..2].to_vec()), 0).is_err());
        let outsider = (0..6).find(|o| !acting.contains(o)).expect("an outsider");
        assert!(svc
            .command(temp(vec![outsider, acting[1], acting[2]]), 0)
            .is_err());
        svc.command(temp(reordered.clone()), 0).expect("reordering");
        commit(&mut svc, 0);
        let m = svc.committed().clone();
        let mapping = m.map_pg(&m.pools[&pg.pool], pg).expect("map");
        assert_eq!(mapping.acting, reordered);
        assert_eq!(mapping.acting_primary, Some(reordered[0]));
        assert_eq!(mapping.up_primary, Some(acting[0]));
        svc.command(temp(vec![]), 0).expect("removal");
        commit(&mut svc, 0);
        let m = svc.committed().clone();
        assert_eq!(
            m.map_pg(&m.pools[&pg.pool], pg).expect("map").acting,
            acting
        );
        assert!(m.pg_temp.is_empty());
    }

    #[test]
    fn activations_are_recorded_only_for_the_current_interval() {
        let (mut svc, map, pg, acting) = with_pool_pg();
        let activate = |interval, acting: Vec<OsdId>| Command::PgActivated {
            pg,
            interval,
            acting,
        };
        // Members outside the acting set or not led by its primary, a future interval and
        // an unknown PG are refused.
        assert!(svc
            .command(activate(map.epoch, vec![acting[0], 99]), 0)
            .is_err());
        assert!(svc
            .command(activate(map.epoch, vec![acting[1]]), 0)
            .is_err());
        assert!(svc
            .command(activate(map.epoch + 5, acting.clone()), 0)
            .is_err());
        let unknown = Command::PgActivated {
            pg: PgId { pool: 9, seed: 0 },
            interval: 1,
            acting: acting.clone(),
        };
        assert!(svc.command(unknown, 0).is_err());
        svc.command(activate(map.epoch, acting.clone()), 0)
            .expect("current interval");
        commit(&mut svc, 0);
        let rec = svc.committed().pg_activations[&pg].clone();
        assert_eq!(
            (rec.interval, rec.acting.clone()),
            (map.epoch, acting.clone())
        );
        // An older interval may not overwrite a newer record.
        assert!(svc
            .command(activate(map.epoch - 1, acting.clone()), 0)
            .is_err());
        // Losing an OSD takes it out of every record; it must be down first.
        assert!(svc.command(Command::OsdLost(acting[1]), 0).is_err());
        svc.command(Command::OsdDown(acting[1]), 0).expect("down");
        svc.command(Command::OsdLost(acting[1]), 0).expect("lost");
        commit(&mut svc, 0);
        assert!(!svc.committed().pg_activations[&pg]
            .acting
            .contains(&acting[1]));
        // Removing the pool removes its records.
        svc.command(Command::PoolRm { name: "rbd".into() }, 0)
            .expect("rm");
        commit(&mut svc, 0);
        assert!(svc.committed().pg_activations.is_empty());
    }

    /// `osd rm` is refused while a recorded activation names the OSD (peering would wait for
    /// it forever); `osd lost` releases it, after which it can be removed. An OSD removed
    /// while still named (by a version before this check) can still be declared lost.
    #[test]
    fn osd_rm_is_refused_while_an_activation_needs_the_osd() {
        let (mut svc, map, pg, acting) = with_pool_pg();
        svc.command(
            Command::PgActivated {
                pg,
                interval: map.epoch,
                acting: acting.clone(),
            },
            0,
        )
        .expect("activate");
        commit(&mut svc, 0);
        let victim = acting[1];
        svc.command(Command::OsdDown(victim), 0).expect("down");
        commit(&mut svc, 0);
        match svc.command(Command::OsdRm(victim), 0) {
            Err(MapError::OsdStillNeeded { id, pgs }) => {
                assert_eq!(id, victim);
                assert_eq!(pgs, pg.to_string());
            }
            other => panic!("osd rm of a needed OSD: {other:?}"),
        }
        let msg = MapError::OsdStillNeeded {
            id: victim,
            pgs: pg.to_string(),
        }
        .to_string();
        assert!(msg.contains(&format!("basalt osd lost {victim}")), "{msg}");
        assert!(svc.committed().osds.contains_key(&victim));
        // Lost, then removed.
        svc.command(Command::OsdLost(victim), 0).expect("lost");
        commit(&mut svc, 0);
        svc.command(Command::OsdRm(victim), 0)
            .expect("rm after lost");
        commit(&mut svc, 0);
        assert!(!svc.committed().osds.contains_key(&victim));

        // A record naming an OSD that no longer exists (removed by an older version):
        // `osd lost` still releases the PG; an id named nowhere is still unknown.
        let ghost = 77;
        let mut map = (**svc.committed()).clone();
        map.pg_activations.insert(
            pg,
            basalt_maps::PgActivation {
                interval: map.epoch,
                acting: vec![acting[0], ghost],
            },
        );
        let mut svc = OsdMapService::new(Arc::new(map), policy());
        svc.reset(0);
        svc.command(Command::OsdLost(ghost), 0)
            .expect("lost of a removed OSD still named");
        commit(&mut svc, 0);
        assert_eq!(svc.committed().pg_activations[&pg].acting, vec![acting[0]]);
        assert!(matches!(
            svc.command(Command::OsdLost(78), 0),
            Err(MapError::OsdNotFound(78))
        ));
    }

    /// Beacons carry each OSD's use; the leader records a use worth an epoch, and the map it
    /// commits classifies the OSD against the ratios an operator can change.
    #[test]
    fn beacons_mark_osds_nearfull_backfillfull_and_full() {
        use basalt_maps::Fullness;
        let mut svc = booted(4);
        let usage = |used| {
            Some(OsdUsage {
                used_bytes: used,
                total_bytes: 1_000,
            })
        };
        svc.beacon(0, usage(100), 10).expect("beacon");
        svc.beacon(1, None, 10).expect("beacon without use");
        svc.beacon(
            2,
            Some(OsdUsage {
                used_bytes: 0,
                total_bytes: 0,
            }),
            10,
        )
        .expect("beacon");
        commit(&mut svc, 1);
        let map = svc.committed().clone();
        assert_eq!(map.osds[&0].usage, usage(100));
        assert_eq!(map.osds[&1].usage, None);
        assert_eq!(
            map.osds[&2].usage, None,
            "an unmeasured total is not recorded"
        );
        // A move of under a point is not worth an epoch.
        svc.beacon(0, usage(105), 20).expect("beacon");
        assert!(!svc.has_pending());
        for (used, want) in [
            (860, Fullness::Nearfull),
            (900, Fullness::Backfillfull),
            (950, Fullness::Full),
            (949, Fullness::Backfillfull),
            (100, Fullness::Fine),
        ] {
            svc.beacon(0, usage(used), 30).expect("beacon");
            // The same report again while the first is pending adds nothing.
            svc.beacon(0, usage(used), 31).expect("beacon");
            let inc = svc.take_incremental(0).expect("a change");
            assert_eq!(inc.changes.len(), 1, "{:?}", inc.changes);
            let mut map = (**svc.committed()).clone();
            map.apply(&inc).expect("apply");
            svc.on_commit(Arc::new(map));
            assert_eq!(svc.committed().fullness(0), want, "at {used}/1000");
        }
        // Lowering the full ratio makes a backfillfull OSD full without a new report.
        svc.beacon(0, usage(920), 40).expect("beacon");
        commit(&mut svc, 2);
        assert_eq!(svc.committed().fullness(0), Fullness::Backfillfull);
        let set = |kind, ratio| Command::SetFullRatio { kind, ratio };
        svc.command(set(RatioKind::Backfillfull, 8_800), 0)
            .expect("backfillfull down");
        svc.command(set(RatioKind::Full, 9_100), 0)
            .expect("full down");
        commit(&mut svc, 3);
        assert_eq!(svc.committed().fullness(0), Fullness::Full);
    }

    #[test]
    fn ratio_commands_keep_the_order_against_pending_changes() {
        let mut svc = booted(0);
        let set = |kind, ratio| Command::SetFullRatio { kind, ratio };
        assert!(svc.command(set(RatioKind::Full, 8_000), 0).is_err());
        assert!(svc.command(set(RatioKind::Nearfull, 9_600), 0).is_err());
        assert!(svc.command(set(RatioKind::Full, 10_001), 0).is_err());
        // Raised in the right order within one batch: each is checked against the pending
        // map, so the second sees the first.
        svc.command(set(RatioKind::Full, 9_800), 0)
            .expect("full up");
        svc.command(set(RatioKind::Backfillfull, 9_700), 0)
            .expect("backfillfull up");
        svc.command(set(RatioKind::Nearfull, 9_600), 0)
            .expect("nearfull up");
        assert_eq!(
            svc.command(set(RatioKind::Full, 9_500), 0)
                .expect_err("below backfillfull")
                .to_string(),
            "invalid argument: ratios must keep nearfull <= backfillfull <= full, and would be \
             0.96 / 0.97 / 0.95; change the others first"
        );
        commit(&mut svc, 1);
        let r = svc.committed().full_ratios;
        assert_eq!((r.nearfull, r.backfillfull, r.full), (9_600, 9_700, 9_800));
    }
}
