//! The snap trimmer: deletes, through the write path, the clones that only removed
//! snapshots still needed, and records per PG which removed snapshots it has trimmed.

use std::sync::Arc;
use std::time::Duration;

use basalt_maps::Epoch;
use basalt_ops::{decode, encode, ObjOp, OpError};
use basalt_placement::{OsdId, PgId};
use basalt_proto::osd as pb;

use super::{lock, now_ns, OsdCore, Pg, PgStatus};
use crate::pg::{self, ObjectName};
use crate::store::Transaction;

/// How often the snap trimmer looks for removed snapshots to trim.
const SNAP_TRIM_TICK: Duration = Duration::from_secs(1);

/// Objects per snap trimmer scan page.
const SNAP_TRIM_SCAN: usize = 256;

/// The removed snapshots of a PG's pool whose clones this OSD, as primary, has trimmed.
fn snap_trimmed_key(pg: PgId) -> Vec<u8> {
    format!("snap_trimmed.{pg}").into_bytes()
}

impl OsdCore {
    /// The snap trimmer: for every PG this OSD is primary of, deletes the clones that only
    /// removed snapshots still needed, one object at a time through the write path (so each
    /// trim is logged and replicated like any write), with the recovery sleep between
    /// objects. Which removed snapshots a PG has been trimmed of is persisted after each
    /// complete pass, so a restart resumes with the snapshots not yet done (re-trimming an
    /// object is a no-op).
    pub async fn run_snap_trimmer(self: Arc<Self>) {
        let incarnation = now_ns();
        let mut tid = 0u64;
        loop {
            tokio::time::sleep(SNAP_TRIM_TICK).await;
            let (Some(map), Some(me)) = (self.current_map(), self.me()) else {
                continue;
            };
            let pgs: Vec<Arc<Pg>> = lock(&self.pgs).values().cloned().collect();
            for pg in pgs {
                let Some(pool) = map.pools.get(&pg.id.pool) else {
                    continue;
                };
                if pool.removed_snaps.is_empty() {
                    continue;
                }
                let (generation, todo) = {
                    let mut s = lock(&pg.state);
                    let recovering = s.healing();
                    if s.primary != Some(me) || s.status != PgStatus::Active || recovering {
                        continue;
                    }
                    let done = s.trimmed_snaps.get_or_insert_with(|| {
                        self.store
                            .meta_get(&snap_trimmed_key(pg.id))
                            .ok()
                            .flatten()
                            .and_then(|b| decode(&b, "trimmed snapshots").ok())
                            .unwrap_or_default()
                    });
                    let todo: Vec<u64> = pool.removed_snaps.difference(done).copied().collect();
                    if todo.is_empty() {
                        continue;
                    }
                    s.snaptrim = true;
                    (s.generation, todo)
                };
                let trimmed = self
                    .trim_pg(&pg, generation, me, map.epoch, &todo, incarnation, &mut tid)
                    .await;
                lock(&pg.state).snaptrim = false;
                match trimmed {
                    Ok(objects) => {
                        lock(&pg.state).trimmed_snaps = Some(pool.removed_snaps.clone());
                        let mut txn = Transaction::new();
                        txn.meta_set(snap_trimmed_key(pg.id), encode(&pool.removed_snaps));
                        if let Err(e) = self.store.submit(txn).await {
                            tracing::warn!(pg = %pg.id, error = %e, "cannot record the trimmed snapshots");
                        }
                        tracing::info!(pg = %pg.id, objects, snaps = ?todo, "snap trim done");
                    }
                    Err(e) => {
                        tracing::info!(pg = %pg.id, error = %e, "snap trim did not finish; will resume")
                    }
                }
            }
        }
    }

    /// One pass of the snap trimmer over `pg`; returns how many objects it trimmed.
    #[allow(clippy::too_many_arguments)]
    async fn trim_pg(
        self: &Arc<Self>,
        pg: &Arc<Pg>,
        generation: u64,
        me: OsdId,
        epoch: Epoch,
        removed: &[u64],
        incarnation: u64,
        tid: &mut u64,
    ) -> Result<u64, OpError> {
        let id = pg.id;
        let mut after: Option<ObjectName> = None;
        let mut trimmed = 0;
        loop {
            if lock(&pg.state).generation != generation {
                return Err(OpError::IntervalChanged {
                    pg: id.to_string(),
                    epoch: pg.snapshot().2,
                });
            }
            let (cursor, wanted) = (after.clone(), removed.to_vec());
            let (page, next) = self
                .on_store(move |store| {
                    pg::objects_to_trim(store, id, cursor.as_ref(), SNAP_TRIM_SCAN, &wanted)
                })
                .await?;
            for (name, snaps) in page {
                *tid += 1;
                let req = pb::OpRequest {
                    pool: id.pool,
                    pg_seed: id.seed,
                    namespace: name.0.clone(),
                    object: name.1.clone(),
                    epoch,
                    reqid: Some(pb::ReqId {
                        client: format!("osd.{me}.snaptrim"),
                        incarnation,
                        tid: *tid,
                    }),
                    timeout_ms: 30_000,
                    full_try: true,
                    ..Default::default()
                };
                self.handle_op(req, vec![ObjOp::TrimSnaps { removed: snaps }])
                    .await?;
                metrics::counter!("basalt_osd_snap_trims_total").increment(1);
                trimmed += 1;
                self.recovery_sleep().await;
            }
            match next {
                Some(n) => after = Some(n),
                None => return Ok(trimmed),
            }
        }
    }
}
