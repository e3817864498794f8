//! Recovery and backfill while a PG serves: copying objects between members in batched
//! pushes, pushing an object a replica still lacks before a write to it, recovering the rest
//! in the background, and backfilling the replicas a log cannot catch up range by range,
//! pausing while a target is backfillfull. Peering's own catch-up (before a PG goes active)
//! is in `service.rs`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use basalt_maps::Epoch;
use basalt_ops::OpError;
use basalt_placement::{OsdId, PgId};
use futures::StreamExt;

use super::peer_client::BackfillRange;
use super::{lock, ActiveBackfill, OsdCore, Pg, RECOVERY_BATCH_BYTES, RECOVERY_FETCHES_IN_FLIGHT};
use crate::peering::{self, BackfillProgress, PgInfo};
use crate::pg::{self, ObjectName, Push};
use crate::store::ObjectId;

impl OsdCore {
    /// Copies `names` from `source` to `target` in pushes of at most RECOVERY_BATCH_BYTES
    /// (objects `source` lacks are removed). The first push also removes `remove`; every
    /// push carries `info`, except that the last carries `last` (log and info) when given.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn transfer(
        &self,
        id: PgId,
        interval_epoch: Epoch,
        source: OsdId,
        target: OsdId,
        names: &[ObjectName],
        remove: Vec<ObjectName>,
        info: Option<PgInfo>,
        last: Option<(Vec<basalt_ops::LogEntry>, PgInfo)>,
    ) -> Result<(), OpError> {
        let mut push = Push {
            remove,
            info: info.clone(),
            ..Push::default()
        };
        let mut bytes = 0u64;
        // Several objects are fetched at once (one pull is one object); they are applied in
        // order, in pushes of at most RECOVERY_BATCH_BYTES.
        let mut fetched = futures::stream::iter(0..names.len())
            .map(|i| self.fetch(id, interval_epoch, source, &names[i]))
            .buffered(RECOVERY_FETCHES_IN_FLIGHT)
            .enumerate();
        while let Some((i, state)) = fetched.next().await {
            let name = &names[i];
            match state? {
                Some(st) => {
                    bytes += st.data.len() as u64 + 1;
                    push.objects.push(st);
                }
                None => push.remove.push(name.clone()),
            }
            if bytes >= RECOVERY_BATCH_BYTES && i + 1 < names.len() {
                self.deliver(id, interval_epoch, target, &push).await?;
                self.recovery_sleep().await;
                metrics::counter!("basalt_osd_recovered_objects_total")
                    .increment(push.objects.len() as u64);
                push = Push {
                    info: info.clone(),
                    ..Push::default()
                };
                bytes = 0;
            }
        }
        if let Some((log, info)) = last {
            push.log = Some(log);
            push.info = Some(info);
        }
        metrics::counter!("basalt_osd_recovered_objects_total")
            .increment(push.objects.len() as u64);
        self.deliver(id, interval_epoch, target, &push).await
    }

    /// Copies `name` from this primary to every replica still missing it; returns how many
    /// got it. The caller holds the object's lock, so no write to it runs meanwhile.
    pub(super) async fn recover_object(
        &self,
        pg: &Pg,
        generation: u64,
        name: &ObjectName,
        skip: &[OsdId],
    ) -> Result<usize, OpError> {
        let (targets, interval_epoch) = {
            let s = lock(&pg.state);
            if s.generation != generation {
                return Err(OpError::IntervalChanged {
                    pg: pg.id.to_string(),
                    epoch: s.interval_epoch,
                });
            }
            let t: Vec<OsdId> = s
                .missing
                .iter()
                .filter(|(o, set)| set.contains(name) && !skip.contains(o))
                .map(|(o, _)| *o)
                .collect();
            (t, s.interval_epoch)
        };
        if targets.is_empty() {
            return Ok(0);
        }
        let push = self.own_copy_as_push(pg.id, interval_epoch, name).await?;
        for &osd in &targets {
            // A replica that cannot take the push (dead, restarting, frozen) makes the write
            // wait, as a sub-op to it would, until it answers or the interval changes (the
            // client then resends): never an I/O error for a passing failure.
            loop {
                let delivered = tokio::select! {
                    d = self.deliver(pg.id, interval_epoch, osd, &push) => d,
                    () = pg.left_generation(generation) => Err(OpError::IntervalChanged {
                        pg: pg.id.to_string(),
                        epoch: lock(&pg.state).interval_epoch,
                    }),
                };
                let e = match delivered {
                    Ok(()) => break,
                    Err(e) => e,
                };
                if let OpError::NoSpace(_) = e {
                    return Err(e);
                }
                tracing::debug!(pg = %pg.id, osd, error = %e, "push on write failed; retrying");
                pg.pause_before_retry(generation).await?;
            }
            metrics::counter!("basalt_osd_recovered_objects_total").increment(1);
            let mut s = lock(&pg.state);
            if s.generation == generation {
                if let Some(set) = s.missing.get_mut(&osd) {
                    set.remove(name);
                }
            }
        }
        Ok(targets.len())
    }

    /// Recovers, one object at a time under its lock, what the `deferred` replicas of an
    /// active PG still miss; then marks them complete (les) and records the complete members
    /// with the monitors. Stops when the interval ends (the next peering takes over from
    /// the replicas' persisted missing lists).
    pub(super) async fn recover_while_active(
        self: Arc<Self>,
        pg: Arc<Pg>,
        generation: u64,
        deferred: Vec<OsdId>,
    ) {
        let Ok(_slot) = self.recovery_slots.clone().acquire_owned().await else {
            return;
        };
        let still_current = || lock(&pg.state).generation == generation;
        loop {
            let next = {
                let s = lock(&pg.state);
                if s.generation != generation {
                    return;
                }
                s.missing.clone()
            };
            if next.values().all(BTreeSet::is_empty) {
                break;
            }
            // Replicas past the backfillfull ratio get no background pushes (a write to an
            // object one lacks still pushes it first: the write must land on every member).
            let with_room: Vec<OsdId> = next
                .iter()
                .filter(|(o, set)| !set.is_empty() && self.toofull(&[**o]).is_none())
                .map(|(o, _)| *o)
                .collect();
            let Some(name) = with_room
                .first()
                .and_then(|o| next.get(o))
                .and_then(|set| set.iter().next().cloned())
            else {
                let waiting: Vec<OsdId> = next
                    .iter()
                    .filter(|(_, set)| !set.is_empty())
                    .map(|(o, _)| *o)
                    .collect();
                let why = self.toofull(&waiting);
                let epoch = self.current_map().map_or(0, |m| m.epoch);
                {
                    let mut s = lock(&pg.state);
                    if s.generation != generation {
                        return;
                    }
                    s.recovery_toofull = why;
                }
                pg.bump();
                tokio::select! {
                    () = self.next_map_or_timeout(epoch) => {}
                    () = pg.left_generation(generation) => return,
                }
                continue;
            };
            if lock(&pg.state).recovery_toofull.take().is_some() {
                pg.bump();
            }
            let toofull: Vec<OsdId> = next
                .keys()
                .copied()
                .filter(|o| !with_room.contains(o))
                .collect();
            self.recovery_sleep().await;
            let slot = pg.object_slot(&name);
            let _order = slot.order.write().await;
            slot.drained().await;
            if let Err(e) = self.recover_object(&pg, generation, &name, &toofull).await {
                if !still_current() {
                    return;
                }
                tracing::info!(pg = %pg.id, error = %e, "recovery of an object failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        loop {
            let (interval_epoch, activated_at) = {
                let s = lock(&pg.state);
                if s.generation != generation {
                    return;
                }
                (s.interval_epoch, s.activated_at)
            };
            let complete = Push {
                info: Some(PgInfo {
                    les: interval_epoch,
                    last_update_floor: activated_at,
                    ..PgInfo::default()
                }),
                ..Push::default()
            };
            let mut result = Ok(());
            for &osd in &deferred {
                result = result.and(self.deliver(pg.id, interval_epoch, osd, &complete).await);
            }
            if result.is_ok() {
                {
                    let mut s = lock(&pg.state);
                    if s.generation == generation {
                        for osd in &deferred {
                            s.missing.remove(osd);
                        }
                    }
                }
                result = self.record_complete_members(&pg, generation).await;
            }
            match result {
                Ok(()) => {
                    tracing::info!(pg = %pg.id, "recovery done");
                    pg.bump();
                    return;
                }
                Err(e) if still_current() => {
                    tracing::info!(pg = %pg.id, error = %e, "finishing recovery failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(_) => return,
            }
        }
    }

    /// Backfills `targets` of an active PG one after another (Ceph's backfill while
    /// active): each target's reach (see [`peering::BackfillReach`]) moves through the
    /// objects in listing order, range by range, copying what differs from this primary;
    /// at the end the target is marked complete and recorded with the monitors. Stops when
    /// the interval ends (the next peering resumes from the target's persisted cursor, or
    /// starts over if writes came meanwhile).
    pub(super) async fn backfill_while_active(
        self: Arc<Self>,
        pg: Arc<Pg>,
        generation: u64,
        targets: Vec<OsdId>,
    ) {
        let Ok(_slot) = self.recovery_slots.clone().acquire_owned().await else {
            return;
        };
        for target in targets {
            loop {
                match self.backfill_target(&pg, generation, target).await {
                    Ok(()) => break,
                    Err(_) if lock(&pg.state).generation != generation => return,
                    Err(e) => {
                        tracing::info!(pg = %pg.id, osd = target, error = %e, "backfill round failed; retrying");
                        if pg.pause_before_retry(generation).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }

    /// One target's backfill while its PG serves (see [`Self::backfill_while_active`]).
    async fn backfill_target(
        &self,
        pg: &Pg,
        generation: u64,
        target: OsdId,
    ) -> Result<(), OpError> {
        let id = pg.id;
        let me = self.me().ok_or_else(|| OpError::Io("not booted".into()))?;
        let interval_changed = |epoch| OpError::IntervalChanged {
            pg: id.to_string(),
            epoch,
        };
        let (interval_epoch, activated_at) = {
            let s = lock(&pg.state);
            (s.interval_epoch, s.activated_at)
        };
        // What the PG's state says about this target, or IntervalChanged once it is over.
        let with_target = |f: &mut dyn FnMut(&mut ActiveBackfill)| -> Result<(), OpError> {
            let mut s = lock(&pg.state);
            if s.generation != generation {
                return Err(interval_changed(s.interval_epoch));
            }
            match s.backfill.get_mut(&target) {
                Some(b) => {
                    f(b);
                    Ok(())
                }
                None => Err(interval_changed(s.interval_epoch)),
            }
        };
        loop {
            self.wait_active_backfill_room(pg, generation, target)
                .await?;
            if !lock(&pg.state).backfill.contains_key(&target) {
                return Ok(());
            }
            let mut reach = peering::BackfillReach::Nothing;
            let mut les = 0;
            with_target(&mut |b| {
                reach = b.reach.clone();
                les = b.les;
            })?;
            let after: Option<ObjectName> = match &reach {
                peering::BackfillReach::Nothing => None,
                peering::BackfillReach::Through(k) => {
                    Some((k.namespace().to_string(), k.name().to_string()))
                }
                peering::BackfillReach::Everything => break,
            };
            let BackfillRange { end, copy, remove } = self
                .backfill_range(id, interval_epoch, me, target, after.as_ref())
                .await?;
            // Objects that differed when scanned; writes since then that skipped the target
            // add theirs to its `skipped`, which the loop below takes too.
            let mut todo: BTreeSet<ObjectId> = copy
                .iter()
                .chain(remove.iter())
                .map(|n| pg::listing_key(id, n))
                .collect();
            let end_key = end.as_ref().map(|e| pg::listing_key(id, e));
            loop {
                let mut next = None;
                let mut advanced = false;
                with_target(&mut |b| {
                    let in_range = |k: &&ObjectId| {
                        !b.reach.covers(k) && end_key.as_ref().is_none_or(|e| *k <= e)
                    };
                    let skipped = b.skipped.iter().find(in_range);
                    let differing = todo.iter().find(in_range);
                    next = skipped.into_iter().chain(differing).min().cloned();
                    if next.is_none() && b.reach.may_advance_to(end_key.as_ref(), b.skipped.iter())
                    {
                        b.reach = match &end_key {
                            Some(e) => peering::BackfillReach::Through(e.clone()),
                            None => peering::BackfillReach::Everything,
                        };
                        advanced = true;
                    }
                })?;
                if advanced {
                    break;
                }
                if let Some(key) = next {
                    self.wait_active_backfill_room(pg, generation, target)
                        .await?;
                    self.backfill_object(pg, generation, interval_epoch, target, &key)
                        .await?;
                    todo.remove(&key);
                }
            }
            // The cursor persists on the target after each range, so a later peering with no
            // write in between resumes here.
            if let Some(e) = end {
                let progress = Push {
                    info: Some(PgInfo {
                        les,
                        backfill: Some(BackfillProgress {
                            target: activated_at,
                            done_through: Some(e),
                        }),
                        missing: vec![],
                        last_update_floor: activated_at,
                    }),
                    ..Push::default()
                };
                self.deliver(id, interval_epoch, target, &progress).await?;
            }
        }
        // Every write now reaches the target in full and every object is equal: it is
        // complete (its log has been the primary's since activation).
        let complete = Push {
            info: Some(PgInfo {
                les: interval_epoch,
                last_update_floor: activated_at,
                ..PgInfo::default()
            }),
            ..Push::default()
        };
        self.deliver(id, interval_epoch, target, &complete).await?;
        {
            let mut s = lock(&pg.state);
            if s.generation != generation {
                return Err(interval_changed(s.interval_epoch));
            }
            s.backfill.remove(&target);
            s.backfill_toofull = None;
        }
        pg.bump();
        // Retried here: the target is no longer in the backfill set, so a new round would
        // not record it.
        while let Err(e) = self.record_complete_members(pg, generation).await {
            tracing::info!(pg = %id, error = %e, "recording the complete members failed; retrying");
            pg.pause_before_retry(generation).await?;
        }
        tracing::info!(pg = %id, osd = target, "backfill done");
        pg.bump();
        Ok(())
    }

    /// Copies one object from this primary to a backfill target under the object's order
    /// lock, once no write to it is in flight, then moves the target's reach up to it
    /// unless a write skipped an object before it meanwhile (then that one goes first).
    async fn backfill_object(
        &self,
        pg: &Pg,
        generation: u64,
        interval_epoch: Epoch,
        target: OsdId,
        key: &ObjectId,
    ) -> Result<(), OpError> {
        let name: ObjectName = (key.namespace().to_string(), key.name().to_string());
        self.recovery_sleep().await;
        let slot = pg.object_slot(&name);
        let _order = slot.order.write().await;
        slot.drained().await;
        if lock(&pg.state).generation != generation {
            return Err(OpError::IntervalChanged {
                pg: pg.id.to_string(),
                epoch: interval_epoch,
            });
        }
        let push = self.own_copy_as_push(pg.id, interval_epoch, &name).await?;
        self.deliver(pg.id, interval_epoch, target, &push).await?;
        metrics::counter!("basalt_osd_recovered_objects_total").increment(1);
        let mut s = lock(&pg.state);
        if s.generation != generation {
            return Err(OpError::IntervalChanged {
                pg: pg.id.to_string(),
                epoch: s.interval_epoch,
            });
        }
        if let Some(b) = s.backfill.get_mut(&target) {
            // No write to it can be deciding now (we hold its order lock): its copy there is
            // current, and a later write that skips the target notes it again.
            b.skipped.remove(key);
            if b.reach.may_advance_to(Some(key), b.skipped.iter()) && !b.reach.covers(key) {
                b.reach = peering::BackfillReach::Through(key.clone());
            }
        }
        Ok(())
    }

    /// Waits while a backfill-while-active target is backfillfull (`pg ls` shows
    /// `active+backfill_toofull`; the PG keeps serving), re-checked at every new map.
    async fn wait_active_backfill_room(
        &self,
        pg: &Pg,
        generation: u64,
        target: OsdId,
    ) -> Result<(), OpError> {
        loop {
            let epoch = self.current_map().map_or(0, |m| m.epoch);
            let why = self.toofull(&[target]);
            let changed = {
                let mut s = lock(&pg.state);
                if s.generation != generation {
                    return Err(OpError::IntervalChanged {
                        pg: pg.id.to_string(),
                        epoch: s.interval_epoch,
                    });
                }
                let changed = s.backfill_toofull != why;
                if changed {
                    if let Some(why) = &why {
                        tracing::warn!(pg = %pg.id, "backfill_toofull: {why}");
                    }
                    s.backfill_toofull = why.clone();
                }
                changed
            };
            if changed {
                pg.bump();
            }
            if why.is_none() {
                return Ok(());
            }
            tokio::select! {
                () = self.next_map_or_timeout(epoch) => {}
                () = pg.left_generation(generation) => {}
            }
        }
    }

    /// This OSD's copy of `name` as a push making a member equal to it: the object, or its
    /// removal when this OSD does not have it.
    async fn own_copy_as_push(
        &self,
        id: PgId,
        interval_epoch: Epoch,
        name: &ObjectName,
    ) -> Result<Push, OpError> {
        let me = self.me().ok_or_else(|| OpError::Io("not booted".into()))?;
        Ok(match self.fetch(id, interval_epoch, me, name).await? {
            Some(st) => Push {
                objects: vec![st],
                ..Push::default()
            },
            None => Push {
                remove: vec![name.clone()],
                ..Push::default()
            },
        })
    }
}
