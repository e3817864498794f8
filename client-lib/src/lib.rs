//! `basalt-client`: the Rust client of a basalt cluster (librados-like).
//!
//! Owns talking to the cluster's objects on behalf of applications and the CLI:
//!
//! - [`Credentials`], [`MonClient`] and [`ClientError`] are `basalt-monclient`'s (the
//!   monitors' client, which the OSD uses without this crate), re-exported here: the
//!   session and its tickets (also presented on every OSD request and messenger
//!   connection), monitor commands, maps and subscriptions, typed errors.
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

mod rados;

/// Register descriptions of this crate's metrics with the installed recorder.
pub fn describe_metrics() {
    metrics::describe_histogram!(
        "basalt_client_op_stage_seconds",
        "Time per stage of an object op in this client: encode, each rpc attempt (sent to \
         reply), and the whole op (routing, waits for newer maps and resends included)"
    );
}

pub use basalt_monclient::{
    connector_for, lazy_channel, ClientError, Credentials, MapSubscription, MonClient,
};
pub use basalt_ops as ops;
pub use rados::{IoCtx, ObjectStat, Rados, Watch, WatchEvent, DEFAULT_WATCH_TIMEOUT};
