//! `basalt-client`: the Rust client of a basalt cluster (librados-like).
//!
//! Owns talking to the cluster on behalf of applications, OSDs and the CLI.
//! So far that is the monitor side: [`MonClient`] finds a monitor that can
//! answer, retries on another when one is down or without quorum (bounded by
//! the op timeout), maps gRPC failures to typed [`ClientError`]s, and keeps a
//! subscribed, always-current OSDMap ([`MonClient::subscribe`]).
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

mod error;
mod mon;
mod rados;

pub use basalt_ops as ops;
pub use error::ClientError;
pub use mon::{MapSubscription, MonClient};
pub use rados::{IoCtx, ObjectStat, Rados, Watch, WatchEvent, DEFAULT_WATCH_TIMEOUT};
