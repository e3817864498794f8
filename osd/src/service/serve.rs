//! What both transports (the gRPC service and the data-path messenger) call for a request:
//! a client's osd caps checked against the pool, a peer's envelope checked to come from the
//! OSD it names, then the handler, with the per-op metrics.

use std::sync::Arc;

use basalt_auth::{Authenticated, Perm};
use basalt_maps::{Epoch, OsdMap, PoolId};
use basalt_ops::{encode, ObjOp, OpError};
use basalt_proto::osd as pb;

use super::op::stage;
use super::OsdCore;
use crate::peer_msg::{header_of, PeerHeader, SubOp};

/// What an object op needs of the client's osd caps: `r` to read, `w` to change, `x` for
/// the class-style lock ops (Ceph's cls_lock).
fn op_needs(op: &ObjOp) -> Perm {
    let base = if op.is_write() { Perm::W } else { Perm::R };
    match op {
        ObjOp::Lock { .. }
        | ObjOp::Unlock { .. }
        | ObjOp::BreakLock { .. }
        | ObjOp::LockInfo { .. } => base.union(Perm::X),
        _ => base,
    }
}

impl OsdCore {
    /// Whether `peer`'s osd caps grant `need` on pool `pool`, by its name in this OSD's map
    /// once it is at least the request's `epoch` (a pool the client knows of may be newer
    /// than this OSD's map; 0: the current map).
    pub async fn check_pool(
        &self,
        peer: &Authenticated,
        pool: PoolId,
        epoch: Epoch,
        need: Perm,
    ) -> Result<(), OpError> {
        let map = match epoch {
            0 => self
                .current_map()
                .ok_or_else(|| OpError::Io("no OSDMap yet".into()))?,
            e => self.map_at_least(e).await?,
        };
        Self::pool_allows(&map, peer, pool, need)
    }

    pub(super) fn pool_allows(
        map: &OsdMap,
        peer: &Authenticated,
        pool: PoolId,
        need: Perm,
    ) -> Result<(), OpError> {
        let name = map
            .pools
            .get(&pool)
            .map(|p| p.name.clone())
            .ok_or(OpError::NoSuchPool(pool))?;
        peer.check_osd(&name, need)
            .map_err(|e| OpError::PermissionDenied(e.to_string()))
    }

    /// The envelope of a request only OSD daemons send (sub-ops, peering, pushes): the peer
    /// must be `osd.N` (checked first, so nobody else learns anything from the reply), the
    /// envelope of this message version, and its `from` (the sender it names) N.
    pub fn osd_peer_header(
        peer: &Authenticated,
        header: Option<&pb::PeerHeader>,
    ) -> Result<PeerHeader, OpError> {
        let denied = |e: basalt_auth::PermissionDenied| OpError::PermissionDenied(e.to_string());
        peer.check_is_osd(None).map_err(denied)?;
        let header = header_of(header)?;
        peer.check_is_osd(Some(header.from)).map_err(denied)?;
        Ok(header)
    }

    /// Answers a client's op, whichever transport it came on (the data-path messenger, or
    /// the gRPC service for older clients), if `peer`'s caps allow every op in it.
    pub async fn serve_op(
        self: &Arc<Self>,
        peer: &Authenticated,
        req: pb::OpRequest,
    ) -> pb::OpReply {
        let started = std::time::Instant::now();
        let bytes_in = req.ops.len() as u64;
        // Write payloads stay slices of the received frame (no copy).
        let (kind, r) = match basalt_ops::decode_shared::<Vec<ObjOp>>(&req.ops, "ops") {
            Ok(ops) => {
                let kind = if ops.iter().any(ObjOp::is_write) {
                    "write"
                } else {
                    "read"
                };
                let need = ops.iter().map(op_needs).fold(Perm::default(), Perm::union);
                match self.check_pool(peer, req.pool, req.epoch, need).await {
                    Ok(()) => (kind, self.handle_op(req, ops).await),
                    Err(e) => ("denied", Err(e)),
                }
            }
            Err(e) => ("malformed", Err(e)),
        };
        metrics::counter!("basalt_osd_client_ops_total", "kind" => kind, "result" => if r.is_ok() { "ok" } else { "error" }).increment(1);
        metrics::histogram!("basalt_osd_client_op_seconds", "kind" => kind)
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("basalt_osd_client_bytes_total", "direction" => "in").increment(bytes_in);
        let result = encode(&r);
        metrics::counter!("basalt_osd_client_bytes_total", "direction" => "out")
            .increment(result.len() as u64);
        pb::OpReply {
            epoch: reply_epoch(self),
            result,
        }
    }

    /// Answers a primary's sub-op, whichever transport it came on, if it is from the OSD it
    /// names.
    pub async fn serve_sub_op(
        &self,
        peer: &Authenticated,
        req: pb::SubOpRequest,
    ) -> pb::SubOpReply {
        let started = std::time::Instant::now();
        let r = match Self::osd_peer_header(peer, req.header.as_ref()) {
            Ok(_) => {
                let decoding = std::time::Instant::now();
                let sub_op = SubOp::from_pb(req);
                stage("sub_op_decode", decoding);
                match sub_op {
                    Ok(sub_op) => self.handle_sub_op(sub_op).await,
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        metrics::histogram!("basalt_osd_sub_op_seconds").record(started.elapsed().as_secs_f64());
        pb::SubOpReply { result: encode(&r) }
    }
}

pub(super) fn reply_epoch(core: &OsdCore) -> u64 {
    core.current_map().map_or(0, |m| m.epoch)
}
