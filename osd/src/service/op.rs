//! The client op path (primary-copy replication): finding an op's PG on its primary (after
//! the client's map, refusing blocklisted clients), executing the op under its object's
//! order, versioning and replicating a write to every acting member, repairing a corrupt
//! local copy before a read answers, listing a PG's objects; and the replica's half of a
//! write ([`OsdCore::handle_sub_op`]).
//!
//! # Ordering and durability
//!
//! - Ops on one object are serialised by a per-object async lock held from execution to the
//!   reply (reads too, so a read never sees a write that is not yet on every replica).
//!   Ops on different objects of a PG run concurrently; each write gets the PG's next
//!   sequence number under the PG's state lock.
//! - A write is committed locally and on every acting replica in parallel; the client gets
//!   its reply only after all of them returned (every store submit is fsynced).
//! - A replica that does not answer is retried until the PG's interval changes (the monitors
//!   mark it down on heartbeat reports); the op then fails with `IntervalChanged` and the
//!   client resends it with the same request id, which the new interval's primary answers
//!   from its log after peering made every member equal.
//! - A member (replica or the primary itself) refusing a sent write for lack of space is
//!   retried the same way: a write is either durable on every member or, if the interval
//!   changes first, settled by peering; it is never reported failed while visible.
//!
//! # Fencing
//!
//! Clients are fenced per instance (`name/nonce`, see `OsdMap::is_blocklisted`). Every client
//! request is checked against the blocklist of an OSDMap at least as new as the client's (the
//! OSD waits for that map first), and checked again once it holds its object's order lock:
//! Ceph's epoch barrier. A lock breaker's ops carry the blocklist's epoch, so once it has
//! touched an object through this OSD, no op of the fenced instance applies to that object
//! here, even one that arrived with an older map and queued behind it; and an OSD that has
//! not seen the blocklist has had no op of the breaker either, so what it applies is ordered
//! before the break. Replicas accept sub-ops only from the primary that peered them in the
//! current interval, so a deposed primary cannot write, and a new primary took over at a map
//! newer than any its predecessor served the breaker with.

use std::sync::Arc;
use std::time::Duration;

use basalt_maps::{Epoch, Fullness, OsdMap};
use basalt_ops::{decode, encode, Eversion, ObjOp, OpError, OpResult, ReqId, MAX_OPS_PER_REQUEST};
use basalt_placement::{object_to_pg_ns, OsdId, PgId};
use basalt_proto::data_path;
use basalt_proto::osd as pb;
use bytes::Bytes;
use prost::Message;
use tokio::time::Instant;

use super::object_slot::ObjectSlot;
use super::{lock, now_ms, now_ns, OsdCore, Pg, PgStatus, PEER_RPC_TIMEOUT, RETRY_PAUSE};
use crate::peer_msg::SubOp;
use crate::pg::{self, ObjectName};
use crate::store::{ObjectId, Transaction};

impl OsdCore {
    /// Finds the PG `object` maps to and checks that this OSD is its primary, waiting first
    /// for the client's map and refusing blocklisted clients.
    pub(super) async fn primary_pg(
        &self,
        epoch: Epoch,
        pool: u32,
        seed: u32,
        namespace: &str,
        name: Option<&str>,
        client: &str,
    ) -> Result<(Arc<OsdMap>, Arc<Pg>), OpError> {
        let map = self.map_at_least(epoch).await?;
        let Some(p) = map.pools.get(&pool) else {
            return Err(OpError::NoSuchPool(pool));
        };
        if map.is_blocklisted(client, now_ms()) {
            return Err(OpError::Blocklisted(client.to_string()));
        }
        let id = match name {
            Some(n) => object_to_pg_ns(&p.placement(), namespace, n),
            None if seed < p.pg_num => PgId { pool, seed },
            None => {
                return Err(OpError::InvalidArgument(format!(
                    "pool {pool} has {} PGs, not {seed}",
                    p.pg_num
                )))
            }
        };
        let not_primary = || OpError::NotPrimary {
            pg: id.to_string(),
            epoch: map.epoch,
        };
        if id.seed != seed {
            return Err(not_primary());
        }
        let pg = self.pg(id).ok_or_else(not_primary)?;
        if lock(&pg.state).primary != self.me() {
            return Err(not_primary());
        }
        Ok((map, pg))
    }

    /// Waits until `pg` is active (bounded by `deadline`); returns its generation.
    pub(super) async fn wait_active(&self, pg: &Pg, deadline: Instant) -> Result<u64, OpError> {
        let mut rx = pg.changed.subscribe();
        let start_generation = lock(&pg.state).generation;
        let started = Instant::now();
        loop {
            let (generation, status, epoch) = pg.snapshot();
            if generation != start_generation {
                return Err(OpError::IntervalChanged {
                    pg: pg.id.to_string(),
                    epoch,
                });
            }
            match status {
                PgStatus::Active => return Ok(generation),
                PgStatus::Peering
                | PgStatus::Recovering
                | PgStatus::Backfilling
                | PgStatus::BackfillToofull(_)
                | PgStatus::Down(_)
                | PgStatus::Incomplete(_)
                | PgStatus::Inactive(_) => {}
                PgStatus::Replica | PgStatus::Stray => {
                    return Err(OpError::NotPrimary {
                        pg: pg.id.to_string(),
                        epoch,
                    })
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err(OpError::Inactive {
                    pg: pg.id.to_string(),
                    state: status.name(),
                    waited_ms: started.elapsed().as_millis() as u64,
                });
            }
        }
    }

    /// Refuses an op that found its PG under an older map when the current map puts its
    /// object in another PG (a split moved it into a child): `NotPrimary` makes the client
    /// wait for this map and send the op to the object's PG.
    pub(super) fn check_still_maps(
        &self,
        pg: &Pg,
        namespace: &str,
        name: &str,
    ) -> Result<(), OpError> {
        let Some(map) = self.current_map() else {
            return Ok(());
        };
        let Some(pool) = map.pools.get(&pg.id.pool) else {
            return Err(OpError::NoSuchPool(pg.id.pool));
        };
        if object_to_pg_ns(&pool.placement(), namespace, name) != pg.id {
            return Err(OpError::NotPrimary {
                pg: pg.id.to_string(),
                epoch: map.epoch,
            });
        }
        Ok(())
    }

    /// Takes `pg`'s gate shared (as writes do) for reading its objects, and checks that the
    /// PG is still in interval `generation` and still holds `object` (a name; None for a
    /// listing, checked by the caller): a split or peering of the PG either finished before
    /// (the generation changed) or waits until the read is done.
    pub(super) async fn read_gate<'a>(
        &self,
        pg: &'a Pg,
        generation: u64,
        object: Option<(&str, &str)>,
    ) -> Result<tokio::sync::RwLockReadGuard<'a, ()>, OpError> {
        let gate = pg.gate.read().await;
        let (g, _, epoch) = pg.snapshot();
        if g != generation {
            return Err(OpError::IntervalChanged {
                pg: pg.id.to_string(),
                epoch,
            });
        }
        if let Some((namespace, name)) = object {
            self.check_still_maps(pg, namespace, name)?;
        }
        Ok(gate)
    }

    /// A client's compound request (`ops`, decoded from `req.ops`) on one object.
    pub async fn handle_op(
        self: &Arc<Self>,
        req: pb::OpRequest,
        ops: Vec<ObjOp>,
    ) -> Result<OpResult, OpError> {
        let received = std::time::Instant::now();
        let reqid = req
            .reqid
            .as_ref()
            .map(|r| ReqId {
                client: r.client.clone(),
                incarnation: r.incarnation,
                tid: r.tid,
            })
            .ok_or_else(|| OpError::InvalidArgument("request id missing".into()))?;
        if ops.is_empty() || ops.len() > MAX_OPS_PER_REQUEST {
            return Err(OpError::InvalidArgument(format!(
                "a request carries 1..={MAX_OPS_PER_REQUEST} ops, not {}",
                ops.len()
            )));
        }
        for op in &ops {
            op.validate()?;
        }
        let mut req = req;
        if let Some(map) = self.current_map() {
            if let Some(pool) = map.pools.get(&req.pool) {
                // A writer that has not yet heard of a snapshot's removal would otherwise
                // make a clone for it that nothing trims (Ceph filters the same way).
                req.snaps.retain(|s| !pool.removed_snaps.contains(s));
                if let Some(ObjOp::TrimSnaps { removed }) =
                    ops.iter().find(|op| matches!(op, ObjOp::TrimSnaps { .. }))
                {
                    if let Some(s) = removed.iter().find(|s| !pool.removed_snaps.contains(s)) {
                        return Err(OpError::InvalidArgument(format!(
                            "snapshot {s} of pool {} is not removed; only removed snapshots \
                             are trimmed",
                            pool.name
                        )));
                    }
                }
            }
        }
        if req.object.is_empty() {
            return Err(OpError::InvalidArgument("empty object name".into()));
        }
        let deadline =
            Instant::now() + Duration::from_millis(u64::from(req.timeout_ms.clamp(100, 600_000)));
        // The client instance (name/nonce): what the blocklist fences and locks record.
        let instance = format!("{}/{}", reqid.client, reqid.incarnation);
        let (_, pg) = self
            .primary_pg(
                req.epoch,
                req.pool,
                req.pg_seed,
                &req.namespace,
                Some(&req.object),
                &instance,
            )
            .await?;
        self.wait_active(&pg, deadline).await?;
        let name: ObjectName = (req.namespace.clone(), req.object.clone());
        let is_write = ops.iter().any(ObjOp::is_write);
        let slot = pg.object_slot(&name);
        let (shared, exclusive) = if is_write {
            (None, Some(slot.order.clone().write_owned().await))
        } else {
            let shared = slot.order.clone().read_owned().await;
            slot.drained().await;
            (Some(shared), None)
        };
        // The interval may have changed while we queued behind another op.
        let generation = self.wait_active(&pg, deadline).await?;
        let gate = self
            .read_gate(&pg, generation, Some((&req.namespace, &req.object)))
            .await?;
        // The epoch barrier, checked again now that this op holds its object: the check above
        // may have used a map older than the blocklist, and while this op queued, the lock
        // breaker's ops (which carry the blocklist's epoch, so this OSD waited for that map
        // before taking them) may have touched the object first. Whatever ran on the object
        // before this point ran with this OSD's map at least that new, so a fenced client's
        // op that gets here after any of them is refused; one that got here before them is
        // ordered before the break, as if it had landed before the blocklist.
        if self
            .current_map()
            .is_some_and(|m| m.is_blocklisted(&instance, now_ms()))
        {
            return Err(OpError::Blocklisted(instance));
        }
        stage("queue", received);
        let obj = ObjectId::with_namespace(pg.id, req.namespace.clone(), req.object.clone());
        let watchers = self.watchers_of(&(pg.id, req.namespace.clone(), req.object.clone()));
        let client = instance.clone();
        let dup_key = is_write.then(|| reqid.key());
        let ops2 = ops.clone();
        let obj2 = obj.clone();
        let snap = pg::SnapArgs {
            snapc: basalt_ops::SnapContext {
                seq: req.snap_seq,
                snaps: req.snaps.clone(),
            },
            read_snap: req.read_snap,
        };
        let snap2 = snap.clone();
        // The dup check and the execution share one trip to a blocking thread.
        let executed = self
            .on_store(move |store| {
                if let Some(key) = dup_key {
                    let started = std::time::Instant::now();
                    let dup = store.dup_lookup(obj2.pg(), &key).map_err(pg::store_error)?;
                    stage("dup_check", started);
                    if let Some((_, result)) = dup {
                        return Ok(Err(result));
                    }
                }
                let started = std::time::Instant::now();
                let ex = pg::execute(store, &obj2, &client, &ops2, &snap2, &|| watchers.clone());
                stage("execute", started);
                ex.map(Ok)
            })
            .await;
        // The write takes the gate again itself (and checks the interval once more).
        drop(gate);
        let ex = match executed {
            Ok(Ok(ex)) => ex,
            Ok(Err(recorded)) => {
                // The first attempt may still be in flight: answer once it is done, and only
                // if it stayed in this interval (otherwise peering decides its fate).
                slot.drained().await;
                self.wait_active(&pg, deadline).await?;
                if lock(&pg.state).generation != generation {
                    return Err(OpError::IntervalChanged {
                        pg: pg.id.to_string(),
                        epoch: pg.snapshot().2,
                    });
                }
                metrics::counter!("basalt_osd_dup_replies_total").increment(1);
                return decode::<Result<OpResult, OpError>>(&recorded, "recorded result")?;
            }
            Err(OpError::Corrupt(what)) if !is_write => {
                // Never return corrupt bytes: repair from a replica, then read again.
                self.repair_object(&pg, generation, &obj, &what).await?;
                let client = instance.clone();
                let watchers = self.watchers_of(&(pg.id, req.namespace.clone(), req.object));
                let obj2 = obj.clone();
                let ops = ops.clone();
                self.on_store(move |store| {
                    pg::execute(store, &obj2, &client, &ops, &snap, &|| watchers.clone())
                })
                .await?
            }
            Err(e) => return Err(e),
        };
        if !ex.is_write {
            drop(shared);
            return Ok(OpResult {
                version: ex.version_before,
                outputs: ex.outputs,
            });
        }
        // A full pool refuses a new write here: after the dup lookup (a resend of a write
        // that was applied before the pool filled gets its recorded result, never a failure
        // for something visible) and before a version is assigned or anything replicated, so
        // the refused write leaves no trace. A write that got past this point is completed
        // whatever the fullness (see `write`).
        // The verdict first: it is cheap, and most requests may run on a full pool or not,
        // so the OSD fullness is looked up only for one that a full pool would refuse.
        if let (Err(why), Some(map)) = (
            pg::full_verdict(&ops, req.full_try, ex.created),
            self.current_map(),
        ) {
            let mut full = map.full_osds_of_pool(pg.id.pool);
            // This primary's own fullness counts at once, before its beacon has made it into
            // the map (Ceph's OSD-side full check): a fast writer would otherwise fill the
            // disk to its hard limit in the beacon interval, where an admitted write waits.
            let own_full = self
                .own_usage()
                .is_some_and(|u| map.full_ratios.classify(&u) == Fullness::Full);
            if let Some(me) = self.me().filter(|me| own_full && !full.contains(me)) {
                full.push(me);
            }
            if !full.is_empty() {
                metrics::counter!("basalt_osd_full_refusals_total").increment(1);
                let pool = map
                    .pools
                    .get(&pg.id.pool)
                    .map_or_else(|| pg.id.pool.to_string(), |p| p.name.clone());
                let osds: Vec<String> = full.iter().map(|o| format!("osd.{o}")).collect();
                tracing::debug!(pg = %pg.id, object = %name.1, why, "pool full: write refused");
                return Err(OpError::PoolFull {
                    pool,
                    osds: osds.join(", "),
                });
            }
        }
        let Some(order) = exclusive else {
            return Err(OpError::Io("write without its object's order lock".into()));
        };
        // Its own task: once a version is assigned, nothing may stop the write half-way (a
        // client hanging up drops this future) and leave replicas waiting for it.
        let core = self.clone();
        let write = Write {
            pg,
            generation,
            slot,
            order,
            name,
            obj,
            ex,
            reqid,
        };
        tokio::spawn(async move { core.write(write).await })
            .await
            .map_err(|e| OpError::Io(format!("write task failed: {e}")))?
    }

    /// Versions, logs and replicates an executed write; returns once every member has it
    /// durably. Releases the object's order lock as soon as the write is applied locally and
    /// on its way to the replicas (see [`ObjectSlot`]).
    ///
    /// A member that refuses the write for lack of space (`NoSpace`) is retried until it takes
    /// it, or until the interval changes; the client sees a pause, never that error. Why retry
    /// rather than fail the op or drop the member: once the sub-ops are out, the write is in
    /// the PG's history on the members that took it, and peering would make it the
    /// authority's, so an error to the client would be a lie (failed, yet visible). Taking the
    /// full replica out instead would need a map change per full disk (there is no `pg_temp`)
    /// and leave the PG running degraded on a disk problem an operator fixes by freeing
    /// space: removals always pass the store's capacity check, so deleting objects (or
    /// raising `--capacity-bytes`, or marking the OSD out) lets the waiting write complete.
    async fn write(self: Arc<Self>, w: Write) -> Result<OpResult, OpError> {
        let Write {
            pg,
            generation,
            slot,
            order,
            name,
            obj,
            mut ex,
            reqid,
        } = w;
        let _write = pg.gate.read().await;
        // A replica still recovering this object gets it first, so the write applies to the
        // same state on every member.
        if self.recover_object(&pg, generation, &name, &[]).await? > 0 {
            metrics::counter!("basalt_osd_recovered_on_write_total").increment(1);
        }
        // Version assignment and the generation check happen together, so a write is never
        // numbered in one interval and replicated in the next.
        let (version, replicas, interval_epoch) = {
            let mut s = lock(&pg.state);
            if s.generation != generation || s.status != PgStatus::Active {
                return Err(OpError::IntervalChanged {
                    pg: pg.id.to_string(),
                    epoch: s.interval_epoch,
                });
            }
            let v = Eversion {
                epoch: s.interval_epoch,
                seq: s.next_seq,
            };
            s.next_seq += 1;
            let me = self.me();
            let key = pg::listing_key(pg.id, &name);
            let acting = s.acting.clone();
            // A backfill target whose backfill has not reached this object gets only the
            // write's log entry, and the object is noted so the backfill copies it when it
            // gets there. Why skip it rather than recover the object to it first (as a
            // log-recovering replica's missing object is): the target lacks most objects,
            // and a VM's 4 KiB write would then wait for a whole 4 MiB object to be pushed;
            // the backfill copies the object once either way.
            let replicas: Vec<(OsdId, bool)> = acting
                .into_iter()
                .filter(|o| Some(*o) != me)
                .map(|o| match s.backfill.get_mut(&o) {
                    Some(b) if !b.reach.covers(&key) => {
                        b.skipped.insert(key.clone());
                        (o, false)
                    }
                    _ => (o, true),
                })
                .collect();
            (v, replicas, s.interval_epoch)
        };
        let (after_seq, _in_flight) = slot.begin(version.seq);
        let result = OpResult {
            version,
            outputs: std::mem::take(&mut ex.outputs),
        };
        let recorded = encode(&Ok::<_, OpError>(result.clone()));
        let mut txn = std::mem::take(&mut ex.txn);
        pg::finish_write(
            &mut txn,
            &obj,
            ex.stored_after,
            ex.removed,
            version,
            &reqid,
            recorded,
            now_ns(),
            self.tuning.pg_log_entries,
        );
        let sub_op = SubOp {
            header: self.peer_header(pg.id, interval_epoch),
            version,
            reqid,
            object: name.clone(),
            after_seq,
            txn,
        };
        // Encoded once: every replica and every retry gets the same bytes. A backfill target
        // this write skips gets the same envelope with only the write's log entry.
        let sub_op_bytes = Bytes::from(sub_op.to_pb().encode_to_vec());
        let log_only_bytes = replicas.iter().any(|(_, full)| !full).then(|| {
            let log_only = SubOp {
                header: sub_op.header,
                version,
                reqid: sub_op.reqid.clone(),
                object: sub_op.object.clone(),
                after_seq,
                txn: sub_op.txn.log_only(),
            };
            Bytes::from(log_only.to_pb().encode_to_vec())
        });
        let txn = sub_op.txn;
        let committed = std::time::Instant::now();
        let mut tasks = Vec::with_capacity(replicas.len());
        for (osd, full) in replicas {
            let core = self.clone();
            let pg = pg.clone();
            let request = match (&log_only_bytes, full) {
                (Some(log_only), false) => log_only.clone(),
                _ => sub_op_bytes.clone(),
            };
            tasks.push(tokio::spawn(async move {
                core.sub_op_until_done(&pg, generation, osd, request).await
            }));
        }
        let started = std::time::Instant::now();
        let local = self.apply_until_room(&pg, generation, txn).await;
        stage("local_apply", started);
        drop(order);
        let local = match local {
            Ok(durable) => {
                let started = std::time::Instant::now();
                // Woken by the syncer thread itself: no blocking thread waits for the sync.
                let r = durable.done().await.map_err(pg::store_error);
                stage("local_sync", started);
                r
            }
            Err(e) => Err(e),
        };
        metrics::histogram!("basalt_osd_commit_seconds").record(committed.elapsed().as_secs_f64());
        let after_local = std::time::Instant::now();
        let mut first_err = local.as_ref().err().cloned();
        for t in tasks {
            let r = t
                .await
                .unwrap_or_else(|e| Err(OpError::Io(format!("replication task failed: {e}"))));
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        stage("replica_wait", after_local);
        if let Err(e) = local {
            if let OpError::IntervalChanged { .. } = e {
                return Err(e);
            }
            // Replicas may hold a write the primary could not commit: re-peer so the PG
            // converges on one copy before it serves again.
            tracing::error!(pg = %pg.id, error = %e, "local commit failed; re-peering");
            self.restart_peering(&pg, generation);
            return Err(OpError::Io(format!(
                "write failed on the primary ({e}); it may or may not have been applied"
            )));
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(result),
        }
    }

    /// Applies a write's transaction to the local store (the primary's half of `write`),
    /// retrying while the store refuses it for lack of space: its sub-ops are already on their
    /// way, so a replica may hold it, and it must not be reported failed (see `write`). Returns
    /// the durability ticket; `IntervalChanged` if the PG's interval changes meanwhile (the
    /// client resends, and peering settles the write's fate on every member alike).
    async fn apply_until_room(
        &self,
        pg: &Pg,
        generation: u64,
        txn: Transaction,
    ) -> Result<crate::store::Durable, OpError> {
        let txn = Arc::new(txn);
        let mut warned = false;
        loop {
            let t = txn.clone();
            match self
                .on_store(move |store| store.apply_blocking(&t).map_err(pg::store_error))
                .await
            {
                Err(OpError::NoSpace(m)) => {
                    metrics::counter!("basalt_osd_write_no_space_retries_total", "where" => "local")
                        .increment(1);
                    if !warned {
                        warned = true;
                        tracing::warn!(pg = %pg.id, reason = %m,
                            "no room for a write already sent to the replicas; retrying until there is");
                    }
                }
                other => return other,
            }
            pg.pause_before_retry(generation).await?;
        }
    }

    async fn sub_op_until_done(
        &self,
        pg: &Pg,
        generation: u64,
        osd: OsdId,
        request: Bytes,
    ) -> Result<(), OpError> {
        let mut warned_full = false;
        let mut warned_refused = false;
        loop {
            let (g, _, epoch) = pg.snapshot();
            if g != generation {
                return Err(OpError::IntervalChanged {
                    pg: pg.id.to_string(),
                    epoch,
                });
            }
            let attempt = async {
                let peer = self.peer_messenger(osd)?;
                let reply = peer
                    .call(data_path::SUB_OP, request.clone())
                    .await
                    .map_err(|e| OpError::Io(format!("osd.{osd}: {e}")))?;
                let reply = pb::SubOpReply::decode(reply).map_err(|e| {
                    OpError::Io(format!("osd.{osd}: undecodable sub-op reply: {e}"))
                })?;
                decode::<Result<(), OpError>>(&reply.result, "sub-op reply")?
            };
            // A frozen replica never answers; once the monitors mark it down the interval
            // changes, and the client's resend should not wait out the RPC timeout.
            let answer = tokio::select! {
                a = tokio::time::timeout(PEER_RPC_TIMEOUT, attempt) => a,
                () = pg.left_generation(generation) => continue,
            };
            match answer {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(OpError::NoSpace(m))) => {
                    // The primary has committed this write, so failing it would leave it
                    // visible yet reported failed: wait for room instead (see `write`).
                    metrics::counter!("basalt_osd_write_no_space_retries_total", "where" => "replica")
                        .increment(1);
                    if !warned_full {
                        warned_full = true;
                        tracing::warn!(pg = %pg.id, osd, reason = %m,
                            "replica has no room for a committed write; retrying until it has");
                    }
                }
                Ok(Err(e @ OpError::BadPeerMessage(_))) => {
                    // Another release on the replica, or a bug: retrying sends the same bytes,
                    // so only an interval change (the replica restarted or was replaced) ends it.
                    if !warned_refused {
                        warned_refused = true;
                        tracing::error!(pg = %pg.id, osd, error = %e,
                            "replica refused the sub-op's envelope; retrying until the interval changes");
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(pg = %pg.id, osd, error = %e, "sub-op failed; retrying")
                }
                Err(_) => tracing::debug!(pg = %pg.id, osd, "sub-op timed out; retrying"),
            }
            let mut rx = pg.changed.subscribe();
            let _ = tokio::time::timeout(RETRY_PAUSE, rx.changed()).await;
        }
    }

    /// Replaces a corrupt local copy of `obj` with a replica's good one.
    async fn repair_object(
        self: &Arc<Self>,
        pg: &Arc<Pg>,
        generation: u64,
        obj: &ObjectId,
        what: &str,
    ) -> Result<(), OpError> {
        tracing::warn!(pg = %pg.id, object = %obj, error = what, "corrupt local copy; repairing from a replica");
        metrics::counter!("basalt_osd_read_repairs_total").increment(1);
        let name: ObjectName = (obj.namespace().to_string(), obj.name().to_string());
        let (replicas, interval_epoch) = {
            let s = lock(&pg.state);
            let me = self.me();
            // A replica still recovering this object holds a stale copy or none.
            let r: Vec<OsdId> = s
                .acting
                .iter()
                .copied()
                .filter(|o| Some(*o) != me)
                .filter(|o| !s.missing.get(o).is_some_and(|m| m.contains(&name)))
                .filter(|o| !s.backfill.contains_key(o))
                .collect();
            (r, s.interval_epoch)
        };
        let me = self.me().ok_or_else(|| OpError::Io("not booted".into()))?;
        for osd in replicas {
            if lock(&pg.state).generation != generation {
                return Err(OpError::IntervalChanged {
                    pg: pg.id.to_string(),
                    epoch: interval_epoch,
                });
            }
            // The same copy-over as scrub repair, with this OSD as the bad member; a replica
            // whose own copy fails its checksum cannot supply one, so try the next.
            let inc = pg::Inconsistency {
                namespace: obj.namespace().to_string(),
                name: obj.name().to_string(),
                bad: vec![me],
                good: Some(osd),
                why: what.to_string(),
            };
            if let Ok(true) = self.repair_copies(pg, &inc).await {
                return Ok(());
            }
        }
        Err(OpError::Corrupt(format!(
            "{obj}: {what}; no replica could supply a good copy"
        )))
    }

    pub async fn handle_list(&self, req: pb::ListRequest) -> Result<pg::Listing, OpError> {
        let (_, pg) = self
            .primary_pg(req.epoch, req.pool, req.pg_seed, "", None, &req.client)
            .await?;
        let deadline =
            Instant::now() + Duration::from_millis(u64::from(req.timeout_ms.clamp(100, 600_000)));
        let generation = self.wait_active(&pg, deadline).await?;
        let _gate = self.read_gate(&pg, generation, None).await?;
        // A client listing with another pg_num would miss what a split moved into the new
        // PGs (or list it twice): it must list again with this map.
        if let Some(map) = self.current_map() {
            let pg_num = map.pools.get(&req.pool).map_or(0, |p| p.pg_num);
            if req.pg_num != 0 && req.pg_num != pg_num {
                return Err(OpError::NotPrimary {
                    pg: pg.id.to_string(),
                    epoch: map.epoch,
                });
            }
        }
        let after: Option<ObjectName> = if req.start_after.is_empty() {
            None
        } else {
            decode(&req.start_after, "listing cursor")?
        };
        let max = req.max.clamp(1, 10_000) as usize;
        let id = pg.id;
        self.on_store(move |store| {
            let start = after.map(|(ns, n)| ObjectId::with_namespace(id, ns, n));
            let page = store
                .list_objects(id, start.as_ref(), max)
                .map_err(pg::store_error)?;
            let mut objects = Vec::with_capacity(page.objects.len());
            for o in page
                .objects
                .iter()
                .filter(|o| o.snap() == crate::store::SNAP_HEAD)
            {
                // A whiteout (deleted, its clones kept for snapshots) is no object to list.
                let head = store.head(o).map_err(pg::store_error)?;
                if head.is_some() && !crate::snaps::is_whiteout(head.as_ref()) {
                    objects.push((o.namespace().to_string(), o.name().to_string()));
                }
            }
            Ok(pg::Listing {
                objects,
                next: page
                    .next
                    .map(|o| (o.namespace().to_string(), o.name().to_string())),
            })
        })
        .await
    }

    /// Applies a primary's write (already checked against its envelope by
    /// [`SubOp::from_pb`]).
    pub async fn handle_sub_op(&self, sub_op: SubOp) -> Result<(), OpError> {
        let pg = self.check_peer_request(&sub_op.header).await?;
        let SubOp {
            header,
            version,
            object,
            after_seq,
            txn,
            ..
        } = sub_op;
        // A resent sub-op must not apply twice (appends are not idempotent): its log entry
        // tells whether it already landed.
        let seq = version.seq;
        let committing = std::time::Instant::now();
        // Writes to one object apply in the primary's order: wait (bounded; the primary
        // resends) until the write in flight before this one has landed here.
        let slot = pg.object_slot(&object);
        let deadline = Instant::now() + PEER_RPC_TIMEOUT / 2;
        let order = loop {
            let mut landed = pg.applied.subscribe();
            let mut changed = pg.changed.subscribe();
            let order = slot.order.clone().write_owned().await;
            if lock(&pg.state).peered_interval != header.interval_epoch {
                return Err(OpError::IntervalChanged {
                    pg: pg.id.to_string(),
                    epoch: header.interval_epoch,
                });
            }
            let (id, after) = (pg.id, after_seq.unwrap_or(0));
            let (done, ready) = self
                .on_store(move |store| {
                    let logged = |seq: u64| -> Result<bool, OpError> {
                        Ok(store
                            .pg_log_scan(id, seq, 1)
                            .map_err(pg::store_error)?
                            .first()
                            .is_some_and(|(v, _)| *v == seq))
                    };
                    Ok((logged(seq)?, after == 0 || logged(after)?))
                })
                .await?;
            if done {
                // A resend of a sub-op that landed: answer once it is durable.
                drop(order);
                return self
                    .on_store(|store| store.sync_blocking().map_err(pg::store_error))
                    .await;
            }
            if ready {
                break order;
            }
            drop(order);
            let waited = tokio::time::timeout_at(deadline, async {
                tokio::select! {
                    _ = landed.changed() => {}
                    _ = changed.changed() => {}
                }
            })
            .await;
            if waited.is_err() {
                return Err(OpError::Io(format!(
                    "pg {}: the write before log entry {seq} to this object has not arrived",
                    pg.id
                )));
            }
        };
        // Peering holds the gate exclusively while it reads this member's state, so no write
        // of an older interval lands behind its back (not held while waiting above: peering
        // must not wait for a write that may never come).
        let _write = pg.gate.read().await;
        if lock(&pg.state).peered_interval != header.interval_epoch {
            return Err(OpError::IntervalChanged {
                pg: pg.id.to_string(),
                epoch: header.interval_epoch,
            });
        }
        let started = std::time::Instant::now();
        let applied = self
            .on_store(move |store| store.apply_blocking(&txn).map_err(pg::store_error))
            .await;
        stage("sub_op_apply", started);
        pg.applied.send_modify(|n| *n += 1);
        drop(order);
        let durable = applied?;
        let started = std::time::Instant::now();
        let r = durable.done().await.map_err(pg::store_error);
        stage("sub_op_sync", started);
        metrics::histogram!("basalt_osd_commit_seconds").record(committing.elapsed().as_secs_f64());
        r
    }
}

/// An executed write on its way to being versioned and replicated ([`OsdCore::write`]).
struct Write {
    pg: Arc<Pg>,
    generation: u64,
    slot: Arc<ObjectSlot>,
    /// The object's order lock, held until the write is applied locally.
    order: tokio::sync::OwnedRwLockWriteGuard<()>,
    name: ObjectName,
    obj: ObjectId,
    ex: pg::Executed,
    reqid: ReqId,
}

/// Records how long one stage of the op path took (`basalt_osd_op_stage_seconds`).
pub(super) fn stage(name: &'static str, since: std::time::Instant) {
    metrics::histogram!("basalt_osd_op_stage_seconds", "stage" => name)
        .record(since.elapsed().as_secs_f64());
}
