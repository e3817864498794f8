//! `basalt-client`: the Rust client of a basalt cluster (librados-like).
//!
//! Owns talking to the cluster on behalf of applications, OSDs and the CLI:
//!
//! - [`Credentials`] (a keyring's key) and the session behind every client: the handshake
//!   with a monitor, the `mon` and `osd` tickets it grants (renewed before they expire),
//!   and a fresh authorizer on every request and messenger connection. A refusal is
//!   [`ClientError::Unauthenticated`] (who we are) or [`ClientError::PermissionDenied`]
//!   (what our caps allow), never a retry.
//! - [`MonClient`] finds a monitor that can answer, retries on another when one
//!   is down or without quorum (bounded by the op timeout), maps gRPC failures
//!   to typed [`ClientError`]s, and keeps a subscribed, always-current OSDMap
//!   ([`MonClient::subscribe`]).
//! - [`Rados`] / [`IoCtx`] are the object side: every op of the OSD (reads,
//!   writes, xattrs, omap, compound ops, locks, watch/notify, listing), routed
//!   by placement to the PG's primary and resent with the same request id
//!   across map changes, so an op is applied at most once. Ops wait through
//!   peering and failures with no bound unless `osd_op_timeout_ms` sets one.
//!   Object ops travel on the data-path messenger (`basalt-messenger`, one
//!   connection per OSD shared by every `IoCtx`); listing, watch/notify and PG
//!   commands on gRPC. Both are TLS unless the config's `[tls]` turns it off
//!   (`basalt-tls`; servers verified against the cluster CA).
//!
//! ```no_run
//! # async fn demo() -> Result<(), basalt_client::ClientError> {
//! use basalt_client::{ops::ObjOp, Rados};
//! use bytes::Bytes;
//! let config = basalt_config::ClusterConfig::load(std::path::Path::new("cluster.toml"))
//!     .map_err(|e| basalt_client::ClientError::Config(e.to_string()))?;
//! let rados = Rados::connect(config).await?;
//! let io = rados.ioctx("rbd")?;
//! io.write_full("greeting", Bytes::from_static(b"hello")).await?;
//! assert_eq!(io.read("greeting", 0, 5).await?, Bytes::from_static(b"hello"));
//! // Several steps on one object, applied atomically on every replica:
//! io.operate("greeting", vec![
//!     ObjOp::Append { data: Bytes::from_static(b", world") },
//!     ObjOp::SetXattr { name: "lang".into(), value: Bytes::from_static(b"en") },
//! ]).await?;
//! // Watch/notify: a watcher gets every notification until it is dropped.
//! let mut watch = io.watch("greeting", basalt_client::DEFAULT_WATCH_TIMEOUT).await?;
//! let notifier = io.clone();
//! let reply = tokio::spawn(async move {
//!     notifier.notify("greeting", Bytes::from_static(b"ping"), std::time::Duration::from_secs(5)).await
//! });
//! if let Some(basalt_client::WatchEvent::Notify { notify_id, .. }) = watch.events.recv().await {
//!     io.notify_ack("greeting", notify_id, watch.cookie, Bytes::new()).await?;
//! }
//! let acks = reply.await.map_err(|e| basalt_client::ClientError::Internal(e.to_string()))??;
//! assert_eq!(acks.acks.len(), 1);
//! # Ok(()) }
//! ```
//!
//! ```no_run
//! # async fn demo() -> Result<(), basalt_client::ClientError> {
//! let config = basalt_config::ClusterConfig::load(std::path::Path::new("cluster.toml"))
//!     .map_err(|e| basalt_client::ClientError::Config(e.to_string()))?;
//! let mon = basalt_client::MonClient::new(config)?;
//! mon.pool_create("rbd", 3, 2, 64).await?;
//! let map = mon.osdmap().await?;
//! assert!(map.pool_by_name("rbd").is_some());
//! # Ok(()) }
//! ```

mod auth;
mod error;
mod mon;
mod rados;

use std::time::Duration;

/// A lazily connected gRPC channel to `addr` (`host:port`) as every basalt client and daemon
/// dials its peers: through `connector` (TLS verified against the cluster CA, or plain text
/// when `[tls]` is off; it sets TCP_NODELAY), with the data path's HTTP/2 tuning
/// ([`basalt_proto::transport::tune`]: windows, frame size), and HTTP/2 keepalive so a peer
/// behind a link that went silent (no RST, as with a cut cable or a hung host) is noticed
/// within seconds and the caller moves on to another monitor or a newer map, instead of
/// waiting on it for the whole operation timeout.
pub fn lazy_channel(
    addr: &str,
    connector: &basalt_tls::Connector,
    connect_timeout: Duration,
) -> Result<tonic::transport::Channel, String> {
    // The scheme stays http: TLS, when on, is the connector's, below HTTP/2.
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("bad address {addr}: {e}"))?;
    let endpoint = basalt_proto::transport::tune(endpoint)
        .connect_timeout(connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true);
    Ok(basalt_tls::channel(endpoint, connector))
}

/// The connector `[tls]` of `config` asks for, as a client error naming the fix.
pub fn connector_for(
    config: &basalt_config::ClusterConfig,
) -> Result<basalt_tls::Connector, ClientError> {
    basalt_tls::Connector::for_cluster(&config.tls).map_err(|e| {
        ClientError::Config(format!(
            "{e} (TLS is on: [tls] ca_file names the cluster CA certificate, by default \
             tls/ca-cert.pem beside cluster.toml; copy it from the cluster, or set [tls] \
             enabled = false on a cluster without TLS)"
        ))
    })
}

/// Register descriptions of this crate's metrics with the installed recorder.
pub fn describe_metrics() {
    metrics::describe_histogram!(
        "basalt_client_op_stage_seconds",
        "Time per stage of an object op in this client: encode, each rpc attempt (sent to \
         reply), and the whole op (routing, waits for newer maps and resends included)"
    );
}

pub use auth::Credentials;
pub use basalt_ops as ops;
pub use error::ClientError;
pub use mon::{MapSubscription, MonClient};
pub use rados::{IoCtx, ObjectStat, Rados, Watch, WatchEvent, DEFAULT_WATCH_TIMEOUT};
