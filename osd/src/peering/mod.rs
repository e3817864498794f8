//! Peering's decisions, pure: which copy of a PG is authoritative, whether the PG may go
//! active at all, and how each other copy catches up with it — from the log, or by backfill.
//! No IO and no clock. [`round`] puts these rules in order as one peering round, a sans-IO
//! state machine ([`PeeringRound`]) that [`crate::service`] drives with real queries, pushes
//! and monitor calls, and that `sim.rs` (tests only) drives with a simulated network, crashes
//! and map changes against an oracle (`PG_SIM_SEED` replays one seed).
//!
//! # The rules
//!
//! - **Split-brain guard.** A write is acknowledged only after every acting member committed
//!   it, and a primary records its interval's complete members in the OSDMap
//!   ([`basalt_maps::PgActivation`]) after recovery and before its first write. So every
//!   member of the recorded set holds every acknowledged write, and so does every copy made
//!   complete in that interval or a later one (`les` ≥ the recorded interval): nothing is
//!   acknowledged in an interval before it is recorded. Only such a copy may be the
//!   authority. A recorded member that answers is not enough: a later peering that never got
//!   recorded may have told it that it lacks objects (writes of an interval that never
//!   served), which bars it — the seeded simulation found a stale copy chosen that way. With
//!   no such copy the PG is [`Blocked::Down`] until a recorded member returns (or an operator
//!   declares them lost).
//! - **Authority** (Ceph's `find_best_info`): among complete copies (not partway through a
//!   backfill), the newest `les` (last interval the copy was activated in), then the newest
//!   `last_update`, then the primary, then the lowest id. The `les` rule rolls back writes a
//!   member applied in an interval that later peerings superseded without it (divergent
//!   entries, never acknowledged).
//! - **Catch-up** ([`catchup`]): a copy whose log shares an entry with the authority's gets
//!   exactly the objects named after that shared point, in either log (missing writes and
//!   divergent ones). Otherwise — its history was trimmed from the authority's log, or a
//!   backfill was interrupted — it is **backfilled**: both copies are scanned in listing order,
//!   range by range, and each range's differences are copied with a cursor the target
//!   persists atomically with the data, so an interrupted backfill resumes where it stopped.

use std::collections::{BTreeMap, BTreeSet};

use basalt_maps::{Epoch, PgActivation};
use basalt_ops::{Eversion, LogEntry};
use basalt_placement::OsdId;
use serde::{Deserialize, Serialize};

use crate::pg::ObjectName;

pub mod round;
#[cfg(test)]
mod sim;

pub use round::{PeeringRound, RoundAction, RoundEvent, RoundOutcome, RoundSetup};

/// What a copy of a PG keeps about itself beyond objects and log (stored as the PG info).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgInfo {
    /// Epoch of the last interval this copy was activated in (Ceph's last_epoch_started).
    pub les: Epoch,
    /// Set while this copy is being backfilled: it then holds a mix of old and new objects
    /// and must not be anyone's authority.
    pub backfill: Option<BackfillProgress>,
    /// Objects this copy may still lack or hold stale although its log is current: set when
    /// its PG went active before recovering it (a superset: an object recovered since may
    /// still be listed). A copy with missing objects is never anyone's authority.
    pub missing: Vec<ObjectName>,
    /// The copy's `last_update` is at least this even when its log says less: a PG split
    /// from a parent continues the parent's version sequence (its log holds only its own
    /// objects' share of the parent's entries, maybe none), and activation carries it on.
    pub last_update_floor: Eversion,
}

/// [`PgInfo`] as stored before splitting existed (postcard has no optional trailing
/// fields): read back as a `PgInfo` with no floor.
#[derive(Deserialize)]
struct PgInfoV1 {
    les: Epoch,
    backfill: Option<BackfillProgress>,
    missing: Vec<ObjectName>,
}

impl PgInfo {
    /// Decodes a stored info of this or the previous layout.
    pub fn decode(b: &[u8]) -> Result<PgInfo, basalt_ops::OpError> {
        if let Ok(info) = postcard::from_bytes::<PgInfo>(b) {
            return Ok(info);
        }
        let v1: PgInfoV1 = basalt_ops::decode(b, "PG info")?;
        Ok(PgInfo {
            les: v1.les,
            backfill: v1.backfill,
            missing: v1.missing,
            last_update_floor: Eversion::ZERO,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackfillProgress {
    /// The authority's `last_update` the backfill copies: a resumed backfill may skip what
    /// is done only if the authority has not moved since.
    pub target: Eversion,
    /// Every object up to this one (inclusive, in the store's listing order) already equals
    /// the authority's.
    pub done_through: Option<ObjectName>,
}

/// What a copy tells the primary during peering.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerState {
    pub info: PgInfo,
    /// The newest version in the copy's log.
    pub last_update: Eversion,
    pub log: Vec<LogEntry>,
}

/// Why a PG cannot go active.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blocked {
    /// No copy complete in the last interval that served writes (or later) answered; these
    /// members of that interval, which hold every acknowledged write, did not.
    Down { waiting_for: Vec<OsdId> },
    /// Copies answered, but none is complete.
    Incomplete { why: String },
}

impl std::fmt::Display for Blocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Blocked::Down { waiting_for } => {
                let osds: Vec<String> = waiting_for.iter().map(|o| format!("osd.{o}")).collect();
                write!(
                    f,
                    "waiting for {} (the last interval that served writes); start one, or `basalt osd lost ID` to give up its writes",
                    osds.join(" or ")
                )
            }
            Blocked::Incomplete { why } => f.write_str(why),
        }
    }
}

/// Picks the authoritative copy among `states` (see the module docs), or says why the PG
/// must wait.
pub fn choose_authority(
    primary: OsdId,
    activation: Option<&PgActivation>,
    states: &BTreeMap<OsdId, PeerState>,
) -> Result<OsdId, Blocked> {
    // An operator who declared every recorded member lost gave up their writes.
    let record = activation.filter(|a| !a.acting.is_empty());
    let whole = |s: &PeerState| s.info.backfill.is_none() && s.info.missing.is_empty();
    // Complete in the recorded interval or later (see the module docs): holds every
    // acknowledged write.
    let current = |s: &PeerState| record.is_none_or(|a| s.info.les >= a.interval);
    let best = states
        .iter()
        .filter(|(_, s)| whole(s) && current(s))
        .max_by(|(a, sa), (b, sb)| {
            sa.info
                .les
                .cmp(&sb.info.les)
                .then_with(|| sa.last_update.cmp(&sb.last_update))
                .then_with(|| (**a == primary).cmp(&(**b == primary)))
                .then_with(|| b.cmp(a))
        })
        .map(|(osd, _)| *osd);
    if let Some(osd) = best {
        return Ok(osd);
    }
    let silent: Vec<OsdId> = record
        .iter()
        .flat_map(|a| a.acting.iter().copied())
        .filter(|o| !states.contains_key(o))
        .collect();
    if !silent.is_empty() {
        return Err(Blocked::Down {
            waiting_for: silent,
        });
    }
    Err(Blocked::Incomplete {
        why: format!(
            "every copy that answered ({}) is partway through a recovery or backfill",
            states
                .keys()
                .map(|o| format!("osd.{o}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })
}

/// How one copy becomes equal to the authority.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Catchup {
    /// Same log, nothing to copy.
    UpToDate,
    /// Copy these objects from the authority (removing those it no longer has), then take
    /// its log.
    Log { objects: Vec<ObjectName> },
    /// Compare whole object lists, starting after `after` (None: from the beginning).
    Backfill { after: Option<ObjectName> },
}

fn entry_name(e: &LogEntry) -> ObjectName {
    (e.namespace.clone(), e.object.clone())
}

/// Decides how `peer` catches up with `auth` (see the module docs).
pub fn catchup(auth: &PeerState, peer: &PeerState) -> Catchup {
    if let Some(b) = &peer.info.backfill {
        let after = if b.target == auth.last_update {
            b.done_through.clone()
        } else {
            None
        };
        return Catchup::Backfill { after };
    }
    let by_log = catchup_by_log(auth, peer);
    if peer.info.missing.is_empty() {
        return by_log;
    }
    let mut objects: BTreeSet<ObjectName> = peer.info.missing.iter().cloned().collect();
    match by_log {
        Catchup::Log { objects: more } => objects.extend(more),
        Catchup::UpToDate => {}
        backfill @ Catchup::Backfill { .. } => return backfill,
    }
    Catchup::Log {
        objects: objects.into_iter().collect(),
    }
}

/// [`catchup`] from the logs alone.
fn catchup_by_log(auth: &PeerState, peer: &PeerState) -> Catchup {
    if peer.last_update == auth.last_update && peer.log == auth.log {
        return Catchup::UpToDate;
    }
    let auth_at: BTreeMap<u64, &LogEntry> = auth.log.iter().map(|e| (e.version.seq, e)).collect();
    // The newest entry both histories hold: everything before it is equal on both.
    let shared = peer
        .log
        .iter()
        .rev()
        .find(|e| auth_at.get(&e.version.seq) == Some(e))
        .map(|e| e.version.seq);
    let never_trimmed = auth.log.first().is_none_or(|e| e.version.seq == 1);
    let shared = match shared {
        Some(seq) => seq,
        // A copy that never saw a write can replay an untrimmed log from its start.
        None if peer.log.is_empty() && peer.last_update == Eversion::ZERO && never_trimmed => 0,
        None => return Catchup::Backfill { after: None },
    };
    let objects: BTreeSet<ObjectName> = peer
        .log
        .iter()
        .chain(auth.log.iter())
        .filter(|e| e.version.seq > shared)
        .map(entry_name)
        .collect();
    Catchup::Log {
        objects: objects.into_iter().collect(),
    }
}

/// One backfill range: given the authority's objects and the target's in the same name
/// range, what to copy (absent or at another version on the target) and what to remove.
pub fn backfill_diff(
    auth: &[(ObjectName, Eversion)],
    target: &[(ObjectName, Eversion)],
) -> (Vec<ObjectName>, Vec<ObjectName>) {
    let have: BTreeMap<&ObjectName, &Eversion> = target.iter().map(|(n, v)| (n, v)).collect();
    let wanted: BTreeSet<&ObjectName> = auth.iter().map(|(n, _)| n).collect();
    let copy = auth
        .iter()
        .filter(|(n, v)| have.get(n) != Some(&v))
        .map(|(n, _)| n.clone())
        .collect();
    let remove = target
        .iter()
        .filter(|(n, _)| !wanted.contains(n))
        .map(|(n, _)| n.clone())
        .collect();
    (copy, remove)
}

/// How a PG's members catch up in one peering: who must be equal to the authority before
/// the PG serves, and who is filled while it serves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ActivationPlan {
    /// Members copied before activation, the primary first when it is one of them.
    pub before: Vec<OsdId>,
    /// Replicas that take the authoritative log at activation and recover the objects it
    /// names while the PG serves (a write recovers its object on them first).
    pub log_while_active: BTreeMap<OsdId, BTreeSet<ObjectName>>,
    /// Replicas backfilled while the PG serves, each resuming after the object given.
    pub backfill_while_active: BTreeMap<OsdId, Option<ObjectName>>,
}

/// Splits `plans` (each acting member's [`catchup`]) into what happens before and after
/// activation.
///
/// The primary serves reads, so it is always complete before activation. A replica that
/// catches up by log is always left for later: it takes every write from activation on in
/// full (its object is recovered first), so it holds every new write. A replica that needs a
/// backfill takes writes only for objects the backfill has passed, so the PG serves while it
/// fills only if at least `min_size` members need no backfill (the primary and replicas
/// that are current or catch up by log): otherwise a write acknowledged meanwhile would sit
/// on fewer than `min_size` whole copies, and the backfill runs first, as before.
pub fn plan_activation(
    primary: OsdId,
    min_size: usize,
    plans: &BTreeMap<OsdId, Catchup>,
) -> ActivationPlan {
    let mut plan = ActivationPlan::default();
    let backfills = plans
        .iter()
        .filter(|(o, c)| **o != primary && matches!(c, Catchup::Backfill { .. }))
        .count();
    let backfill_later = plans.len().saturating_sub(backfills) >= min_size;
    if plans.get(&primary).is_some_and(|c| *c != Catchup::UpToDate) {
        plan.before.push(primary);
    }
    for (&osd, c) in plans.iter().filter(|(o, _)| **o != primary) {
        match c {
            Catchup::UpToDate => {}
            Catchup::Log { objects } => {
                plan.log_while_active
                    .insert(osd, objects.iter().cloned().collect());
            }
            Catchup::Backfill { after } if backfill_later => {
                plan.backfill_while_active.insert(osd, after.clone());
            }
            Catchup::Backfill { .. } => plan.before.push(osd),
        }
    }
    plan
}

/// The temporary acting set (`pg_temp`) a CRUSH primary that must catch up (`must_wait`:
/// it is in [`ActivationPlan::before`]) asks for: the same members led by the authority, so
/// the PG serves at once and this primary catches up as a replica. None when the primary
/// is current, or the authority is not an acting member (a reordering cannot help: the
/// primary copies from it before serving, as without `pg_temp`).
pub fn temp_acting(
    primary: OsdId,
    authority: OsdId,
    acting: &[OsdId],
    must_wait: bool,
) -> Option<Vec<OsdId>> {
    if !must_wait || authority == primary || !acting.contains(&authority) {
        return None;
    }
    Some(
        std::iter::once(authority)
            .chain(acting.iter().copied().filter(|&o| o != authority))
            .collect(),
    )
}

/// The members an activation record may list:/// The members an activation record may list: every acting member not still recovering or
/// backfilling. Peering trusts each listed member to hold every acknowledged write, so a
/// member is listed only once it is complete.
pub fn complete_members(acting: &[OsdId], incomplete: &BTreeSet<OsdId>) -> Vec<OsdId> {
    acting
        .iter()
        .copied()
        .filter(|o| !incomplete.contains(o))
        .collect()
}

/// How far a backfill that runs while its PG serves has filled its target, in the store's
/// listing order (`K` is that order's key). Every object at or below it equals the
/// primary's and gets each write in full; an object above it gets only the write's log
/// entry (see `OsdCore::write` for why a write skips it rather than recovering it first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackfillReach<K> {
    /// Nothing filled yet.
    Nothing,
    /// Filled through this object.
    Through(K),
    /// Filled: the target is complete.
    Everything,
}

impl<K: Ord> BackfillReach<K> {
    /// Whether a write to the object at `key` reaches the target in full.
    pub fn covers(&self, key: &K) -> bool {
        match self {
            BackfillReach::Nothing => false,
            BackfillReach::Through(k) => key <= k,
            BackfillReach::Everything => true,
        }
    }

    /// Whether the reach may move on to `to` (an object, or None: everything): only if no
    /// object in between was changed by a write that skipped the target (`skipped`), since
    /// moving past it would leave the target with its old copy.
    pub fn may_advance_to<'a>(
        &self,
        to: Option<&K>,
        mut skipped: impl Iterator<Item = &'a K>,
    ) -> bool
    where
        K: 'a,
    {
        skipped.all(|k| self.covers(k) || to.is_some_and(|to| k > to))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use basalt_ops::ReqId;
    use bytes::Bytes;

    fn ev(epoch: u64, seq: u64) -> Eversion {
        Eversion { epoch, seq }
    }

    /// A log entry for tests (peering's and the split's).
    pub(crate) fn entry(epoch: u64, seq: u64, object: &str) -> LogEntry {
        LogEntry {
            version: ev(epoch, seq),
            namespace: String::new(),
            object: object.into(),
            removed: false,
            reqid: ReqId {
                client: "c".into(),
                incarnation: 1,
                tid: seq,
            },
            result: Bytes::new(),
        }
    }

    pub(super) fn state(les: Epoch, log: Vec<LogEntry>) -> PeerState {
        PeerState {
            info: PgInfo {
                les,
                ..PgInfo::default()
            },
            last_update: log.last().map_or(Eversion::ZERO, |e| e.version),
            log,
        }
    }

    pub(super) fn name(n: &str) -> ObjectName {
        (String::new(), n.into())
    }

    fn activation(interval: Epoch, acting: &[OsdId]) -> PgActivation {
        PgActivation {
            interval,
            acting: acting.to_vec(),
        }
    }

    #[test]
    fn no_member_of_the_last_active_interval_means_down() {
        // osd.1 served writes alone (recorded), then stopped; stale osd.0 comes back.
        let states: BTreeMap<_, _> = [(0, state(5, vec![entry(5, 1, "a")]))].into();
        assert_eq!(
            choose_authority(0, Some(&activation(9, &[1])), &states),
            Err(Blocked::Down {
                waiting_for: vec![1]
            })
        );
        let mut states = states;
        states.insert(1, state(9, vec![entry(5, 1, "a"), entry(9, 2, "a")]));
        assert_eq!(
            choose_authority(0, Some(&activation(9, &[1])), &states),
            Ok(1)
        );
        // An operator declared the recorded members lost: whatever answers will do.
        let states: BTreeMap<_, _> = [(0, state(5, vec![entry(5, 1, "a")]))].into();
        assert_eq!(
            choose_authority(0, Some(&activation(9, &[])), &states),
            Ok(0)
        );
    }

    #[test]
    fn newer_les_beats_a_longer_divergent_log() {
        // osd.0 applied seq 3 in interval 5 without acknowledging it; interval 7 went active
        // on osd.1 without it.
        let old = state(
            5,
            vec![entry(5, 1, "a"), entry(5, 2, "b"), entry(5, 3, "x")],
        );
        let new = state(7, vec![entry(5, 1, "a"), entry(5, 2, "b")]);
        let states: BTreeMap<_, _> = [(0, old.clone()), (1, new.clone())].into();
        assert_eq!(choose_authority(0, None, &states), Ok(1));
        assert_eq!(
            catchup(&new, &old),
            Catchup::Log {
                objects: vec![name("x")]
            }
        );
    }

    #[test]
    fn ties_go_to_the_primary_then_the_lowest_id() {
        let s = state(3, vec![entry(3, 1, "a")]);
        let states: BTreeMap<_, _> = [(4, s.clone()), (2, s.clone()), (3, s)].into();
        assert_eq!(choose_authority(3, None, &states), Ok(3));
        assert_eq!(choose_authority(9, None, &states), Ok(2));
    }

    #[test]
    fn a_copy_mid_backfill_is_never_the_authority() {
        let mut partial = state(8, vec![entry(8, 1, "a"), entry(8, 2, "b")]);
        partial.info.backfill = Some(BackfillProgress {
            target: ev(8, 2),
            done_through: Some(name("a")),
        });
        let states: BTreeMap<_, _> = [(1, partial.clone())].into();
        assert!(matches!(
            choose_authority(1, None, &states),
            Err(Blocked::Incomplete { .. })
        ));
        let complete = state(6, vec![entry(6, 1, "a")]);
        let states: BTreeMap<_, _> = [(1, partial), (2, complete)].into();
        assert_eq!(choose_authority(1, None, &states), Ok(2));
    }

    #[test]
    fn overlapping_logs_recover_only_the_named_objects() {
        let auth = state(
            4,
            vec![
                entry(2, 1, "a"),
                entry(2, 2, "b"),
                entry(4, 3, "c"),
                entry(4, 4, "a"),
            ],
        );
        let behind = state(2, vec![entry(2, 1, "a"), entry(2, 2, "b")]);
        assert_eq!(
            catchup(&auth, &behind),
            Catchup::Log {
                objects: vec![name("a"), name("c")]
            }
        );
        assert_eq!(catchup(&auth, &auth), Catchup::UpToDate);
        // A fresh copy replays an untrimmed log.
        assert_eq!(
            catchup(&auth, &PeerState::default()),
            Catchup::Log {
                objects: vec![name("a"), name("b"), name("c")]
            }
        );
    }

    #[test]
    fn a_copy_behind_the_trimmed_log_is_backfilled_and_resumes_only_against_the_same_head() {
        let auth = state(9, vec![entry(9, 50, "q"), entry(9, 51, "r")]);
        let behind = state(3, vec![entry(3, 10, "a")]);
        assert_eq!(catchup(&auth, &behind), Catchup::Backfill { after: None });
        assert_eq!(
            catchup(&auth, &PeerState::default()),
            Catchup::Backfill { after: None }
        );
        let mut resumed = behind.clone();
        resumed.info.backfill = Some(BackfillProgress {
            target: ev(9, 51),
            done_through: Some(name("m")),
        });
        assert_eq!(
            catchup(&auth, &resumed),
            Catchup::Backfill {
                after: Some(name("m"))
            }
        );
        resumed.info.backfill = Some(BackfillProgress {
            target: ev(9, 40),
            done_through: Some(name("m")),
        });
        assert_eq!(catchup(&auth, &resumed), Catchup::Backfill { after: None });
    }

    #[test]
    fn listed_missing_objects_are_recovered_and_bar_the_copy_from_authority() {
        let auth = state(4, vec![entry(4, 1, "a"), entry(4, 2, "b")]);
        let mut partial = auth.clone();
        partial.info.les = 2;
        partial.info.missing = vec![name("a")];
        assert_eq!(
            catchup(&auth, &partial),
            Catchup::Log {
                objects: vec![name("a")]
            }
        );
        let states: BTreeMap<_, _> = [(0, partial.clone())].into();
        assert!(matches!(
            choose_authority(0, None, &states),
            Err(Blocked::Incomplete { .. })
        ));
        let states: BTreeMap<_, _> = [(0, partial), (1, auth)].into();
        assert_eq!(choose_authority(0, None, &states), Ok(1));
    }

    #[test]
    fn backfill_diff_copies_changed_and_missing_and_removes_extras() {
        let auth = vec![
            (name("a"), ev(1, 1)),
            (name("b"), ev(2, 5)),
            (name("d"), ev(2, 6)),
        ];
        let target = vec![
            (name("a"), ev(1, 1)),
            (name("b"), ev(1, 2)),
            (name("c"), ev(1, 3)),
        ];
        let (copy, remove) = backfill_diff(&auth, &target);
        assert_eq!(copy, vec![name("b"), name("d")]);
        assert_eq!(remove, vec![name("c")]);
    }

    fn backfill(after: Option<&str>) -> Catchup {
        Catchup::Backfill {
            after: after.map(name),
        }
    }

    #[test]
    fn backfill_targets_fill_while_active_when_min_size_members_are_whole() {
        let log = Catchup::Log {
            objects: vec![name("a")],
        };
        // Primary 0 current, 1 behind by log, 2 new: two members need no backfill.
        let plans: BTreeMap<_, _> = [
            (0, Catchup::UpToDate),
            (1, log.clone()),
            (2, backfill(Some("m"))),
        ]
        .into();
        let plan = plan_activation(0, 2, &plans);
        assert!(plan.before.is_empty());
        assert_eq!(
            plan.log_while_active,
            [(1, [name("a")].into())].into_iter().collect()
        );
        assert_eq!(
            plan.backfill_while_active,
            [(2, Some(name("m")))].into_iter().collect()
        );
        // min_size 3: a write would sit on two whole copies only, so the backfill runs first.
        let plan = plan_activation(0, 3, &plans);
        assert_eq!(plan.before, vec![2]);
        assert!(plan.backfill_while_active.is_empty());
        // Two new members and min_size 2: only the primary is whole.
        let plans: BTreeMap<_, _> = [
            (0, Catchup::UpToDate),
            (1, backfill(None)),
            (2, backfill(None)),
        ]
        .into();
        assert_eq!(plan_activation(0, 2, &plans).before, vec![1, 2]);
        assert_eq!(plan_activation(0, 1, &plans).before, Vec::<OsdId>::new());
    }

    #[test]
    fn the_primary_is_always_complete_before_it_serves() {
        let plans: BTreeMap<_, _> = [
            (5, backfill(None)),
            (1, Catchup::UpToDate),
            (2, Catchup::UpToDate),
        ]
        .into();
        let plan = plan_activation(5, 1, &plans);
        assert_eq!(plan.before, vec![5]);
        assert!(plan.backfill_while_active.is_empty());
        let plans: BTreeMap<_, _> = [(5, log_of("x")), (1, Catchup::UpToDate)].into();
        let plan = plan_activation(5, 1, &plans);
        assert_eq!(plan.before, vec![5]);
        assert!(plan.log_while_active.is_empty());
    }

    fn log_of(object: &str) -> Catchup {
        Catchup::Log {
            objects: vec![name(object)],
        }
    }

    #[test]
    fn a_primary_that_must_catch_up_hands_the_pg_to_the_authority_meanwhile() {
        assert_eq!(temp_acting(4, 2, &[4, 1, 2], true), Some(vec![2, 4, 1]));
        // Current primary, or an authority outside the acting set: no pg_temp.
        assert_eq!(temp_acting(4, 2, &[4, 1, 2], false), None);
        assert_eq!(temp_acting(4, 4, &[4, 1, 2], true), None);
        assert_eq!(temp_acting(4, 7, &[4, 1, 2], true), None);
    }

    #[test]
    fn only_complete_members_are_recorded() {
        let incomplete: BTreeSet<OsdId> = [2, 7].into();
        assert_eq!(complete_members(&[3, 2, 1, 7], &incomplete), vec![3, 1]);
    }

    #[test]
    fn a_write_reaches_a_backfill_target_in_full_only_below_the_reach() {
        let reach = BackfillReach::Through(10);
        assert!(reach.covers(&10) && reach.covers(&3) && !reach.covers(&11));
        assert!(!BackfillReach::Nothing.covers(&0));
        assert!(BackfillReach::<u32>::Everything.covers(&u32::MAX));
        // A skipped object between the reach and the next stop holds the reach back.
        let skipped = [4, 15, 30];
        assert!(reach.may_advance_to(Some(&14), skipped.iter()));
        assert!(!reach.may_advance_to(Some(&15), skipped.iter()));
        assert!(!reach.may_advance_to(None, skipped.iter()));
        assert!(BackfillReach::Nothing.may_advance_to(Some(&3), skipped.iter()));
        assert!(!BackfillReach::Nothing.may_advance_to(Some(&4), skipped.iter()));
    }
}
