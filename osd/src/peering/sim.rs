//! The seeded peering simulation: the production [`PeeringRound`] decides every peering of
//! one PG whose copies live on four OSDs (pool size 3), while the simulation plays the rest
//! of the cluster — the monitors (who is up, the activation record, `pg_temp`), a network
//! that loses, delays and reorders every request and reply (some after they took effect),
//! OSDs that stop, start and restart mid-round, client writes, and recovery while active.
//!
//! Each copy carries, besides its log and info, the set of writes its objects hold, so the
//! oracle sees data, not bookkeeping. Checked after every step:
//! - no acknowledged write is lost: every member of the activation record holds all of them;
//! - no read returns a value older than an acknowledged write, and no PG goes active on a
//!   stale authority: an active primary holds every acknowledged write.
//!
//! After the faults stop (every OSD up, no loss), the PG must reach active+clean — active,
//! every member complete, no `pg_temp` — within a bound (liveness).
//!
//! What it leaves out: a stale request landing after its interval ended (replicas refuse
//! those by the envelope's interval epoch, so late answers here are simply dropped), and the
//! per-range cursor of a backfill (an interrupted one restarts from the beginning).
//!
//! A failing seed is printed; replay it with
//! `PG_SIM_SEED=<seed> cargo test --release --locked --workspace --lib simulated_peering`.

use std::collections::BTreeSet;

use basalt_maps::{Epoch, PgActivation};
use basalt_ops::{Eversion, LogEntry, OpError};
use basalt_placement::OsdId;

use super::tests::entry;
use super::{BackfillProgress, Catchup, PeerState, PgInfo};
use super::{PeeringRound, RoundAction, RoundEvent, RoundOutcome, RoundSetup};

const OSDS: OsdId = 4;
const SIZE: usize = 3;
/// Log entries each copy keeps (small, so copies fall behind the log and need a backfill).
const LOG_KEEP: usize = 4;
const FAULT_STEPS: usize = 300;
/// Steps after the faults stop within which the PG must be active+clean.
const LIVENESS_STEPS: usize = 600;

/// An action in a history line (logs elided).
fn brief(a: &RoundAction) -> String {
    match a {
        RoundAction::CatchUp {
            source,
            target,
            auth,
            target_state,
        } => format!(
            "catch up osd.{target} (les {}, at {}) from osd.{source} to {}",
            target_state.info.les, target_state.last_update, auth.last_update
        ),
        RoundAction::Deliver { osd, info, log } => format!(
            "push osd.{osd}: les {}, missing {}, backfill {}, log {}",
            info.les,
            info.missing.len(),
            info.backfill.is_some(),
            log.as_ref().map_or(0, Vec::len)
        ),
        other => format!("{other:?}"),
    }
}

/// What the histories exercised, summed over seeds: a run that stops reaching a path fails
/// rather than passing vacuously.
#[derive(Debug, Default)]
struct Coverage {
    acked: u64,
    catch_ups: u64,
    pg_temps: u64,
    log_while_active: u64,
    backfill_while_active: u64,
}

impl Coverage {
    fn count(&mut self, a: &RoundAction) {
        match a {
            RoundAction::CatchUp { .. } => self.catch_ups += 1,
            RoundAction::RequestPgTemp(_) => self.pg_temps += 1,
            RoundAction::Deliver { info, .. } if !info.missing.is_empty() => {
                self.log_while_active += 1
            }
            RoundAction::Deliver { info, .. } if info.backfill.is_some() => {
                self.backfill_while_active += 1
            }
            _ => {}
        }
    }

    fn add(&mut self, o: &Coverage) {
        self.acked += o.acked;
        self.catch_ups += o.catch_ups;
        self.pg_temps += o.pg_temps;
        self.log_while_active += o.log_while_active;
        self.backfill_while_active += o.backfill_while_active;
    }
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }

    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
}

/// One OSD's copy of the PG.
#[derive(Clone, Debug, Default)]
struct Copy {
    log: Vec<LogEntry>,
    info: PgInfo,
    /// The writes whose effects the copy's objects hold.
    data: BTreeSet<Eversion>,
}

impl Copy {
    fn state(&self) -> PeerState {
        PeerState {
            last_update: self
                .log
                .last()
                .map_or(Eversion::ZERO, |e| e.version)
                .max(self.info.last_update_floor),
            info: self.info.clone(),
            log: self.log.clone(),
        }
    }
}

/// The primary of an active PG.
struct Active {
    next_seq: u64,
    /// Members still recovering or backfilling while the PG serves.
    healing: BTreeSet<OsdId>,
    /// Of those, the backfill targets (they take only log entries until filled).
    backfilling: BTreeSet<OsdId>,
}

struct Sim {
    rng: Rng,
    min_size: usize,
    up: Vec<bool>,
    copies: Vec<Copy>,
    epoch: Epoch,
    record: Option<PgActivation>,
    pg_temp: Option<Vec<OsdId>>,
    /// The current interval's first epoch and acting set (primary first).
    interval: (Epoch, Vec<OsdId>),
    round: Option<PeeringRound>,
    /// Rounds started so far: the number of the current one.
    rounds: u64,
    /// Actions of this interval's rounds whose results have not come back yet, each with its
    /// round's number. One of a finished round still takes effect, but its answer goes
    /// nowhere (its driver has stopped listening).
    in_flight: Vec<(u64, RoundAction)>,
    /// The last round was blocked or failed: start another.
    retry: bool,
    active: Option<Active>,
    acked: BTreeSet<Eversion>,
    /// Whether the network loses messages (and OSDs fail) at this step.
    faults: bool,
    seen: Coverage,
    history: Vec<String>,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let min_size = 1 + rng.below(2) as usize;
        let mut sim = Sim {
            rng,
            min_size,
            up: vec![true; OSDS as usize],
            copies: vec![Copy::default(); OSDS as usize],
            epoch: 1,
            record: None,
            pg_temp: None,
            interval: (0, vec![]),
            round: None,
            rounds: 0,
            in_flight: vec![],
            retry: false,
            active: None,
            acked: BTreeSet::new(),
            faults: true,
            seen: Coverage::default(),
            history: vec![],
        };
        sim.new_map(false);
        sim
    }

    fn note(&mut self, what: String) {
        self.history.push(format!("e{} {what}", self.epoch));
    }

    /// CRUSH's acting set: the first `SIZE` OSDs up, by id; a `pg_temp` overrides it.
    fn mapped_acting(&self) -> Vec<OsdId> {
        let up = |o: &OsdId| self.up[*o as usize];
        match &self.pg_temp {
            Some(temp) => temp.iter().copied().filter(up).collect(),
            None => (0..OSDS).filter(up).take(SIZE).collect(),
        }
    }

    /// A new map: a new interval when the acting set changed or a member restarted.
    fn new_map(&mut self, restarted: bool) {
        self.epoch += 1;
        let acting = self.mapped_acting();
        if acting == self.interval.1 && !restarted {
            return;
        }
        self.note(format!("interval {acting:?}"));
        self.interval = (self.epoch, acting);
        self.round = None;
        self.in_flight.clear();
        self.active = None;
        self.start_round();
    }

    fn start_round(&mut self) {
        self.retry = false;
        let (interval_epoch, acting) = self.interval.clone();
        let Some(&me) = acting.first() else {
            return;
        };
        let strays = self
            .record
            .iter()
            .flat_map(|r| r.acting.iter().copied())
            .filter(|o| self.up[*o as usize] && !acting.contains(o))
            .collect();
        let setup = RoundSetup {
            me,
            interval_epoch,
            acting,
            min_size: self.min_size,
            activation: self.record.clone(),
            strays,
            under_temp: self.pg_temp.is_some(),
        };
        let (round, actions) = PeeringRound::start(setup);
        self.round = Some(round);
        self.rounds += 1;
        self.perform(actions);
    }

    fn perform(&mut self, actions: Vec<RoundAction>) {
        for action in actions {
            match action {
                RoundAction::Finish(outcome) => self.finished(outcome),
                RoundAction::ReleaseRecoverySlot => {}
                other => {
                    self.seen.count(&other);
                    if !matches!(other, RoundAction::Query(_)) {
                        self.note(format!("  {}", brief(&other)));
                    }
                    self.in_flight.push((self.rounds, other));
                }
            }
        }
    }

    fn finished(&mut self, outcome: RoundOutcome) {
        self.round = None;
        self.note(format!("round: {outcome:?}"));
        match outcome {
            RoundOutcome::Active {
                last_update,
                recover,
                backfill,
            } => {
                let backfilling: BTreeSet<OsdId> = backfill.into_iter().collect();
                let healing = recover
                    .into_iter()
                    .chain(backfilling.iter().copied())
                    .collect();
                self.active = Some(Active {
                    next_seq: last_update.seq + 1,
                    healing,
                    backfilling,
                });
            }
            RoundOutcome::Blocked(_) | RoundOutcome::Failed(_) => self.retry = true,
            RoundOutcome::Undersized { .. } | RoundOutcome::HandedOver(_) => {}
        }
    }

    /// A message is lost (before or after it took effect) only while faults run.
    fn lost(&mut self) -> bool {
        self.faults && self.rng.one_in(6)
    }

    fn fail(what: &str) -> OpError {
        OpError::Io(what.into())
    }

    /// Carries out one in-flight action and feeds its result to the round.
    fn complete(&mut self, i: usize) {
        let (round, action) = self.in_flight.swap_remove(i);
        let event = match action {
            RoundAction::Query(osd) => {
                let state = if self.up[osd as usize] && !self.lost() {
                    Ok(self.copies[osd as usize].state())
                } else {
                    Err(Self::fail("no answer"))
                };
                RoundEvent::Queried { osd, state }
            }
            RoundAction::RequestPgTemp(temp) => {
                if self.lost() {
                    RoundEvent::PgTempSet(Err(Self::fail("monitors unreachable")))
                } else {
                    // The map that carries it ends this interval (and drops this round).
                    self.note(format!("pg_temp {temp:?}"));
                    self.pg_temp = Some(temp);
                    self.new_map(false);
                    return;
                }
            }
            RoundAction::WaitBackfillRoom(_) => RoundEvent::BackfillRoom,
            RoundAction::AcquireRecoverySlot => RoundEvent::RecoverySlot,
            RoundAction::CatchUp {
                source,
                target,
                auth,
                target_state,
            } => {
                let result = self.catch_up(source, target, &auth, &target_state);
                RoundEvent::CaughtUp {
                    osd: target,
                    result,
                }
            }
            RoundAction::Deliver { osd, info, log } => {
                let result = if !self.up[osd as usize] || self.lost() {
                    Err(Self::fail("push lost"))
                } else {
                    let c = &mut self.copies[osd as usize];
                    c.info = info;
                    if let Some(log) = log {
                        c.log = log;
                    }
                    // The push took effect; its answer may still be lost.
                    if self.lost() {
                        Err(Self::fail("answer lost"))
                    } else {
                        Ok(())
                    }
                };
                RoundEvent::Delivered { osd, result }
            }
            RoundAction::Record { missing, backfill } => {
                if self.lost() {
                    RoundEvent::Recorded(Err(Self::fail("monitors unreachable")))
                } else {
                    let healing: BTreeSet<OsdId> =
                        missing.keys().chain(backfill.keys()).copied().collect();
                    if self.record_complete(&healing) {
                        return;
                    }
                    RoundEvent::Recorded(Ok(()))
                }
            }
            RoundAction::Finish(_) | RoundAction::ReleaseRecoverySlot => return,
        };
        if round != self.rounds {
            return;
        }
        if let Some(round) = self.round.as_mut() {
            let actions = round.handle(event);
            self.perform(actions);
        }
    }

    /// The real `catch_up`: the target's objects become the source's and its log the
    /// authority's; an interrupted backfill leaves its cursor (barring the copy from
    /// authority) and an interrupted log recovery leaves the copy as it was.
    fn catch_up(
        &mut self,
        source: OsdId,
        target: OsdId,
        auth: &PeerState,
        target_state: &PeerState,
    ) -> Result<(), OpError> {
        let backfill = matches!(super::catchup(auth, target_state), Catchup::Backfill { .. });
        let reachable = self.up[source as usize] && self.up[target as usize];
        if !reachable || self.lost() {
            if backfill && self.up[target as usize] {
                self.copies[target as usize].info.backfill = Some(BackfillProgress {
                    target: auth.last_update,
                    done_through: None,
                });
            }
            return Err(Self::fail("catch-up interrupted"));
        }
        let data = self.copies[source as usize].data.clone();
        let c = &mut self.copies[target as usize];
        c.data = data;
        c.log = auth.log.clone();
        c.info = PgInfo {
            les: target_state.info.les,
            last_update_floor: auth.last_update,
            ..PgInfo::default()
        };
        Ok(())
    }

    /// `record_complete_members`: the activation record lists the acting members not
    /// healing; with every member complete a `pg_temp` is removed. True when that removal
    /// started a new interval.
    fn record_complete(&mut self, healing: &BTreeSet<OsdId>) -> bool {
        let (interval, acting) = self.interval.clone();
        let members: Vec<OsdId> = acting
            .into_iter()
            .filter(|o| !healing.contains(o))
            .collect();
        self.note(format!("record {members:?}"));
        self.record = Some(PgActivation {
            interval,
            acting: members,
        });
        if healing.is_empty() && self.pg_temp.take().is_some() {
            self.note("pg_temp removed".into());
            self.new_map(false);
            return true;
        }
        false
    }

    /// A client write at the active primary, replicated to every acting member.
    fn write(&mut self) {
        let (epoch, acting) = self.interval.clone();
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let version = Eversion {
            epoch,
            seq: active.next_seq,
        };
        active.next_seq += 1;
        let backfilling = active.backfilling.clone();
        let recovering: BTreeSet<OsdId> =
            active.healing.difference(&backfilling).copied().collect();
        let e = entry(version.epoch, version.seq, "o");
        let primary = acting[0];
        let before = self.copies[primary as usize].data.clone();
        let mut missed = None;
        for &o in &acting {
            if o != primary && self.lost() {
                missed = Some(o);
                continue;
            }
            let c = &mut self.copies[o as usize];
            if recovering.contains(&o) {
                // A recovering member gets the object before the write (`recover_object`).
                c.data = before.clone();
            }
            if !backfilling.contains(&o) {
                c.data.insert(version);
            }
            c.log.push(e.clone());
            let extra = c.log.len().saturating_sub(LOG_KEEP);
            c.log.drain(..extra);
        }
        match missed {
            None => {
                self.acked.insert(version);
                self.seen.acked += 1;
            }
            Some(o) => {
                // The primary retries the sub-op until the monitors mark the member down.
                self.note(format!("write {version} missed osd.{o}"));
                self.up[o as usize] = false;
                self.new_map(false);
            }
        }
    }

    /// Recovery while active finishes for one healing member, which is then recorded.
    fn recover_one(&mut self) {
        let (epoch, acting) = self.interval.clone();
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(&osd) = active.healing.iter().next() else {
            return;
        };
        if self.faults && self.rng.one_in(4) {
            return;
        }
        active.healing.remove(&osd);
        active.backfilling.remove(&osd);
        let healing = active.healing.clone();
        let primary = self.copies[acting[0] as usize].clone();
        let c = &mut self.copies[osd as usize];
        c.data = primary.data;
        c.log = primary.log;
        c.info = PgInfo {
            les: epoch,
            last_update_floor: primary.info.last_update_floor,
            ..PgInfo::default()
        };
        self.note(format!("osd.{osd} recovered"));
        self.record_complete(&healing);
    }

    /// An OSD stops or starts (a new map), or restarts (a new interval if it was acting).
    fn fault(&mut self) {
        let osd = self.rng.below(u64::from(OSDS)) as usize;
        if self.rng.one_in(3) && self.up[osd] {
            self.note(format!("osd.{osd} restarts"));
            let acting = self.interval.1.contains(&(osd as OsdId));
            self.new_map(acting);
        } else {
            self.up[osd] = !self.up[osd];
            self.note(format!(
                "osd.{osd} {}",
                if self.up[osd] { "up" } else { "down" }
            ));
            self.new_map(false);
        }
    }

    fn step(&mut self) {
        let roll = self.rng.below(10);
        if self.faults && roll == 0 {
            self.fault();
        } else if self.retry && roll < 3 {
            self.start_round();
        } else if !self.in_flight.is_empty() && roll < 7 {
            let i = self.rng.below(self.in_flight.len() as u64) as usize;
            self.complete(i);
        } else if self.active.is_some() && roll < 9 {
            self.write();
        } else {
            self.recover_one();
        }
    }

    fn check(&self, step: usize) {
        for a in &self.acked {
            for o in self.record.iter().flat_map(|r| r.acting.iter()) {
                assert!(
                    self.copies[*o as usize].data.contains(a),
                    "step {step}: osd.{o}, recorded as complete, lacks acknowledged write {a}"
                );
            }
            if self.active.is_some() {
                let primary = self.interval.1[0];
                assert!(
                    self.copies[primary as usize].data.contains(a),
                    "step {step}: active primary osd.{primary} lacks acknowledged write {a}"
                );
            }
        }
    }

    fn clean(&self) -> bool {
        self.active.as_ref().is_some_and(|a| a.healing.is_empty())
            && self.pg_temp.is_none()
            && self.interval.1 == self.mapped_acting()
    }

    fn run(&mut self) {
        for step in 0..FAULT_STEPS {
            self.step();
            self.check(step);
        }
        self.faults = false;
        self.note("faults stop".into());
        for osd in 0..OSDS as usize {
            if !self.up[osd] {
                self.up[osd] = true;
                self.new_map(false);
            }
        }
        for step in FAULT_STEPS..FAULT_STEPS + LIVENESS_STEPS {
            if self.clean() {
                return;
            }
            self.step();
            self.check(step);
        }
        panic!(
            "not active+clean {LIVENESS_STEPS} steps after the faults stopped: active {}, \
             healing {:?}, pg_temp {:?}, round {:?}, in flight {:?}",
            self.active.is_some(),
            self.active.as_ref().map(|a| &a.healing),
            self.pg_temp,
            self.round,
            self.in_flight
        );
    }
}

#[test]
fn simulated_peering_loses_no_acknowledged_write_and_heals() {
    let seeds: Vec<u64> = match std::env::var("PG_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("PG_SIM_SEED is a number")],
        Err(_) => (1..=3000).collect(),
    };
    let replay = seeds.len() == 1;
    let mut seen = Coverage::default();
    for seed in seeds {
        let mut sim = Sim::new(seed);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.run()));
        if let Err(why) = outcome {
            if replay {
                for line in &sim.history {
                    eprintln!("{line}");
                }
            }
            let why = why
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| why.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("seed {seed} failed (replay with its history: PG_SIM_SEED={seed}): {why}");
        }
        seen.add(&sim.seen);
    }
    if !replay {
        let c = &seen;
        assert!(
            c.acked > 0
                && c.catch_ups > 0
                && c.pg_temps > 0
                && c.log_while_active > 0
                && c.backfill_while_active > 0,
            "the histories no longer reach every path: {c:?}"
        );
        eprintln!("peering simulation covered {c:?}");
    }
}
