//! The monitors' side of authentication on the wire (README "Authentication").
//!
//! - [`MonKeys`]: the services' rotating secrets as last committed (random, made by the
//!   leader and committed through Paxos: `AuthService::rotate_if_due`), which seal the
//!   tickets clients get and open the ones they present; the [`Guard`] that checks every gRPC
//!   request's authorizer; and this monitor's own `mon.` ticket for its peers (Paxos,
//!   forwarded commands), sealed with a secret derived from the `mon.` key
//!   (`ServiceKeys::monitor_peers`), because Paxos cannot wait for a Paxos commit.
//! - [`Handshakes`]: the handshakes between a client's Hello and its Proof, bounded in
//!   number and age.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use basalt_auth::handshake::{ClientTicket, ServerHandshake, Service, ServiceKeys, Ticket};
use basalt_auth::live::{now_ms, random, random_secret};
use basalt_auth::{AuthDb, Caps, EntityName, Guard, Secret, TicketCell};
use tokio::sync::watch;

use crate::node::NodeView;

pub struct MonKeys {
    mon_key: Secret,
    ttl_ms: u64,
    /// The auth database as last committed: its rotating secrets.
    committed: RwLock<Arc<AuthDb>>,
    /// Checks the authorizers of requests to this monitor.
    pub guard: Arc<Guard>,
    /// This monitor's ticket for the mon service, as `mon.`.
    pub own_ticket: Arc<TicketCell>,
}

impl MonKeys {
    pub fn new(mon_key: Secret, ttl_ms: u64, committed: Arc<AuthDb>) -> Arc<Self> {
        let keys = Arc::new(MonKeys {
            mon_key,
            ttl_ms: ttl_ms.max(2_000),
            committed: RwLock::new(committed),
            guard: Arc::new(Guard::default()),
            own_ticket: Arc::new(TicketCell::default()),
        });
        keys.refresh();
        keys
    }

    pub fn ttl_ms(&self) -> u64 {
        self.ttl_ms
    }

    fn period(&self, now_ms: u64) -> u64 {
        now_ms / self.ttl_ms
    }

    fn committed(&self) -> Arc<AuthDb> {
        self.committed
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The secrets tickets are sealed with now: the committed ones up to the current period
    /// (the next one is committed ahead); `None` until the leader's first rotation commits.
    pub fn sealing(&self, service: Service, now_ms: u64) -> Option<ServiceKeys> {
        let keys = self
            .committed()
            .rotating(service)
            .up_to(self.period(now_ms));
        (!keys.is_empty()).then_some(keys)
    }

    /// The committed secrets `service` accepts: every kept one (the database keeps the two
    /// before the current, whose tickets live on until they expire, and the next).
    pub fn accepting(&self, service: Service) -> ServiceKeys {
        self.committed().rotating(service)
    }

    /// The monitors' own peer secrets for the periods around now.
    fn peer_keys(&self, now_ms: u64) -> ServiceKeys {
        let p = self.period(now_ms);
        ServiceKeys::monitor_peers(&self.mon_key, p.saturating_sub(1), p + 1)
    }

    /// A commit changed the auth database: its secrets open tickets from now on.
    fn on_commit(&self, db: Arc<AuthDb>) {
        *self.committed.write().unwrap_or_else(|p| p.into_inner()) = db;
        self.set_guard_keys(now_ms());
    }

    fn set_guard_keys(&self, now_ms: u64) {
        let mut keys = self.accepting(Service::Mon);
        keys.extend(&self.peer_keys(now_ms));
        self.guard.set_keys(keys);
    }

    /// Renews the guard's peer secrets and mints a fresh own ticket.
    pub fn refresh(&self) {
        let now = now_ms();
        self.set_guard_keys(now);
        let (Ok(session_key), Ok(nonce)) = (random_secret(), random::<12>()) else {
            tracing::error!("no randomness from the OS: this monitor's own ticket is not renewed");
            return;
        };
        let ticket = Ticket {
            entity: EntityName::mon(),
            caps: Caps::from_pairs(&["mon", "allow *"]).unwrap_or_default(),
            expires_ms: now + self.ttl_ms,
            session_key: session_key.clone(),
        };
        let p = self.period(now);
        let sealing = ServiceKeys::monitor_peers(&self.mon_key, p, p);
        if let Some(sealed) = sealing.seal(&ticket, nonce) {
            self.own_ticket.set(ClientTicket {
                service: Service::Mon,
                expires_ms: ticket.expires_ms,
                ticket: sealed,
                session_key,
            });
        }
    }

    /// Follows the committed auth database, and refreshes every quarter of a ticket's life
    /// (at most every 30 s), for as long as the monitor runs.
    pub fn spawn_refresher(
        self: Arc<Self>,
        mut view: watch::Receiver<NodeView>,
    ) -> tokio::task::JoinHandle<()> {
        let every = Duration::from_millis((self.ttl_ms / 4).clamp(500, 30_000));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => self.refresh(),
                    changed = view.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let db = view.borrow_and_update().auth.clone();
                        if !Arc::ptr_eq(&db, &self.committed()) {
                            self.on_commit(db);
                        }
                    }
                }
            }
        })
    }
}

/// Handshakes waiting for their Proof.
#[derive(Default)]
pub struct Handshakes {
    pending: Mutex<HashMap<u64, (ServerHandshake, Instant)>>,
}

/// A handshake not finished within this is forgotten.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// At most this many handshakes wait at once; a flood of Hellos forgets the oldest.
const MAX_PENDING: usize = 4096;

impl Handshakes {
    /// Keeps `h` until its Proof; returns the id the client names it by.
    pub fn insert(&self, h: ServerHandshake) -> Option<u64> {
        let id = u64::from_le_bytes(random::<8>().ok()?);
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        p.retain(|_, (_, at)| now.duration_since(*at) < HANDSHAKE_TIMEOUT);
        if p.len() >= MAX_PENDING {
            if let Some(oldest) = p.iter().min_by_key(|(_, (_, at))| *at).map(|(k, _)| *k) {
                p.remove(&oldest);
            }
        }
        p.insert(id, (h, now));
        Some(id)
    }

    /// The handshake `id`, once: a second Proof for it finds nothing.
    pub fn take(&self, id: u64) -> Option<ServerHandshake> {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let (h, at) = p.remove(&id)?;
        (at.elapsed() < HANDSHAKE_TIMEOUT).then_some(h)
    }
}
