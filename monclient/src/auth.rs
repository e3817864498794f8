//! Authenticating with the monitors: a keyring's key ([`Credentials`]), the handshake with a
//! monitor (`basalt_auth::handshake` over the `MonAuth` gRPC service) and keeping the
//! tickets it grants fresh ([`Session`]). The `mon` ticket signs every monitor request, the
//! `osd` ticket every OSD request and messenger connection.

use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use basalt_auth::handshake::{
    AuthError, Challenge, ClientHandshake, ClientTicket, Granted, Service,
};
use basalt_auth::live::{now_ms, random};
use basalt_auth::{EntityName, Keyring, Secret, TicketCell};
use basalt_config::ClusterConfig;
use basalt_proto::mon::{mon_auth_client::MonAuthClient, AuthHello, AuthProve};
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::ClientError;

/// Who this client is and the key that proves it.
#[derive(Clone)]
pub struct Credentials {
    pub entity: EntityName,
    pub key: Secret,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("entity", &self.entity)
            .finish_non_exhaustive()
    }
}

fn config_error(e: impl std::fmt::Display) -> ClientError {
    ClientError::Config(e.to_string())
}

impl Credentials {
    /// The key of `name` from the keyring at `path`; without a name, `client.admin`'s if the
    /// keyring holds it, else the keyring's only key.
    pub fn load(path: &Path, name: Option<&EntityName>) -> Result<Self, ClientError> {
        let ring = Keyring::load(path).map_err(|e| {
            config_error(format!(
                "cannot read the keyring {}: {e} (pass --keyring FILE, or put `keyring` beside the config)",
                path.display()
            ))
        })?;
        let entity = match name {
            Some(n) => n.clone(),
            None => {
                let admin = EntityName::client("admin").map_err(config_error)?;
                let all: Vec<&EntityName> = ring.iter().map(|(n, _)| n).collect();
                if ring.get(&admin).is_some() {
                    admin
                } else if let [only] = all.as_slice() {
                    (*only).clone()
                } else {
                    return Err(config_error(format!(
                        "the keyring {} holds {} keys and no client.admin: say which with --name",
                        path.display(),
                        all.len()
                    )));
                }
            }
        };
        let key = ring
            .key(&entity)
            .map_err(|e| config_error(format!("{}: {e}", path.display())))?
            .clone();
        Ok(Credentials { entity, key })
    }

    /// From the config's keyring (`[client] keyring`, or `keyring` beside the config):
    /// `preferred`'s key if the keyring holds it, else as [`Credentials::load`] without a name.
    pub fn from_config(
        config: &ClusterConfig,
        preferred: Option<&str>,
    ) -> Result<Self, ClientError> {
        let Some(path) = &config.client.keyring else {
            return Err(config_error(
                "no keyring: the cluster requires authentication; pass --keyring FILE or put the \
                 `keyring` file `basalt cluster up` wrote beside the config",
            ));
        };
        if let Some(name) = preferred.and_then(|p| p.parse::<EntityName>().ok()) {
            if let Ok(ring) = Keyring::load(path) {
                if let Some(e) = ring.get(&name) {
                    return Ok(Credentials {
                        entity: name,
                        key: e.key.clone(),
                    });
                }
            }
        }
        Self::load(path, None)
    }
}

/// Where authentication stands.
#[derive(Clone, Debug)]
pub(crate) enum AuthState {
    /// No ticket yet.
    Pending,
    /// Tickets held (and renewed before they expire).
    Ready,
    /// A monitor refused the key (or failed to prove it knows it): retrying will not help
    /// until the keyring or the auth database changes.
    Refused(ClientError),
}

/// A client's tickets and the task that keeps them fresh.
pub(crate) struct Session {
    pub entity: EntityName,
    pub mon: Arc<TicketCell>,
    pub osd: Arc<TicketCell>,
    state: watch::Receiver<AuthState>,
}

impl Session {
    /// Starts authenticating with `mons` in the background (inside a tokio runtime).
    pub fn start(creds: Credentials, mons: Vec<Channel>) -> Arc<Session> {
        let (tx, rx) = watch::channel(AuthState::Pending);
        let session = Arc::new(Session {
            entity: creds.entity.clone(),
            mon: Arc::default(),
            osd: Arc::default(),
            state: rx,
        });
        tokio::spawn(keep_fresh(Arc::downgrade(&session), creds, mons, tx));
        session
    }

    /// Waits (until `deadline`) for tickets; a refused key fails at once.
    pub async fn ready(&self, deadline: tokio::time::Instant) -> Result<(), ClientError> {
        let mut state = self.state.clone();
        let wait = async move {
            state
                .wait_for(|s| !matches!(s, AuthState::Pending))
                .await
                .map(|s| s.clone())
        };
        match tokio::time::timeout_at(deadline, wait).await {
            Ok(Ok(s)) => match &s {
                AuthState::Refused(e) => Err(e.clone()),
                _ => Ok(()),
            },
            Ok(Err(_)) => Err(ClientError::Internal(
                "the authentication task stopped".into(),
            )),
            Err(_) => Err(ClientError::NoQuorum(format!(
                "could not authenticate as {} with any monitor in time (no quorum?)",
                self.entity
            ))),
        }
    }
}

/// How one handshake failed.
enum Failure {
    /// Definite: wrong key, unknown entity, a monitor that cannot prove the key.
    Refused(ClientError),
    /// This monitor could not answer (down, no quorum): try another.
    Unavailable(String),
}

/// postcard encoding of a handshake message (plain data: it cannot fail).
fn encode(v: &impl serde::Serialize) -> Vec<u8> {
    postcard::to_stdvec(v).unwrap_or_default()
}

/// One handshake with one monitor: the tickets it grants.
async fn handshake(creds: &Credentials, channel: Channel) -> Result<Vec<ClientTicket>, Failure> {
    let mut client = MonAuthClient::new(channel);
    let refused = |e: AuthError| Failure::Refused(ClientError::Unauthenticated(e.to_string()));
    let from_status =
        |s: tonic::Status| match s.code() {
            tonic::Code::Unauthenticated => Failure::Refused(ClientError::Unauthenticated(
                format!("the monitors refused {}: {}", creds.entity, s.message()),
            )),
            _ => Failure::Unavailable(s.message().to_string()),
        };
    let cc = random::<16>().map_err(refused)?;
    let (mut hs, hello) = ClientHandshake::start(creds.entity.clone(), creds.key.clone(), cc);
    let reply = client
        .hello(AuthHello {
            hello: encode(&hello).into(),
        })
        .await
        .map_err(from_status)?
        .into_inner();
    let challenge: Challenge = postcard::from_bytes(&reply.challenge)
        .map_err(|_| Failure::Unavailable("an undecodable challenge".into()))?;
    let proof = hs.on_challenge(&challenge).map_err(refused)?;
    let granted = client
        .prove(AuthProve {
            handshake_id: reply.handshake_id,
            proof: encode(&proof).into(),
        })
        .await
        .map_err(from_status)?
        .into_inner();
    let granted: Granted = postcard::from_bytes(&granted.granted)
        .map_err(|_| Failure::Unavailable("an undecodable grant".into()))?;
    hs.on_granted(granted).map_err(refused)
}

/// Authenticates, then renews at two thirds of the tickets' life, until the session is
/// dropped. Monitors are tried in turn; a refusal is reported and retried slowly (the key may
/// be added meanwhile).
async fn keep_fresh(
    session: Weak<Session>,
    creds: Credentials,
    mons: Vec<Channel>,
    state: watch::Sender<AuthState>,
) {
    let mut next = 0usize;
    loop {
        let mut outcome = None;
        for i in 0..mons.len() {
            let channel = mons[(next + i) % mons.len()].clone();
            match tokio::time::timeout(Duration::from_secs(10), handshake(&creds, channel)).await {
                Ok(Ok(tickets)) => {
                    next = (next + i) % mons.len();
                    outcome = Some(Ok(tickets));
                    break;
                }
                Ok(Err(Failure::Refused(e))) => {
                    outcome = Some(Err(e));
                    break;
                }
                Ok(Err(Failure::Unavailable(why))) => {
                    tracing::debug!(error = %why, "monitor cannot authenticate us; trying the next")
                }
                Err(_) => tracing::debug!("authentication timed out; trying the next monitor"),
            }
        }
        let Some(s) = session.upgrade() else { return };
        let wait = match outcome {
            Some(Ok(tickets)) => {
                let mut expires = u64::MAX;
                for t in tickets {
                    expires = expires.min(t.expires_ms);
                    match t.service {
                        Service::Mon => s.mon.set(t),
                        Service::Osd => s.osd.set(t),
                    }
                }
                state.send_replace(AuthState::Ready);
                let left = expires.saturating_sub(now_ms());
                Duration::from_millis((left * 2 / 3).max(500))
            }
            Some(Err(e)) => {
                tracing::warn!(entity = %creds.entity, error = %e, "authentication refused");
                state.send_replace(AuthState::Refused(e));
                Duration::from_secs(2)
            }
            None => Duration::from_millis(300),
        };
        drop(s);
        tokio::time::sleep(wait).await;
    }
}
