//! The OSD's gRPC service ([`OsdService`]): each call's authenticated peer handed to
//! [`OsdCore`]'s handlers, errors mapped to statuses where a call has no encoded result, and
//! the heartbeat ping.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use basalt_auth::Perm;
use basalt_ops::{encode, OpError};
use basalt_proto::auth::{denied, peer};
use basalt_proto::osd as pb;
use futures::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::serve::reply_epoch;
use super::OsdCore;

/// The gRPC face of [`OsdCore`] plus the heartbeat.
pub struct OsdService {
    pub core: Arc<OsdCore>,
    pub epoch: Arc<AtomicU64>,
}

/// An OSD refusal as a gRPC error, for the few calls that answer with a bare status rather
/// than an encoded `OpError` (notify acks); its kind says what the client should do.
fn op_error_status(e: OpError) -> Status {
    use basalt_proto::status::ErrorKind;
    let kind = match &e {
        OpError::Blocklisted(_) => ErrorKind::Blocklisted,
        OpError::PermissionDenied(_) => ErrorKind::PermissionDenied,
        OpError::NotFound | OpError::NoSuchPool(_) => ErrorKind::NotFound,
        OpError::Exists => ErrorKind::Exists,
        OpError::InvalidArgument(_) | OpError::BadPeerMessage(_) => ErrorKind::InvalidArgument,
        OpError::NotPrimary { .. }
        | OpError::IntervalChanged { .. }
        | OpError::Inactive { .. }
        | OpError::MapBehind { .. }
        | OpError::Busy(_) => ErrorKind::Unavailable,
        OpError::CmpFailed(_) | OpError::NoSpace(_) | OpError::PoolFull { .. } => {
            ErrorKind::FailedPrecondition
        }
        OpError::Corrupt(_) | OpError::Io(_) => ErrorKind::Internal,
    };
    kind.status(e.to_string())
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::osd_server::Osd for OsdService {
    async fn ping(&self, req: Request<pb::PingRequest>) -> Result<Response<pb::PingReply>, Status> {
        peer(&req)?.check_is_osd(None).map_err(denied)?;
        let Some(osd_id) = self.core.me() else {
            return Err(basalt_proto::status::unavailable(
                "this OSD has not booted yet",
            ));
        };
        Ok(Response::new(pb::PingReply {
            osd_id,
            epoch: self.epoch.load(Ordering::Relaxed),
        }))
    }

    async fn op(&self, req: Request<pb::OpRequest>) -> Result<Response<pb::OpReply>, Status> {
        let who = peer(&req)?;
        Ok(Response::new(
            self.core.serve_op(&who, req.into_inner()).await,
        ))
    }

    async fn list_objects(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListReply>, Status> {
        let who = peer(&req)?;
        let (pool, epoch) = (req.get_ref().pool, req.get_ref().epoch);
        let r = match self.core.check_pool(&who, pool, epoch, Perm::R).await {
            Ok(()) => self.core.handle_list(req.into_inner()).await,
            Err(e) => Err(e),
        };
        Ok(Response::new(pb::ListReply {
            epoch: reply_epoch(&self.core),
            result: encode(&r),
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<Streaming<pb::WatchPing>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let who = peer(&req)?;
        let rx = self.core.handle_watch(&who, req.into_inner()).await?;
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn notify(
        &self,
        req: Request<pb::NotifyRequest>,
    ) -> Result<Response<pb::NotifyReply>, Status> {
        let who = peer(&req)?;
        let (pool, epoch) = (req.get_ref().pool, req.get_ref().epoch);
        let r = match self.core.check_pool(&who, pool, epoch, Perm::X).await {
            Ok(()) => self.core.handle_notify(req.into_inner()).await,
            Err(e) => Err(e),
        };
        Ok(Response::new(pb::NotifyReply {
            epoch: reply_epoch(&self.core),
            result: encode(&r),
        }))
    }

    async fn notify_ack(
        &self,
        req: Request<pb::NotifyAckRequest>,
    ) -> Result<Response<pb::NotifyAckReply>, Status> {
        let who = peer(&req)?;
        if let Err(e) = self
            .core
            .check_pool(&who, req.get_ref().pool, 0, Perm::X)
            .await
        {
            return Err(op_error_status(e));
        }
        self.core.handle_notify_ack(req.into_inner());
        Ok(Response::new(pb::NotifyAckReply {}))
    }

    async fn sub_op(
        &self,
        req: Request<pb::SubOpRequest>,
    ) -> Result<Response<pb::SubOpReply>, Status> {
        let who = peer(&req)?;
        Ok(Response::new(
            self.core.serve_sub_op(&who, req.into_inner()).await,
        ))
    }

    async fn pg_query(
        &self,
        req: Request<pb::PgQueryRequest>,
    ) -> Result<Response<pb::PgQueryReply>, Status> {
        let who = peer(&req)?;
        let r = match OsdCore::osd_peer_header(&who, req.get_ref().header.as_ref()) {
            Ok(header) => self.core.handle_pg_query(header).await,
            Err(e) => Err(e),
        };
        Ok(Response::new(pb::PgQueryReply { result: encode(&r) }))
    }

    async fn pg_pull(
        &self,
        req: Request<pb::PgPullRequest>,
    ) -> Result<Response<pb::PgPullReply>, Status> {
        let who = peer(&req)?;
        let r = match OsdCore::osd_peer_header(&who, req.get_ref().header.as_ref()) {
            Ok(header) => self.core.handle_pg_pull(header, req.into_inner()).await,
            Err(e) => Err(e),
        };
        Ok(Response::new(pb::PgPullReply { result: encode(&r) }))
    }

    async fn pg_scan(
        &self,
        req: Request<pb::PgScanRequest>,
    ) -> Result<Response<pb::PgScanReply>, Status> {
        let who = peer(&req)?;
        let r = match OsdCore::osd_peer_header(&who, req.get_ref().header.as_ref()) {
            Ok(header) => self.core.handle_pg_scan(header, req.into_inner()).await,
            Err(e) => Err(e),
        };
        Ok(Response::new(pb::PgScanReply { result: encode(&r) }))
    }

    async fn pg_push(
        &self,
        req: Request<pb::PgPushRequest>,
    ) -> Result<Response<pb::PgPushReply>, Status> {
        let who = peer(&req)?;
        let r = match OsdCore::osd_peer_header(&who, req.get_ref().header.as_ref()) {
            Ok(header) => self.core.handle_pg_push(header, req.into_inner()).await,
            Err(e) => Err(e),
        };
        Ok(Response::new(pb::PgPushReply { result: encode(&r) }))
    }

    async fn pg_scrub_map(
        &self,
        req: Request<pb::PgScrubMapRequest>,
    ) -> Result<Response<pb::PgScrubMapReply>, Status> {
        let who = peer(&req)?;
        let r = match OsdCore::osd_peer_header(&who, req.get_ref().header.as_ref()) {
            Ok(header) => {
                self.core
                    .handle_pg_scrub_map(header, req.into_inner())
                    .await
            }
            Err(e) => Err(e),
        };
        Ok(Response::new(pb::PgScrubMapReply { result: encode(&r) }))
    }

    async fn pg_command(
        &self,
        req: Request<pb::PgCommandRequest>,
    ) -> Result<Response<pb::PgCommandReply>, Status> {
        // Scrub and repair read and rewrite every object of the PG.
        let who = peer(&req)?;
        let (pool, epoch) = (req.get_ref().pool, req.get_ref().epoch);
        let r = match self.core.check_pool(&who, pool, epoch, Perm::RWX).await {
            Ok(()) => self.core.handle_pg_command(req.into_inner()).await,
            Err(e) => Err(e),
        };
        Ok(Response::new(pb::PgCommandReply {
            epoch: reply_epoch(&self.core),
            result: encode(&r),
        }))
    }

    async fn pg_stats(
        &self,
        req: Request<pb::PgStatsRequest>,
    ) -> Result<Response<pb::PgStatsReply>, Status> {
        // Only the PGs of pools the peer may read.
        let who = peer(&req)?;
        let map = self.core.current_map();
        let stats: Vec<_> = self
            .core
            .primary_pg_stats()
            .into_iter()
            .filter(|s| {
                map.as_ref()
                    .is_some_and(|m| OsdCore::pool_allows(m, &who, s.pool, Perm::R).is_ok())
            })
            .collect();
        Ok(Response::new(pb::PgStatsReply {
            epoch: reply_epoch(&self.core),
            stats: encode(&stats),
        }))
    }
}
