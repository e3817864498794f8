//! What a PG member answers its primary outside the write path: the check every peering or
//! replication request passes (this OSD's map is at least as new as the request's interval
//! and names the sender the PG's primary), and the query, pull, scan and push handlers.
//! A write's sub-op is in `op.rs`, a scrub map request in `scrub.rs`.

use std::sync::Arc;

use basalt_ops::{decode, Eversion, OpError};
use basalt_proto::osd as pb;

use super::{lock, OsdCore, Pg, BACKFILL_SCAN};
use crate::peer_msg::PeerHeader;
use crate::peering::PeerState;
use crate::pg::{self, ObjectName, Push};
use crate::store::ObjectId;

impl OsdCore {
    /// Checks a peering/replication request (its envelope `header`: from `from` for `pg` at
    /// `interval_epoch`): this OSD's map must be at least that new and show `from` as the
    /// PG's primary.
    pub(super) async fn check_peer_request(&self, header: &PeerHeader) -> Result<Arc<Pg>, OpError> {
        let PeerHeader {
            pg: id,
            interval_epoch,
            from,
        } = *header;
        let map = self.map_at_least(interval_epoch).await?;
        let stale = || OpError::IntervalChanged {
            pg: id.to_string(),
            epoch: map.epoch,
        };
        let pg = self.pg(id).ok_or_else(stale)?;
        if lock(&pg.state).primary != Some(from) {
            return Err(stale());
        }
        Ok(pg)
    }

    pub async fn handle_pg_query(&self, header: PeerHeader) -> Result<PeerState, OpError> {
        let pg = self.check_peer_request(&header).await?;
        // From here on sub-ops of older intervals are refused, and those already admitted
        // have committed before the state below is read.
        {
            let mut s = lock(&pg.state);
            s.peered_interval = s.peered_interval.max(header.interval_epoch);
        }
        let _quiesced = pg.gate.write().await;
        let id = pg.id;
        self.on_store(move |store| pg::peer_state(store, id)).await
    }

    pub async fn handle_pg_pull(
        &self,
        header: PeerHeader,
        req: pb::PgPullRequest,
    ) -> Result<Vec<Option<pg::ObjectState>>, OpError> {
        let pg = self.check_peer_request(&header).await?;
        let names: Vec<ObjectName> = decode(&req.objects, "object names")?;
        let id = pg.id;
        self.on_store(move |store| {
            names
                .iter()
                .map(|(ns, n)| {
                    pg::object_if_present(
                        store,
                        &ObjectId::with_namespace(id, ns.clone(), n.clone()),
                    )
                })
                .collect()
        })
        .await
    }

    pub async fn handle_pg_scan(
        &self,
        header: PeerHeader,
        req: pb::PgScanRequest,
    ) -> Result<Vec<(ObjectName, Eversion)>, OpError> {
        let pg = self.check_peer_request(&header).await?;
        let after: Option<ObjectName> = decode(&req.after, "scan start")?;
        let max = (req.max as usize).clamp(1, 4 * BACKFILL_SCAN);
        let id = pg.id;
        self.on_store(move |store| pg::scan_objects(store, id, after.as_ref(), max))
            .await
    }

    pub async fn handle_pg_push(
        &self,
        header: PeerHeader,
        req: pb::PgPushRequest,
    ) -> Result<(), OpError> {
        let pg = self.check_peer_request(&header).await?;
        // Under the gate, so a split of this PG (which ends the interval first) never runs
        // between the interval check and the commit.
        let _write = pg.gate.read().await;
        if lock(&pg.state).peered_interval != header.interval_epoch {
            return Err(OpError::IntervalChanged {
                pg: pg.id.to_string(),
                epoch: header.interval_epoch,
            });
        }
        let push: Push = decode(&req.push, "push")?;
        let id = pg.id;
        let pg_num = self.pg_num_of(id.pool);
        let txn = self
            .on_store(move |store| pg::apply_push(store, id, pg_num, &push))
            .await?;
        let r = self.store.submit(txn).await.map_err(pg::store_error);
        pg.applied.send_modify(|n| *n += 1);
        r
    }
}
