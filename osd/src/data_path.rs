//! The OSD's side of the data-path messenger: a frame's `prost` request decoded and answered
//! by the same [`OsdCore`] handlers the gRPC service uses, so the two transports cannot drift
//! (caps included: the messenger authenticated the connection, the handlers check caps).

use std::sync::Arc;

use basalt_auth::Authenticated;
use basalt_messenger::{Handler, HandlerFuture};
use basalt_proto::data_path::{OP, SUB_OP};
use basalt_proto::osd as pb;
use bytes::Bytes;
use prost::Message;

use crate::service::OsdCore;

/// Answers client ops and sub-ops arriving on the messenger.
pub struct DataPath {
    pub core: Arc<OsdCore>,
}

impl Handler for DataPath {
    fn handle(&self, peer: &Arc<Authenticated>, tag: u8, payload: Bytes) -> HandlerFuture {
        let core = self.core.clone();
        let peer = peer.clone();
        Box::pin(async move {
            match tag {
                OP => {
                    let req = pb::OpRequest::decode(payload)
                        .map_err(|e| format!("undecodable op request: {e}"))?;
                    Ok(Bytes::from(core.serve_op(&peer, req).await.encode_to_vec()))
                }
                SUB_OP => {
                    let req = pb::SubOpRequest::decode(payload)
                        .map_err(|e| format!("undecodable sub-op request: {e}"))?;
                    Ok(Bytes::from(core.serve_sub_op(&peer, req).await.encode_to_vec()))
                }
                other => Err(format!(
                    "unknown data-path message type {other}; this OSD knows op ({OP}) and sub-op ({SUB_OP})"
                )),
            }
        })
    }
}
