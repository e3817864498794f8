//! Requests this OSD sends to other OSDs: gRPC clients and data-path connections to them (by
//! their address in the current map, authenticated with this OSD's `osd` ticket), and the
//! peering and recovery calls (query, pull, push, scan), each answered from the local store
//! when the OSD asked is this one.

use std::sync::Arc;
use std::time::Duration;

use basalt_auth::TicketCell;
use basalt_maps::Epoch;
use basalt_messenger::Peer;
use basalt_monclient::MonClient;
use basalt_ops::{decode, encode, Eversion, OpError, MAX_MESSAGE_BYTES};
use basalt_placement::{OsdId, PgId};
use basalt_proto::auth::AuthChannel;
use basalt_proto::osd as pb;
use basalt_proto::osd::osd_client::OsdClient;
use bytes::Bytes;
use tonic::{Response, Status};

use super::{lock, OsdCore, BACKFILL_SCAN, PEER_RPC_TIMEOUT};
use crate::peering::{self, PeerState};
use crate::pg::{self, ObjectName, Push};
use crate::store::ObjectId;

/// A gRPC client for another OSD with the data path's message limits, dialed through
/// `connector`, authenticated with `ticket` (this OSD's own `osd` ticket).
pub fn osd_client(
    addr: &str,
    connector: &basalt_tls::Connector,
    ticket: Arc<TicketCell>,
) -> Result<OsdClient<AuthChannel>, OpError> {
    let channel = basalt_monclient::lazy_channel(addr, connector, Duration::from_secs(2))
        .map_err(|e| OpError::Io(format!("OSD: {e}")))?;
    Ok(
        OsdClient::new(basalt_proto::auth::authorized(channel, ticket))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
}

impl OsdCore {
    /// `osd`'s address in the current map.
    fn peer_addr(&self, osd: OsdId) -> Result<String, OpError> {
        let map = self
            .current_map()
            .ok_or_else(|| OpError::Io("no OSDMap yet".into()))?;
        map.osds
            .get(&osd)
            .map(|info| info.addr.clone())
            .ok_or_else(|| OpError::Io(format!("osd.{osd} is not in the map")))
    }

    /// This OSD's ticket for other OSDs (empty until the daemon has its monitor client).
    pub fn osd_ticket(&self) -> Arc<TicketCell> {
        self.mon
            .get()
            .map(MonClient::osd_ticket)
            .unwrap_or_default()
    }

    fn peer_client(&self, osd: OsdId) -> Result<OsdClient<AuthChannel>, OpError> {
        let addr = self.peer_addr(osd)?;
        let mut peers = lock(&self.peers);
        if let Some(c) = peers.get(&addr) {
            return Ok(c.clone());
        }
        let c = osd_client(&addr, &self.connector, self.osd_ticket())?;
        peers.insert(addr, c.clone());
        Ok(c)
    }

    /// The data-path connection to `osd` (at its address in the current map).
    pub(super) fn peer_messenger(&self, osd: OsdId) -> Result<Arc<Peer>, OpError> {
        let addr = self.peer_addr(osd)?;
        let ticket = self.osd_ticket();
        let mut peers = lock(&self.messengers);
        let peer = peers.entry(addr).or_insert_with_key(|addr| {
            Arc::new(Peer::new(
                addr,
                self.connector.clone(),
                Duration::from_secs(2),
                MAX_MESSAGE_BYTES,
                ticket,
            ))
        });
        Ok(peer.clone())
    }

    /// Sends a peering RPC to `osd` with the peer timeout and decodes its postcard result.
    pub(super) async fn peer_rpc<T, F, Fut>(
        &self,
        osd: OsdId,
        what: &str,
        call: F,
    ) -> Result<T, OpError>
    where
        T: for<'de> serde::Deserialize<'de>,
        F: FnOnce(OsdClient<AuthChannel>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<Bytes>, Status>>,
    {
        let c = self.peer_client(osd)?;
        let reply = tokio::time::timeout(PEER_RPC_TIMEOUT, call(c))
            .await
            .map_err(|_| OpError::Io(format!("osd.{osd} did not answer a {what}")))?
            .map_err(|s| OpError::Io(format!("osd.{osd}: {}", s.message())))?;
        decode::<Result<T, OpError>>(reply.get_ref(), what)?
    }

    pub(super) async fn query(
        &self,
        id: PgId,
        interval_epoch: Epoch,
        osd: OsdId,
    ) -> Result<PeerState, OpError> {
        let me = self.me().unwrap_or(u32::MAX);
        if osd == me {
            return self.on_store(move |store| pg::peer_state(store, id)).await;
        }
        let header = Some(self.peer_header(id, interval_epoch).to_pb());
        self.peer_rpc(osd, "query", |mut c| async move {
            let r = c.pg_query(pb::PgQueryRequest { header }).await?;
            Ok(Response::new(r.into_inner().result))
        })
        .await
    }

    /// One object as `source` holds it (None: it does not exist there).
    pub(super) async fn fetch(
        &self,
        id: PgId,
        interval_epoch: Epoch,
        source: OsdId,
        name: &ObjectName,
    ) -> Result<Option<pg::ObjectState>, OpError> {
        let me = self.me().unwrap_or(u32::MAX);
        if source == me {
            let obj = ObjectId::with_namespace(id, name.0.clone(), name.1.clone());
            return self
                .on_store(move |store| pg::object_if_present(store, &obj))
                .await;
        }
        // One object per pull: sizes are unknown here and one object may be as large as the
        // message limit allows.
        let objects = encode(&vec![name.clone()]);
        let header = Some(self.peer_header(id, interval_epoch).to_pb());
        let mut got: Vec<Option<pg::ObjectState>> = self
            .peer_rpc(source, "pull", |mut c| async move {
                let r = c.pg_pull(pb::PgPullRequest { header, objects }).await?;
                Ok(Response::new(r.into_inner().result))
            })
            .await?;
        got.pop()
            .ok_or_else(|| OpError::Io(format!("osd.{source} answered a pull with nothing")))
    }

    /// Applies `push` to `target`'s copy of the PG.
    pub(super) async fn deliver(
        &self,
        id: PgId,
        interval_epoch: Epoch,
        target: OsdId,
        push: &Push,
    ) -> Result<(), OpError> {
        let me = self.me().unwrap_or(u32::MAX);
        if target == me {
            let txn = pg::apply_push(&self.store, id, self.pg_num_of(id.pool), push)?;
            return self.store.submit(txn).await.map_err(pg::store_error);
        }
        let push = encode(push);
        let header = Some(self.peer_header(id, interval_epoch).to_pb());
        self.peer_rpc(target, "push", |mut c| async move {
            let r = c.pg_push(pb::PgPushRequest { header, push }).await?;
            Ok(Response::new(r.into_inner().result))
        })
        .await
    }

    /// One page of `osd`'s objects after `after`, in listing order (`pg::listing_key`).
    pub(super) async fn scan(
        &self,
        id: PgId,
        interval_epoch: Epoch,
        osd: OsdId,
        after: Option<&ObjectName>,
    ) -> Result<Vec<(ObjectName, Eversion)>, OpError> {
        let me = self.me().unwrap_or(u32::MAX);
        if osd == me {
            let after = after.cloned();
            return self
                .on_store(move |store| pg::scan_objects(store, id, after.as_ref(), BACKFILL_SCAN))
                .await;
        }
        let after = encode(&after);
        let header = Some(self.peer_header(id, interval_epoch).to_pb());
        self.peer_rpc(osd, "scan", |mut c| async move {
            let r = c
                .pg_scan(pb::PgScanRequest {
                    header,
                    after,
                    max: BACKFILL_SCAN as u32,
                })
                .await?;
            Ok(Response::new(r.into_inner().result))
        })
        .await
    }

    /// `osd`'s objects after `after` through `end` (None: to the end), in listing order,
    /// read page by page.
    pub(super) async fn scan_range(
        &self,
        id: PgId,
        interval_epoch: Epoch,
        osd: OsdId,
        after: Option<&ObjectName>,
        end: Option<&ObjectName>,
    ) -> Result<Vec<(ObjectName, Eversion)>, OpError> {
        let past_end =
            |n: &ObjectName| end.is_some_and(|e| pg::listing_key(id, n) > pg::listing_key(id, e));
        let mut have = Vec::new();
        let mut cursor = after.cloned();
        loop {
            let page = self.scan(id, interval_epoch, osd, cursor.as_ref()).await?;
            let full = page.len() >= BACKFILL_SCAN;
            cursor = page.last().map(|(n, _)| n.clone());
            let beyond = page.iter().any(|(n, _)| past_end(n));
            have.extend(page.into_iter().filter(|(n, _)| !past_end(n)));
            if !full || beyond {
                return Ok(have);
            }
        }
    }

    /// One backfill range after `after`: where it ends (the last object of `source`'s next
    /// scan page, or None when that page is the last: the rest of the name space), and what
    /// `target` must copy from `source` and remove to equal it there.
    pub(super) async fn backfill_range(
        &self,
        id: PgId,
        interval_epoch: Epoch,
        source: OsdId,
        target: OsdId,
        after: Option<&ObjectName>,
    ) -> Result<BackfillRange, OpError> {
        let wanted = self.scan(id, interval_epoch, source, after).await?;
        let end = (wanted.len() >= BACKFILL_SCAN)
            .then(|| wanted.last().map(|(n, _)| n.clone()))
            .flatten();
        let have = self
            .scan_range(id, interval_epoch, target, after, end.as_ref())
            .await?;
        let (copy, remove) = peering::backfill_diff(&wanted, &have);
        Ok(BackfillRange { end, copy, remove })
    }
}

/// See [`OsdCore::backfill_range`].
pub(super) struct BackfillRange {
    pub end: Option<ObjectName>,
    pub copy: Vec<ObjectName>,
    pub remove: Vec<ObjectName>,
}
