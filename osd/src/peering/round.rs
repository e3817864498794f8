//! One peering round of a PG whose primary is this OSD, as a sans-IO state machine: events
//! in, actions out (`PeeringRound::handle`), like `paxos::Paxos::handle` and the rbd
//! `LockCore`. It owns the round's order and its decisions — whom to hear, which copy is the
//! authority (via the pure rules of [`super`]), whether to hand the PG to a temporary acting
//! set, who catches up before activation and who while active, what each member is told at
//! activation — and nothing else: no clock, no IO, no locks.
//!
//! The OSD's driver (`OsdCore::peer_once`) carries out each [`RoundAction`] (a query, a
//! catch-up, a push, a call to the monitors) and feeds the result back as a [`RoundEvent`];
//! the seeded simulation in `sim.rs` drives this same code with a simulated network, crashes
//! and map changes. A round ends with one [`RoundAction::Finish`]; a new interval simply
//! drops the round (its driver stops), so the core needs no notion of generations.
//!
//! Queries and activation pushes go to all members at once (their results may arrive in any
//! order); catch-ups run one at a time, the primary first, since every later one copies from
//! it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use basalt_maps::{Epoch, PgActivation};
use basalt_ops::{Eversion, LogEntry, OpError};
use basalt_placement::OsdId;

use super::{
    catchup, choose_authority, plan_activation, temp_acting, ActivationPlan, BackfillProgress,
    Blocked, Catchup, PeerState, PgInfo,
};
use crate::pg::ObjectName;

/// What a round starts from: the interval as the primary's map shows it.
#[derive(Clone, Debug)]
pub struct RoundSetup {
    pub me: OsdId,
    pub interval_epoch: Epoch,
    pub acting: Vec<OsdId>,
    pub min_size: usize,
    /// The map's record of the PG's last activation.
    pub activation: Option<PgActivation>,
    /// Members of that activation the map shows up but that are not acting: strays that
    /// hold its writes, heard if they answer (never recovered here).
    pub strays: Vec<OsdId>,
    /// The map already gives the PG a temporary acting set.
    pub under_temp: bool,
}

/// A result of an action, fed back to the round.
#[derive(Debug)]
pub enum RoundEvent {
    Queried {
        osd: OsdId,
        state: Result<PeerState, OpError>,
    },
    PgTempSet(Result<(), OpError>),
    /// The backfill targets of [`RoundAction::WaitBackfillRoom`] have room.
    BackfillRoom,
    /// The recovery slot of [`RoundAction::AcquireRecoverySlot`] is held.
    RecoverySlot,
    CaughtUp {
        osd: OsdId,
        result: Result<(), OpError>,
    },
    Delivered {
        osd: OsdId,
        result: Result<(), OpError>,
    },
    Recorded(Result<(), OpError>),
}

/// What the driver does next. Every action but `ReleaseRecoverySlot`, `Finish` and
/// `SetHealing` answers with one event.
#[derive(Clone, Debug, PartialEq)]
pub enum RoundAction {
    /// Read `osd`'s state of the PG (answer: [`RoundEvent::Queried`]).
    Query(OsdId),
    /// Ask the monitors for this temporary acting set and wait for the map that carries it.
    RequestPgTemp(Vec<OsdId>),
    /// Wait until none of these backfill targets is backfillfull (showing `backfill_toofull`).
    WaitBackfillRoom(Vec<OsdId>),
    /// Take one of the OSD's recovery slots (held until `ReleaseRecoverySlot`).
    AcquireRecoverySlot,
    /// Make `target`'s copy equal to `source`'s, which holds the authoritative `auth`.
    CatchUp {
        source: OsdId,
        target: OsdId,
        auth: PeerState,
        target_state: PeerState,
    },
    ReleaseRecoverySlot,
    /// Activation: `osd`'s PG info becomes `info`, and its log `log` when given.
    Deliver {
        osd: OsdId,
        info: PgInfo,
        log: Option<Vec<LogEntry>>,
    },
    /// Note what is still to heal while the PG serves (the primary's state), then record
    /// the complete members with the monitors (answer: [`RoundEvent::Recorded`]).
    Record {
        missing: BTreeMap<OsdId, BTreeSet<ObjectName>>,
        /// Backfill targets: resume after this object, and the copy's `les` until complete.
        backfill: BTreeMap<OsdId, (Option<ObjectName>, Epoch)>,
    },
    Finish(RoundOutcome),
}

/// How a round ended.
#[derive(Clone, Debug, PartialEq)]
pub enum RoundOutcome {
    /// The PG serves from here: its next write follows `last_update`. `recover` and
    /// `backfill` are filled while it serves.
    Active {
        last_update: Eversion,
        recover: Vec<OsdId>,
        backfill: Vec<OsdId>,
    },
    /// Fewer acting members than `min_size`: only a new map can help.
    Undersized { acting: usize, min_size: usize },
    /// Down or incomplete: the round is tried again later (the member it waits for may
    /// come back without a new interval).
    Blocked(Blocked),
    /// The monitors gave the PG this temporary acting set: the map that carries it starts a
    /// new interval, peered by its primary.
    HandedOver(Vec<OsdId>),
    /// A step failed; the round starts over after a pause.
    Failed(OpError),
}

/// What the round has decided once it heard the members.
#[derive(Clone, Debug)]
struct Decided {
    states: BTreeMap<OsdId, PeerState>,
    authority: OsdId,
    /// How each acting member catches up with the authority.
    plans: BTreeMap<OsdId, Catchup>,
    plan: ActivationPlan,
}

#[derive(Debug)]
enum Phase {
    Querying {
        states: BTreeMap<OsdId, PeerState>,
        waiting: BTreeSet<OsdId>,
    },
    AskingTemp(Decided),
    WaitingRoom(Decided),
    WaitingSlot(Decided),
    CatchingUp {
        decided: Decided,
        queue: VecDeque<OsdId>,
        current: OsdId,
    },
    Delivering {
        decided: Decided,
        waiting: BTreeSet<OsdId>,
    },
    Recording(Decided),
    Done,
}

/// One peering round (see the module docs).
#[derive(Debug)]
pub struct PeeringRound {
    setup: RoundSetup,
    phase: Phase,
}

impl PeeringRound {
    /// A round and its first actions.
    pub fn start(setup: RoundSetup) -> (PeeringRound, Vec<RoundAction>) {
        if setup.acting.len() < setup.min_size {
            let outcome = RoundOutcome::Undersized {
                acting: setup.acting.len(),
                min_size: setup.min_size,
            };
            let round = PeeringRound {
                setup,
                phase: Phase::Done,
            };
            return (round, vec![RoundAction::Finish(outcome)]);
        }
        let waiting: BTreeSet<OsdId> = setup
            .acting
            .iter()
            .chain(setup.strays.iter())
            .copied()
            .collect();
        let actions = waiting.iter().map(|&o| RoundAction::Query(o)).collect();
        let round = PeeringRound {
            setup,
            phase: Phase::Querying {
                states: BTreeMap::new(),
                waiting,
            },
        };
        (round, actions)
    }

    /// Whether the round has finished (no action will follow).
    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// Feeds one result in; returns what to do next. An event the round does not wait for
    /// (a late answer of an earlier phase) changes nothing.
    pub fn handle(&mut self, event: RoundEvent) -> Vec<RoundAction> {
        let phase = std::mem::replace(&mut self.phase, Phase::Done);
        let (phase, actions) = self.step(phase, event);
        self.phase = phase;
        actions
    }

    fn step(&self, phase: Phase, event: RoundEvent) -> (Phase, Vec<RoundAction>) {
        match (phase, event) {
            (
                Phase::Querying {
                    mut states,
                    mut waiting,
                },
                RoundEvent::Queried { osd, state },
            ) if waiting.contains(&osd) => {
                waiting.remove(&osd);
                match state {
                    Ok(st) => {
                        states.insert(osd, st);
                    }
                    // An acting member must answer; a stray that does not is simply not heard.
                    Err(e) if self.setup.acting.contains(&osd) => return finish_failed(e),
                    Err(_) => {}
                }
                if waiting.is_empty() {
                    self.decide(states)
                } else {
                    (Phase::Querying { states, waiting }, vec![])
                }
            }
            (Phase::AskingTemp(d), RoundEvent::PgTempSet(result)) => match result {
                Ok(()) => {
                    let temp = self.temp(&d).unwrap_or_default();
                    finish(RoundOutcome::HandedOver(temp))
                }
                // Without a temporary acting set the primary catches up before serving.
                Err(_) => self.wait_room(d),
            },
            (Phase::WaitingRoom(d), RoundEvent::BackfillRoom) => self.take_slot(d),
            (Phase::WaitingSlot(d), RoundEvent::RecoverySlot) => {
                let queue: VecDeque<OsdId> = d.plan.before.iter().copied().collect();
                self.next_catch_up(d, queue)
            }
            (
                Phase::CatchingUp {
                    decided,
                    queue,
                    current,
                },
                RoundEvent::CaughtUp { osd, result },
            ) if osd == current => match result {
                Ok(()) => self.next_catch_up(decided, queue),
                Err(e) => {
                    let (phase, mut actions) = finish_failed(e);
                    actions.insert(0, RoundAction::ReleaseRecoverySlot);
                    (phase, actions)
                }
            },
            (
                Phase::Delivering {
                    decided,
                    mut waiting,
                },
                RoundEvent::Delivered { osd, result },
            ) if waiting.contains(&osd) => {
                waiting.remove(&osd);
                if let Err(e) = result {
                    return finish_failed(e);
                }
                if !waiting.is_empty() {
                    return (Phase::Delivering { decided, waiting }, vec![]);
                }
                let missing = decided.plan.log_while_active.clone();
                let backfill = decided
                    .plan
                    .backfill_while_active
                    .iter()
                    .map(|(&o, after)| (o, (after.clone(), decided.states[&o].info.les)))
                    .collect();
                (
                    Phase::Recording(decided),
                    vec![RoundAction::Record { missing, backfill }],
                )
            }
            (Phase::Recording(d), RoundEvent::Recorded(result)) => match result {
                Ok(()) => finish(RoundOutcome::Active {
                    last_update: d.states[&d.authority].last_update,
                    recover: d.plan.log_while_active.keys().copied().collect(),
                    backfill: d.plan.backfill_while_active.keys().copied().collect(),
                }),
                Err(e) => finish_failed(e),
            },
            // Not what this phase waits for: a late answer, ignored.
            (phase, _) => (phase, vec![]),
        }
    }

    /// Every member answered: choose the authority and plan the catch-up.
    fn decide(&self, states: BTreeMap<OsdId, PeerState>) -> (Phase, Vec<RoundAction>) {
        let s = &self.setup;
        let authority = match choose_authority(s.me, s.activation.as_ref(), &states) {
            Ok(a) => a,
            Err(blocked) => return finish(RoundOutcome::Blocked(blocked)),
        };
        let auth = &states[&authority];
        let plans: BTreeMap<OsdId, Catchup> = s
            .acting
            .iter()
            .map(|&o| (o, catchup(auth, &states[&o])))
            .collect();
        // Replicas that can catch up from the log do so after activation, object by object
        // (a write recovers its object first); replicas that need a backfill are filled
        // after activation too while at least min_size members need none. The primary (it
        // serves reads), and backfill targets the PG cannot do without, catch up now.
        let plan = plan_activation(s.me, s.min_size, &plans);
        let d = Decided {
            states,
            authority,
            plans,
            plan,
        };
        // pg_temp: this CRUSH primary must catch up before it could serve. Rather than make
        // the PG wait, a complete member serves it meanwhile, and this OSD catches up as its
        // replica (while the PG serves); that primary gives the PG back once all are complete.
        match self.temp(&d) {
            Some(temp) => (Phase::AskingTemp(d), vec![RoundAction::RequestPgTemp(temp)]),
            None => self.wait_room(d),
        }
    }

    fn temp(&self, d: &Decided) -> Option<Vec<OsdId>> {
        let s = &self.setup;
        let must_wait = d.plan.before.contains(&s.me) && !s.under_temp;
        temp_acting(s.me, d.authority, &s.acting, must_wait)
    }

    /// Backfill pushes nothing to a backfillfull member (Ceph's backfill_toofull): the PG
    /// waits, without a recovery slot, until the member has room.
    fn wait_room(&self, d: Decided) -> (Phase, Vec<RoundAction>) {
        let targets: Vec<OsdId> = d
            .plan
            .before
            .iter()
            .copied()
            .filter(|o| matches!(d.plans[o], Catchup::Backfill { .. }))
            .collect();
        if targets.is_empty() {
            return self.take_slot(d);
        }
        (
            Phase::WaitingRoom(d),
            vec![RoundAction::WaitBackfillRoom(targets)],
        )
    }

    /// Only PGs with copying to do before activation wait for a recovery slot.
    fn take_slot(&self, d: Decided) -> (Phase, Vec<RoundAction>) {
        if d.plan.before.is_empty() {
            return self.deliver(d);
        }
        (
            Phase::WaitingSlot(d),
            vec![RoundAction::AcquireRecoverySlot],
        )
    }

    /// This primary first becomes equal to the authority, then serves as the source for
    /// every other member that is behind.
    fn next_catch_up(&self, d: Decided, mut queue: VecDeque<OsdId>) -> (Phase, Vec<RoundAction>) {
        let Some(target) = queue.pop_front() else {
            let (phase, mut actions) = self.deliver(d);
            actions.insert(0, RoundAction::ReleaseRecoverySlot);
            return (phase, actions);
        };
        let me = self.setup.me;
        let source = if target == me { d.authority } else { me };
        let action = RoundAction::CatchUp {
            source,
            target,
            auth: d.states[&d.authority].clone(),
            target_state: d.states[&target].clone(),
        };
        (
            Phase::CatchingUp {
                decided: d,
                queue,
                current: target,
            },
            vec![action],
        )
    }

    /// Activation: complete members record this interval as their les; deferred ones take
    /// the authoritative log (keeping their old les, so none is anyone's authority) and
    /// either the list of objects they still need or their backfill cursor.
    fn deliver(&self, d: Decided) -> (Phase, Vec<RoundAction>) {
        let auth = &d.states[&d.authority];
        let actions: Vec<RoundAction> = self
            .setup
            .acting
            .iter()
            .map(|&osd| {
                let old_les = d.states[&osd].info.les;
                let (info, log) = if let Some(missing) = d.plan.log_while_active.get(&osd) {
                    let info = PgInfo {
                        les: old_les,
                        backfill: None,
                        missing: missing.iter().cloned().collect(),
                        last_update_floor: auth.last_update,
                    };
                    (info, Some(auth.log.clone()))
                } else if let Some(after) = d.plan.backfill_while_active.get(&osd) {
                    // The persisted cursor stays valid only while the authority does not
                    // move (`catchup`): a later peering resumes it only if no write came.
                    let info = PgInfo {
                        les: old_les,
                        backfill: Some(BackfillProgress {
                            target: auth.last_update,
                            done_through: after.clone(),
                        }),
                        missing: vec![],
                        last_update_floor: auth.last_update,
                    };
                    (info, Some(auth.log.clone()))
                } else {
                    let info = PgInfo {
                        les: self.setup.interval_epoch,
                        last_update_floor: auth.last_update,
                        ..PgInfo::default()
                    };
                    (info, None)
                };
                RoundAction::Deliver { osd, info, log }
            })
            .collect();
        let waiting = self.setup.acting.iter().copied().collect();
        (
            Phase::Delivering {
                decided: d,
                waiting,
            },
            actions,
        )
    }
}

fn finish(outcome: RoundOutcome) -> (Phase, Vec<RoundAction>) {
    (Phase::Done, vec![RoundAction::Finish(outcome)])
}

fn finish_failed(e: OpError) -> (Phase, Vec<RoundAction>) {
    finish(RoundOutcome::Failed(e))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{entry, state};
    use super::*;

    fn copy(les: Epoch, seqs: &[u64]) -> PeerState {
        state(les, seqs.iter().map(|&s| entry(1, s, "o")).collect())
    }

    fn setup(acting: &[OsdId]) -> RoundSetup {
        RoundSetup {
            me: acting[0],
            interval_epoch: 5,
            acting: acting.to_vec(),
            min_size: 2,
            activation: Some(PgActivation {
                interval: 3,
                acting: acting.to_vec(),
            }),
            strays: vec![],
            under_temp: false,
        }
    }

    fn answer_all(
        round: &mut PeeringRound,
        actions: Vec<RoundAction>,
        states: &BTreeMap<OsdId, PeerState>,
    ) -> Vec<RoundAction> {
        let mut out = vec![];
        for a in actions {
            let RoundAction::Query(osd) = a else {
                panic!("expected queries, got {a:?}")
            };
            out.extend(round.handle(RoundEvent::Queried {
                osd,
                state: Ok(states[&osd].clone()),
            }));
        }
        out
    }

    #[test]
    fn a_current_pg_goes_active_without_copying() {
        let (mut round, actions) = PeeringRound::start(setup(&[0, 1, 2]));
        let states = (0..3).map(|o| (o, copy(3, &[1, 2]))).collect();
        let actions = answer_all(&mut round, actions, &states);
        assert_eq!(
            actions.len(),
            3,
            "one activation push per member: {actions:?}"
        );
        let mut last = vec![];
        for a in actions {
            let RoundAction::Deliver { osd, info, log } = a else {
                panic!("expected pushes, got {a:?}")
            };
            assert_eq!((info.les, log), (5, None));
            last = round.handle(RoundEvent::Delivered {
                osd,
                result: Ok(()),
            });
        }
        assert!(matches!(last[..], [RoundAction::Record { .. }]), "{last:?}");
        let done = round.handle(RoundEvent::Recorded(Ok(())));
        assert_eq!(
            done,
            vec![RoundAction::Finish(RoundOutcome::Active {
                last_update: Eversion { epoch: 1, seq: 2 },
                recover: vec![],
                backfill: vec![],
            })]
        );
        assert!(round.is_done());
    }

    #[test]
    fn a_primary_behind_hands_the_pg_to_the_authority() {
        let (mut round, actions) = PeeringRound::start(setup(&[0, 1, 2]));
        let states = BTreeMap::from([
            (0, copy(2, &[1])),
            (1, copy(3, &[1, 2])),
            (2, copy(3, &[1, 2])),
        ]);
        let actions = answer_all(&mut round, actions, &states);
        assert_eq!(actions, vec![RoundAction::RequestPgTemp(vec![1, 0, 2])]);
        // Refused: the primary catches up from the authority before anything else.
        let actions = round.handle(RoundEvent::PgTempSet(Err(OpError::Io("no quorum".into()))));
        assert_eq!(actions, vec![RoundAction::AcquireRecoverySlot]);
        let actions = round.handle(RoundEvent::RecoverySlot);
        assert!(
            matches!(
                &actions[..],
                [RoundAction::CatchUp {
                    source: 1,
                    target: 0,
                    ..
                }]
            ),
            "{actions:?}"
        );
    }

    #[test]
    fn a_silent_acting_member_fails_the_round_and_a_silent_stray_does_not() {
        let mut s = setup(&[0, 1]);
        s.strays = vec![2];
        let (mut round, _) = PeeringRound::start(s.clone());
        assert!(round
            .handle(RoundEvent::Queried {
                osd: 2,
                state: Err(OpError::Io("down".into()))
            })
            .is_empty());
        let (mut round2, _) = PeeringRound::start(s);
        let out = round2.handle(RoundEvent::Queried {
            osd: 1,
            state: Err(OpError::Io("down".into())),
        });
        assert!(matches!(
            out[..],
            [RoundAction::Finish(RoundOutcome::Failed(_))]
        ));
        // A late answer after the round finished changes nothing.
        assert!(round2
            .handle(RoundEvent::Queried {
                osd: 0,
                state: Ok(PeerState::default())
            })
            .is_empty());
    }
}
