//! Peering at run time: the driver of [`crate::peering::PeeringRound`] for PGs this OSD is
//! primary of (`peer`, `peer_once`: it carries out each action of the sans-IO round and feeds
//! the results back), what a round's actions need from the rest of the OSD (catching a member
//! up by log or backfill, waiting for backfill room, recording complete members and
//! `pg_temp` with the monitors), and applying a finished round to the PG.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use basalt_maps::{Epoch, Fullness};
use basalt_ops::OpError;
use basalt_placement::{OsdId, PgId};
use futures::StreamExt;

use super::peer_client::BackfillRange;
use super::{lock, ActiveBackfill, OsdCore, Pg, PgStatus};
use crate::peering::{self, BackfillProgress, Catchup, PeerState, PgInfo};
use crate::pg::{self, ObjectName, Push};

impl OsdCore {
    pub(super) fn restart_peering(self: &Arc<Self>, pg: &Arc<Pg>, generation: u64) {
        let mut s = lock(&pg.state);
        if s.generation != generation {
            return;
        }
        s.generation += 1;
        s.status = PgStatus::Peering;
        let g = s.generation;
        drop(s);
        pg.bump();
        let core = self.clone();
        let pg = pg.clone();
        tokio::spawn(async move { core.peer(pg, g).await });
    }

    /// Makes `target`'s copy equal to `source`'s, which holds the authoritative state `auth`.
    #[allow(clippy::too_many_arguments)]
    async fn catch_up(
        &self,
        pg: &Pg,
        generation: u64,
        interval_epoch: Epoch,
        source: OsdId,
        target: OsdId,
        auth: &PeerState,
        target_state: &PeerState,
    ) -> Result<(), OpError> {
        let id = pg.id;
        // The target keeps its les until activation: a copy caught up but never activated
        // must not look newer than it is.
        let done = PgInfo {
            les: target_state.info.les,
            last_update_floor: auth.last_update,
            ..PgInfo::default()
        };
        match peering::catchup(auth, target_state) {
            Catchup::UpToDate => Ok(()),
            Catchup::Log { objects } => {
                self.set_status(pg, generation, PgStatus::Recovering);
                metrics::counter!("basalt_osd_recoveries_total", "kind" => "log").increment(1);
                tracing::info!(pg = %id, from = source, to = target, objects = objects.len(), "log-based recovery");
                self.transfer(
                    id,
                    interval_epoch,
                    source,
                    target,
                    &objects,
                    vec![],
                    None,
                    Some((auth.log.clone(), done)),
                )
                .await
            }
            Catchup::Backfill { mut after } => {
                self.set_status(pg, generation, PgStatus::Backfilling);
                metrics::counter!("basalt_osd_recoveries_total", "kind" => "backfill").increment(1);
                tracing::info!(pg = %id, from = source, to = target, resume_after = ?after, "backfill");
                loop {
                    // A target that filled up mid-backfill gets nothing more until it has room.
                    if !self.wait_backfill_room(pg, generation, &[target]).await {
                        return Err(OpError::IntervalChanged {
                            pg: id.to_string(),
                            epoch: interval_epoch,
                        });
                    }
                    self.set_status(pg, generation, PgStatus::Backfilling);
                    let BackfillRange { end, copy, remove } = self
                        .backfill_range(id, interval_epoch, source, target, after.as_ref())
                        .await?;
                    let progress = |through: Option<ObjectName>| PgInfo {
                        les: target_state.info.les,
                        backfill: Some(BackfillProgress {
                            target: auth.last_update,
                            done_through: through,
                        }),
                        missing: vec![],
                        last_update_floor: target_state.info.last_update_floor,
                    };
                    let last = match &end {
                        Some(e) => (target_state.log.clone(), progress(Some(e.clone()))),
                        None => (auth.log.clone(), done.clone()),
                    };
                    self.transfer(
                        id,
                        interval_epoch,
                        source,
                        target,
                        &copy,
                        remove,
                        Some(progress(after.clone())),
                        Some(last),
                    )
                    .await?;
                    match end {
                        Some(e) => after = Some(e),
                        None => return Ok(()),
                    }
                }
            }
        }
    }

    /// Which of `targets` are at or past the backfillfull ratio in this OSD's map, described
    /// for `pg ls` (None: all have room).
    pub(super) fn toofull(&self, targets: &[OsdId]) -> Option<String> {
        let map = self.current_map()?;
        let full: Vec<String> = targets
            .iter()
            .filter(|o| map.fullness(**o) >= Fullness::Backfillfull)
            .map(|o| {
                let pct = map
                    .osds
                    .get(o)
                    .and_then(|i| i.usage)
                    .map(|u| u.percent_str());
                format!(
                    "osd.{o} is {} at {} (backfillfull_ratio {})",
                    map.fullness(*o).name(),
                    pct.unwrap_or_default(),
                    basalt_maps::ratio_str(map.full_ratios.backfillfull)
                )
            })
            .collect();
        (!full.is_empty()).then(|| full.join(", "))
    }

    /// Resolves when this OSD has a map newer than `epoch`, or after a second (a bounded
    /// wait the callers repeat).
    pub(super) async fn next_map_or_timeout(&self, epoch: Epoch) {
        let mut rx = self.map_tx.subscribe();
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            rx.wait_for(|m| m.as_ref().is_some_and(|m| m.epoch > epoch)),
        )
        .await;
    }

    /// Waits while any of `targets` is backfillfull, showing `backfill_toofull`; re-checked
    /// at every new map. False when the interval ended meanwhile.
    async fn wait_backfill_room(&self, pg: &Pg, generation: u64, targets: &[OsdId]) -> bool {
        loop {
            if lock(&pg.state).generation != generation {
                return false;
            }
            let epoch = self.current_map().map_or(0, |m| m.epoch);
            let Some(why) = self.toofull(targets) else {
                return true;
            };
            if !matches!(lock(&pg.state).status, PgStatus::BackfillToofull(_)) {
                tracing::warn!(pg = %pg.id, "backfill_toofull: {why}");
            }
            self.set_status(pg, generation, PgStatus::BackfillToofull(why));
            tokio::select! {
                () = self.next_map_or_timeout(epoch) => {}
                () = pg.left_generation(generation) => return false,
            }
        }
    }

    /// The configured pause between recovery pushes (`[osd] recovery_sleep_ms`).
    pub(super) async fn recovery_sleep(&self) {
        if self.tuning.recovery_sleep_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.tuning.recovery_sleep_ms)).await;
        }
    }

    fn set_status(&self, pg: &Pg, generation: u64, status: PgStatus) {
        let mut s = lock(&pg.state);
        if s.generation == generation && s.status != status {
            s.status = status;
            drop(s);
            pg.bump();
        }
    }

    /// Peering for an interval in which this OSD is primary: repeat until the PG is active
    /// or the interval is over. A PG that is down or incomplete keeps re-checking, since
    /// the member it waits for may come back without changing the acting set.
    pub(super) async fn peer(self: Arc<Self>, pg: Arc<Pg>, generation: u64) {
        loop {
            let pause = match self.peer_once(&pg, generation).await {
                Ok(true) => return,
                Ok(false) => Duration::from_secs(2),
                Err(e) => {
                    if lock(&pg.state).generation != generation {
                        return;
                    }
                    tracing::info!(pg = %pg.id, error = %e, "peering round failed; retrying");
                    Duration::from_millis(500)
                }
            };
            let mut rx = pg.changed.subscribe();
            let _ = tokio::time::timeout(pause, rx.changed()).await;
            if lock(&pg.state).generation != generation {
                return;
            }
        }
    }

    /// One peering round: `Ok(true)` once the PG is active or only a new map can change its
    /// fate (a newer interval began, or too few members to serve); `Ok(false)` when it must
    /// wait (down, incomplete).
    ///
    /// The driver of [`peering::PeeringRound`]: it gathers the round's setup from the PG and
    /// the map, carries out each action (queries and activation pushes concurrently) and
    /// feeds the results back, until the round finishes or the interval ends.
    async fn peer_once(self: &Arc<Self>, pg: &Arc<Pg>, generation: u64) -> Result<bool, OpError> {
        let me = self.me().ok_or_else(|| OpError::Io("not booted".into()))?;
        let (acting, interval_epoch, min_size) = {
            let mut s = lock(&pg.state);
            if s.generation != generation {
                return Ok(true);
            }
            // A re-peering in the same interval (`restart_peering`) starts over.
            s.missing.clear();
            s.backfill.clear();
            s.backfill_toofull = None;
            (s.acting.clone(), s.interval_epoch, s.min_size as usize)
        };
        let id = pg.id;
        let map = self
            .current_map()
            .ok_or_else(|| OpError::Io("no OSDMap yet".into()))?;
        let activation = map.pg_activations.get(&id).cloned();
        let strays = activation
            .iter()
            .flat_map(|a| a.acting.iter().copied())
            .filter(|o| !acting.contains(o) && map.osds.get(o).is_some_and(|i| i.up))
            .collect();
        let setup = peering::RoundSetup {
            me,
            interval_epoch,
            acting,
            min_size,
            activation,
            strays,
            under_temp: map.pg_temp.contains_key(&id),
        };
        // In-flight writes of the previous interval finish (their replicas refuse them now)
        // before any member's state is read.
        let _quiesced = pg.gate.write().await;
        let (mut round, mut actions) = peering::PeeringRound::start(setup);
        let mut in_flight = futures::stream::FuturesUnordered::new();
        // Held from AcquireRecoverySlot to ReleaseRecoverySlot (or the round's end).
        let mut recovery_slot = None;
        loop {
            for action in actions.drain(..) {
                use peering::RoundAction as A;
                use peering::RoundEvent as E;
                let core = self.clone();
                let pg2 = pg.clone();
                let io: Pin<Box<dyn std::future::Future<Output = Option<E>> + Send>> = match action
                {
                    A::Finish(outcome) => {
                        return self.round_finished(pg, generation, interval_epoch, outcome)
                    }
                    A::Query(osd) => Box::pin(async move {
                        let state = core.query(id, interval_epoch, osd).await;
                        Some(E::Queried { osd, state })
                    }),
                    A::RequestPgTemp(temp) => Box::pin(async move {
                        let r = core.request_pg_temp(id, temp.clone()).await;
                        match &r {
                            Ok(()) => {
                                metrics::counter!("basalt_osd_pg_temp_requests_total").increment(1);
                                tracing::info!(pg = %id, acting = ?temp, "pg_temp: a complete copy serves while this primary catches up");
                            }
                            Err(e) => {
                                tracing::warn!(pg = %id, error = %e, "no pg_temp; catching up before serving")
                            }
                        }
                        Some(E::PgTempSet(r))
                    }),
                    // None: the interval ended while it waited (the round is dropped below).
                    A::WaitBackfillRoom(targets) => Box::pin(async move {
                        core.wait_backfill_room(&pg2, generation, &targets)
                            .await
                            .then_some(E::BackfillRoom)
                    }),
                    A::AcquireRecoverySlot => {
                        let permit = self
                            .recovery_slots
                            .clone()
                            .acquire_owned()
                            .await
                            .map_err(|_| OpError::Io("recovery throttle closed".into()))?;
                        recovery_slot.replace(permit);
                        Box::pin(async { Some(E::RecoverySlot) })
                    }
                    A::ReleaseRecoverySlot => {
                        recovery_slot.take();
                        continue;
                    }
                    A::CatchUp {
                        source,
                        target,
                        auth,
                        target_state,
                    } => Box::pin(async move {
                        let result = core
                            .catch_up(
                                &pg2,
                                generation,
                                interval_epoch,
                                source,
                                target,
                                &auth,
                                &target_state,
                            )
                            .await;
                        Some(E::CaughtUp {
                            osd: target,
                            result,
                        })
                    }),
                    A::Deliver { osd, info, log } => Box::pin(async move {
                        let push = Push {
                            log,
                            info: Some(info),
                            ..Push::default()
                        };
                        let result = core.deliver(id, interval_epoch, osd, &push).await;
                        Some(E::Delivered { osd, result })
                    }),
                    A::Record { missing, backfill } => Box::pin(async move {
                        if !core.note_healing(&pg2, generation, missing, backfill) {
                            return None;
                        }
                        Some(E::Recorded(
                            core.record_complete_members(&pg2, generation).await,
                        ))
                    }),
                };
                in_flight.push(io);
            }
            match in_flight.next().await {
                Some(Some(event)) => actions = round.handle(event),
                // The interval ended under the round: a new one peers afresh.
                Some(None) => return Ok(true),
                None => {
                    return Err(OpError::Io(format!(
                        "peering round of {id} waits for nothing (a bug): {round:?}"
                    )))
                }
            }
            if lock(&pg.state).generation != generation {
                return Ok(true);
            }
        }
    }

    /// Notes at activation what the PG still heals while it serves: the objects each
    /// log-recovering replica lacks, and each backfill target's reach. False when the
    /// interval is over.
    fn note_healing(
        &self,
        pg: &Pg,
        generation: u64,
        missing: BTreeMap<OsdId, BTreeSet<ObjectName>>,
        backfill: BTreeMap<OsdId, (Option<ObjectName>, Epoch)>,
    ) -> bool {
        let mut s = lock(&pg.state);
        if s.generation != generation {
            return false;
        }
        s.missing = missing;
        s.backfill = backfill
            .into_iter()
            .map(|(osd, (after, les))| {
                let reach = match after {
                    Some(n) => peering::BackfillReach::Through(pg::listing_key(pg.id, &n)),
                    None => peering::BackfillReach::Nothing,
                };
                let b = ActiveBackfill {
                    reach,
                    skipped: BTreeSet::new(),
                    les,
                };
                (osd, b)
            })
            .collect();
        s.backfill_toofull = None;
        true
    }

    /// Applies a finished round to the PG: the answer of [`OsdCore::peer_once`].
    fn round_finished(
        self: &Arc<Self>,
        pg: &Arc<Pg>,
        generation: u64,
        epoch: Epoch,
        outcome: peering::RoundOutcome,
    ) -> Result<bool, OpError> {
        use peering::RoundOutcome as O;
        let id = pg.id;
        match outcome {
            O::Active {
                last_update,
                recover,
                backfill,
            } => {
                let mut s = lock(&pg.state);
                if s.generation != generation {
                    return Ok(true);
                }
                s.next_seq = last_update.seq + 1;
                s.activated_at = last_update;
                s.status = PgStatus::Active;
                let objects: usize = s.missing.values().map(BTreeSet::len).sum();
                drop(s);
                pg.bump();
                tracing::debug!(pg = %id, epoch, last_update = %last_update, "active");
                if !recover.is_empty() {
                    metrics::counter!("basalt_osd_recoveries_total", "kind" => "log")
                        .increment(recover.len() as u64);
                    tracing::info!(pg = %id, to = ?recover, objects, "log-based recovery while active");
                    let core = self.clone();
                    let pg = pg.clone();
                    tokio::spawn(async move {
                        core.recover_while_active(pg, generation, recover).await
                    });
                }
                if !backfill.is_empty() {
                    metrics::counter!("basalt_osd_recoveries_total", "kind" => "backfill")
                        .increment(backfill.len() as u64);
                    tracing::info!(pg = %id, to = ?backfill, "backfill while active");
                    let core = self.clone();
                    let pg = pg.clone();
                    tokio::spawn(async move {
                        core.backfill_while_active(pg, generation, backfill).await
                    });
                }
                Ok(true)
            }
            O::Undersized { acting, min_size } => {
                self.set_status(
                    pg,
                    generation,
                    PgStatus::Inactive(format!("undersized: {acting} acting, min_size {min_size}")),
                );
                Ok(true)
            }
            O::Blocked(blocked) => {
                let why = blocked.to_string();
                let status = match blocked {
                    peering::Blocked::Down { .. } => PgStatus::Down(why),
                    peering::Blocked::Incomplete { .. } => PgStatus::Incomplete(why),
                };
                if lock(&pg.state).status != status {
                    tracing::warn!(pg = %id, epoch, "{}", status.name());
                }
                self.set_status(pg, generation, status);
                Ok(false)
            }
            O::HandedOver(_) => Ok(true),
            // `peer` pauses and starts another round (or stops if the interval ended).
            O::Failed(e) => Err(e),
        }
    }

    /// Records the acting members that are complete now (see [`PgState::incomplete`]) as
    /// the PG's activation in its current interval.
    pub(super) async fn record_complete_members(
        &self,
        pg: &Pg,
        generation: u64,
    ) -> Result<(), OpError> {
        let _one_at_a_time = pg.recording.lock().await;
        let (interval, members, all_complete) = {
            let s = lock(&pg.state);
            if s.generation != generation {
                return Err(OpError::IntervalChanged {
                    pg: pg.id.to_string(),
                    epoch: s.interval_epoch,
                });
            }
            let incomplete = s.incomplete();
            (
                s.interval_epoch,
                peering::complete_members(&s.acting, &incomplete),
                incomplete.is_empty(),
            )
        };
        self.record_activation(pg.id, interval, members).await?;
        // Every member is complete, the CRUSH primary too: a temporary acting set has done
        // its job, and the PG goes back to CRUSH's (whose primary then peers with nothing
        // left to copy).
        let temp = self
            .current_map()
            .is_some_and(|m| m.pg_temp.contains_key(&pg.id));
        if all_complete && temp {
            self.request_pg_temp(pg.id, vec![]).await?;
            tracing::info!(pg = %pg.id, "pg_temp removed: every member is complete");
        }
        Ok(())
    }

    /// Asks the monitors for `acting` as `id`'s temporary acting set (empty: CRUSH's again)
    /// and waits for the map that carries it.
    async fn request_pg_temp(&self, id: PgId, acting: Vec<OsdId>) -> Result<(), OpError> {
        let mon = self
            .mon
            .get()
            .ok_or_else(|| OpError::Io("no monitor client yet".into()))?;
        let reply = mon.pg_temp(id, acting).await.map_err(|e| {
            OpError::Io(format!(
                "cannot set the PG's temporary acting set with the monitors: {e}"
            ))
        })?;
        self.map_at_least(reply.epoch).await?;
        Ok(())
    }

    /// Records with the monitors that `id` went active in `interval` with `members` holding
    /// every acknowledged write (a no-op when the map already says so).
    async fn record_activation(
        &self,
        id: PgId,
        interval: Epoch,
        members: Vec<OsdId>,
    ) -> Result<(), OpError> {
        let recorded = self.current_map().is_some_and(|m| {
            m.pg_activations
                .get(&id)
                .is_some_and(|a| a.interval == interval && a.acting == members)
        });
        if recorded {
            return Ok(());
        }
        let mon = self
            .mon
            .get()
            .ok_or_else(|| OpError::Io("no monitor client yet".into()))?;
        let reply = mon.pg_activated(id, interval, members).await.map_err(|e| {
            OpError::Io(format!(
                "cannot record the activation with the monitors: {e}"
            ))
        })?;
        self.map_at_least(reply.epoch).await?;
        Ok(())
    }
}
