//! Outbound consensus traffic: one sender task and bounded queue per peer.
//! Messages to an unreachable peer are dropped — Paxos and the elector
//! recover from loss by timeouts — so a dead monitor never backs up the
//! state owner.

use std::sync::Arc;
use std::time::Duration;

use basalt_auth::TicketCell;
use basalt_config::ClusterConfig;
use basalt_maps::encode;
use basalt_paxos::{Message, Rank};
use basalt_proto::auth::AuthChannel;
use basalt_proto::mon::{mon_peer_client::MonPeerClient, PeerEnvelope};
use tokio::sync::mpsc;
use tonic::transport::Endpoint;

use crate::node::PeerOutbox;

/// `ticket` is this monitor's own `mon.` ticket: peers accept consensus traffic only from
/// holders of the monitors' key.
pub fn spawn_peer_senders(
    config: &ClusterConfig,
    me: Rank,
    connector: &basalt_tls::Connector,
    ticket: Arc<TicketCell>,
) -> PeerOutbox {
    let mut queues = Vec::new();
    for mon in &config.mons {
        if mon.rank == me {
            queues.push(None);
            continue;
        }
        let (tx, rx) = mpsc::channel::<Message>(1024);
        let addr = format!("http://{}", mon.addr);
        tokio::spawn(send_loop(
            addr,
            me,
            config.cluster.fsid.clone(),
            connector.clone(),
            rx,
            ticket.clone(),
        ));
        queues.push(Some(tx));
    }
    let queues = Arc::new(queues);
    Arc::new(move |to: Rank, msg: Message| {
        if let Some(Some(q)) = queues.get(to as usize) {
            if q.try_send(msg).is_err() {
                metrics::counter!("basalt_mon_peer_messages_dropped_total").increment(1);
            }
        }
    })
}

async fn send_loop(
    addr: String,
    me: Rank,
    fsid: String,
    connector: basalt_tls::Connector,
    mut rx: mpsc::Receiver<Message>,
    ticket: Arc<TicketCell>,
) {
    let mut client: Option<MonPeerClient<AuthChannel>> = None;
    while let Some(msg) = rx.recv().await {
        if client.is_none() {
            let Ok(endpoint) = Endpoint::from_shared(addr.clone()) else {
                return;
            };
            let endpoint = endpoint
                .connect_timeout(Duration::from_millis(500))
                .timeout(Duration::from_secs(2));
            let channel = basalt_tls::channel(endpoint, &connector);
            client = Some(MonPeerClient::new(basalt_proto::auth::authorized(
                channel,
                ticket.clone(),
            )));
        }
        let Some(c) = client.as_mut() else { continue };
        let env = PeerEnvelope {
            from: me,
            fsid: fsid.clone(),
            message: encode(&msg).into(),
        };
        if let Err(e) = c.deliver(env).await {
            tracing::debug!(peer = %addr, error = %e, "peer message dropped");
            metrics::counter!("basalt_mon_peer_messages_dropped_total").increment(1);
            // Shed what queued up meanwhile: it is stale, and the protocol resends.
            while rx.try_recv().is_ok() {}
            client = None;
        }
    }
}
