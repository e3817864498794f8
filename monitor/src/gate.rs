//! The monitors' side of authentication on the wire (README "Authentication").
//!
//! - [`MonKeys`]: the services' rotating secrets, derived from the `mon.` key every monitor
//!   holds (`ServiceKeys::derived`: one secret per period of `[auth] ticket_ttl_secs`), so
//!   every monitor seals and opens the same tickets without sharing state; the [`Guard`]
//!   that checks every gRPC request's authorizer; and this monitor's own `mon.` ticket,
//!   minted from the mon service secret, with which it talks to its peers (Paxos, forwarded
//!   commands).
//! - [`Handshakes`]: the handshakes between a client's Hello and its Proof, bounded in
//!   number and age.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use basalt_auth::handshake::{ClientTicket, ServerHandshake, Service, ServiceKeys, Ticket};
use basalt_auth::live::{now_ms, random, random_secret};
use basalt_auth::{Caps, EntityName, Guard, Secret, TicketCell};

pub struct MonKeys {
    mon_key: Secret,
    ttl_ms: u64,
    /// Checks the authorizers of requests to this monitor.
    pub guard: Arc<Guard>,
    /// This monitor's ticket for the mon service, as `mon.`.
    pub own_ticket: Arc<TicketCell>,
}

impl MonKeys {
    pub fn new(mon_key: Secret, ttl_ms: u64) -> Arc<Self> {
        let keys = Arc::new(MonKeys {
            mon_key,
            ttl_ms: ttl_ms.max(2_000),
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

    /// The secret tickets are sealed with now: the current period's.
    pub fn sealing(&self, service: Service, now_ms: u64) -> ServiceKeys {
        let p = self.period(now_ms);
        ServiceKeys::derived(&self.mon_key, service, p, p)
    }

    /// The secrets a service accepts now: the previous period's (tickets sealed just before
    /// the rotation live on until they expire), the current one and the next (a service whose
    /// refresh lags the rotation still opens new tickets).
    pub fn accepting(&self, service: Service, now_ms: u64) -> ServiceKeys {
        let p = self.period(now_ms);
        ServiceKeys::derived(&self.mon_key, service, p.saturating_sub(1), p + 1)
    }

    /// Re-derives the guard's secrets and mints a fresh own ticket.
    pub fn refresh(&self) {
        let now = now_ms();
        self.guard.set_keys(self.accepting(Service::Mon, now));
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
        if let Some(sealed) = self.sealing(Service::Mon, now).seal(&ticket, nonce) {
            self.own_ticket.set(ClientTicket {
                service: Service::Mon,
                expires_ms: ticket.expires_ms,
                ticket: sealed,
                session_key,
            });
        }
    }

    /// Refreshes every quarter of a ticket's life (at most every 30 s), for as long as the
    /// monitor runs.
    pub fn spawn_refresher(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        let every = Duration::from_millis((self.ttl_ms / 4).clamp(500, 30_000));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                self.refresh();
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
