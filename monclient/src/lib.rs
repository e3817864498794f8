//! `basalt-monclient`: how anything in a basalt cluster talks to the monitors.
//!
//! Owns, for the client library, the OSD daemon and the CLI alike:
//!
//! - [`Credentials`] (a keyring's key) and the session behind every client: the handshake
//!   with a monitor, the `mon` and `osd` tickets it grants (renewed before they expire),
//!   and a fresh authorizer on every request. A refusal is [`ClientError::Unauthenticated`]
//!   (who we are) or [`ClientError::PermissionDenied`] (what our caps allow), never a retry.
//! - [`MonClient`]: finds a monitor that can answer, retries on another when one is down or
//!   without quorum (bounded by the op timeout), reports an outcome it cannot know as
//!   [`ClientError::Ambiguous`], and keeps a subscribed, always-current OSDMap
//!   ([`MonClient::subscribe`]); the OSD's calls (boot, beacon, failure reports, PG
//!   activations, service keys) are here too.
//! - [`ClientError`], the typed error of every basalt client, mapped from the kind a server
//!   puts on its gRPC errors (`basalt_proto::status`) and from tonic's own transport errors
//!   by their type, never from message text.
//! - How every basalt client and daemon dials a peer ([`lazy_channel`], [`connector_for`]).
//!
//! Object I/O (`Rados`, `IoCtx`) is `basalt-client`'s, which builds on this crate; the OSD
//! depends on this crate only.

mod auth;
mod error;
mod mon;

use std::time::Duration;

pub use auth::Credentials;
pub use error::ClientError;
pub use mon::{MapSubscription, MonClient};

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
