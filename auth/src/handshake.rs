//! The authentication protocol's core, sans-IO: challenge–response on a shared secret,
//! monitor-issued tickets, and per-connection authorizers. Randomness and time are inputs,
//! so every step is deterministic and tested here; transports carry the messages.
//!
//! ```text
//! client (entity E, secret K)                 monitor (looks K up in the auth database)
//!   Hello{E, cc}                      ──▶
//!                                     ◀──     Challenge{sc, HMAC(K, "server"|E|cc|sc)}
//!   (checks the monitor knows K)
//!   Proof{HMAC(K, "client"|E|sc|cc)}  ──▶     (checks the client knows K)
//!                                     ◀──     Granted{per service: ticket, AEAD_K(session key)}
//! ```
//!
//! Neither side sends K; each proves it knows K over the other's fresh challenge, so a
//! recorded exchange replayed against a new challenge fails. The ticket is
//! `{entity, caps, expiry, session key}` sealed (ChaCha20-Poly1305) with a rotating service
//! secret the monitors share with the OSDs; a holder cannot read or alter it. On each
//! connection to a service the client sends an [`Authorizer`]: the ticket plus an HMAC with
//! the session key over a timestamp and nonce. The service opens the ticket with its service
//! secret, checks the expiry, the HMAC, the clock window and that it has not seen the
//! (entity, timestamp, nonce) before ([`AuthorizerVerifier`]), and answers with its own HMAC
//! over the nonce, so the client knows the service holds the service secret too.

use std::collections::{BTreeMap, BTreeSet};

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::caps::Caps;
use crate::entity::EntityName;
use crate::key::Secret;

type HmacSha256 = Hmac<Sha256>;

/// Why an authentication step failed. Every variant leaves nothing granted.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AuthError {
    #[error("{0} is not in the auth database; create it with `basalt auth get-or-create {0}`")]
    UnknownEntity(EntityName),
    #[error("the key does not match the auth database's key for {0} (wrong keyring?)")]
    BadProof(EntityName),
    #[error("the monitor did not prove it knows {0}'s key: it is not a monitor of this cluster, or the keyring is stale")]
    ServerNotAuthentic(EntityName),
    #[error("the ticket cannot be opened: forged, damaged, or sealed with a service secret that has been rotated away")]
    BadTicket,
    #[error(
        "the ticket of {entity} expired at {expired_ms} ms (now {now_ms} ms); authenticate again"
    )]
    Expired {
        entity: EntityName,
        expired_ms: u64,
        now_ms: u64,
    },
    #[error("the authorizer's signature does not match its ticket's session key")]
    BadAuthorizer,
    #[error("the authorizer's timestamp is {skew_ms} ms from this clock, beyond the {window_ms} ms window (clocks out of sync?)")]
    Stale { skew_ms: u64, window_ms: u64 },
    #[error("the authorizer was already used: a replayed handshake")]
    Replayed,
    #[error("the service's reply does not prove it opened the ticket")]
    ServiceNotAuthentic,
    #[error("this service has no service secrets yet (it has not authenticated with the monitors); retry shortly")]
    NoServiceSecrets,
    #[error("no randomness from the operating system: {0}")]
    NoRandomness(String),
}

fn hmac(key: &Secret, parts: &[&[u8]]) -> [u8; 32] {
    let mut mac =
        <HmacSha256 as Mac>::new_from_slice(key.as_bytes()).expect("HMAC takes keys of any size");
    for p in parts {
        mac.update(&(p.len() as u64).to_le_bytes());
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

fn hmac_ok(key: &Secret, parts: &[&[u8]], tag: &[u8]) -> bool {
    let mut mac =
        <HmacSha256 as Mac>::new_from_slice(key.as_bytes()).expect("HMAC takes keys of any size");
    for p in parts {
        mac.update(&(p.len() as u64).to_le_bytes());
        mac.update(p);
    }
    // Constant time.
    mac.verify_slice(tag).is_ok()
}

/// Seals `plain` (ChaCha20-Poly1305) with `key`: how a monitor hands an OSD the service
/// secrets under the OSD's session key.
pub fn seal(key: &Secret, nonce: [u8; 12], plain: &[u8]) -> Vec<u8> {
    let cipher = ChaCha20Poly1305::new(Key::from_slice(key.as_bytes()));
    cipher
        .encrypt(Nonce::from_slice(&nonce), plain)
        .expect("in-memory AEAD encryption does not fail")
}

/// Opens what [`seal`] sealed; `None` if the key is wrong or the bytes were altered.
pub fn open(key: &Secret, nonce: [u8; 12], sealed: &[u8]) -> Option<Vec<u8>> {
    let cipher = ChaCha20Poly1305::new(Key::from_slice(key.as_bytes()));
    cipher.decrypt(Nonce::from_slice(&nonce), sealed).ok()
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub entity: EntityName,
    pub client_challenge: [u8; 16],
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    pub server_challenge: [u8; 16],
    pub server_proof: [u8; 32],
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proof {
    pub client_proof: [u8; 32],
}

/// What a ticket says, readable only by holders of the service secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    pub entity: EntityName,
    pub caps: Caps,
    /// Wall-clock ms after which the ticket is refused.
    pub expires_ms: u64,
    pub session_key: Secret,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedTicket {
    /// Which service secret sealed it.
    pub key_id: u64,
    pub nonce: [u8; 12],
    pub sealed: Vec<u8>,
}

/// A ticket for one service, with its session key sealed for the client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceGrant {
    pub service: Service,
    /// When the ticket expires (also sealed inside it): when the client should renew.
    pub expires_ms: u64,
    pub ticket: SealedTicket,
    /// The session key, sealed with the entity's own secret.
    pub nonce: [u8; 12],
    pub session_key: Vec<u8>,
}

/// What a monitor grants after a successful handshake: one ticket per service, each with its
/// own session key (a service that opens its ticket learns nothing it could use at another).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Granted {
    pub tickets: Vec<ServiceGrant>,
}

/// The services tickets are issued for. Each has its own rotating secrets: the monitors hold
/// both, OSDs only `Osd`'s, so an OSD cannot mint tickets the monitors accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Service {
    Mon,
    Osd,
}

impl Service {
    pub fn as_str(self) -> &'static str {
        match self {
            Service::Mon => "mon",
            Service::Osd => "osd",
        }
    }
}

/// What a client holds for one service after a handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientTicket {
    pub service: Service,
    pub expires_ms: u64,
    pub ticket: SealedTicket,
    pub session_key: Secret,
}

/// The id bit of the monitors' peer secrets ([`ServiceKeys::monitor_peers`]); committed
/// secrets are numbered by rotation period, far below it.
pub const MONITOR_PEER_KEY_IDS: u64 = 1 << 63;

/// The rotating service secrets: the newest seals, every kept one opens, so tickets sealed
/// just before a rotation stay valid until they expire.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceKeys {
    keys: BTreeMap<u64, Secret>,
}

impl ServiceKeys {
    /// Adds secret `id` (the newest) and keeps the `keep` newest.
    pub fn rotate(&mut self, id: u64, key: Secret, keep: usize) {
        self.keys.insert(id, key);
        while self.keys.len() > keep.max(1) {
            self.keys.pop_first();
        }
    }

    /// The kept secrets, oldest first.
    pub fn secrets(&self) -> impl Iterator<Item = (u64, &Secret)> {
        self.keys.iter().map(|(id, k)| (*id, k))
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The newest kept secret's id.
    pub fn newest_id(&self) -> Option<u64> {
        self.keys.last_key_value().map(|(id, _)| *id)
    }

    /// The kept secrets with ids up to `last`: what seals now, when the newest was committed
    /// ahead of its period.
    pub fn up_to(&self, last: u64) -> ServiceKeys {
        ServiceKeys {
            keys: self
                .keys
                .range(..=last)
                .map(|(id, k)| (*id, k.clone()))
                .collect(),
        }
    }

    /// Adds every secret of `other` (ids must not collide; `other`'s win).
    pub fn extend(&mut self, other: &ServiceKeys) {
        for (id, k) in &other.keys {
            self.keys.insert(*id, k.clone());
        }
    }

    /// The secrets the monitors seal their *own* mon-service tickets with, for the periods
    /// `first..=last`, derived from the `mon.` key every monitor holds, so monitors
    /// authenticate each other before any Paxos commit (the clients' and OSDs' service
    /// secrets are random and committed through Paxos — `AuthChange::RotateSecret` — and
    /// Paxos itself cannot wait for them). Only `mon.` holders derive them. Their ids carry
    /// [`MONITOR_PEER_KEY_IDS`], so they never collide with the committed ones.
    pub fn monitor_peers(mon_key: &Secret, first: u64, last: u64) -> ServiceKeys {
        let mut keys = BTreeMap::new();
        for period in first..=last {
            let bytes = hmac(mon_key, &[b"monitor-peer-secret", &period.to_le_bytes()]);
            keys.insert(MONITOR_PEER_KEY_IDS | period, Secret::from_bytes(bytes));
        }
        ServiceKeys { keys }
    }

    fn current(&self) -> Option<(u64, &Secret)> {
        self.keys.iter().next_back().map(|(id, k)| (*id, k))
    }

    /// Seals `ticket` with the newest secret; `None` if there is none yet.
    pub fn seal(&self, ticket: &Ticket, nonce: [u8; 12]) -> Option<SealedTicket> {
        let (key_id, key) = self.current()?;
        let plain = postcard::to_stdvec(ticket).ok()?;
        Some(SealedTicket {
            key_id,
            nonce,
            sealed: seal(key, nonce, &plain),
        })
    }

    /// Opens a ticket sealed by any kept secret and checks it has not expired.
    pub fn open(&self, t: &SealedTicket, now_ms: u64) -> Result<Ticket, AuthError> {
        let key = self.keys.get(&t.key_id).ok_or(AuthError::BadTicket)?;
        let plain = open(key, t.nonce, &t.sealed).ok_or(AuthError::BadTicket)?;
        let ticket: Ticket = postcard::from_bytes(&plain).map_err(|_| AuthError::BadTicket)?;
        if now_ms >= ticket.expires_ms {
            return Err(AuthError::Expired {
                entity: ticket.entity,
                expired_ms: ticket.expires_ms,
                now_ms,
            });
        }
        Ok(ticket)
    }
}

/// The client's side of the handshake with a monitor.
pub struct ClientHandshake {
    entity: EntityName,
    key: Secret,
    client_challenge: [u8; 16],
    server_challenge: Option<[u8; 16]>,
}

impl ClientHandshake {
    /// Starts a handshake; `client_challenge` must be fresh random bytes.
    pub fn start(entity: EntityName, key: Secret, client_challenge: [u8; 16]) -> (Self, Hello) {
        let hello = Hello {
            entity: entity.clone(),
            client_challenge,
        };
        (
            ClientHandshake {
                entity,
                key,
                client_challenge,
                server_challenge: None,
            },
            hello,
        )
    }

    /// Checks the monitor's proof, and answers with the client's.
    pub fn on_challenge(&mut self, c: &Challenge) -> Result<Proof, AuthError> {
        let name = self.entity.to_string();
        if !hmac_ok(
            &self.key,
            &[
                b"server",
                name.as_bytes(),
                &self.client_challenge,
                &c.server_challenge,
            ],
            &c.server_proof,
        ) {
            return Err(AuthError::ServerNotAuthentic(self.entity.clone()));
        }
        self.server_challenge = Some(c.server_challenge);
        Ok(Proof {
            client_proof: hmac(
                &self.key,
                &[
                    b"client",
                    name.as_bytes(),
                    &c.server_challenge,
                    &self.client_challenge,
                ],
            ),
        })
    }

    /// The tickets (with their session keys) the monitor granted.
    pub fn on_granted(self, g: Granted) -> Result<Vec<ClientTicket>, AuthError> {
        if self.server_challenge.is_none() {
            return Err(AuthError::ServerNotAuthentic(self.entity));
        }
        let mut out = Vec::new();
        for grant in g.tickets {
            let plain = open(&self.key, grant.nonce, &grant.session_key)
                .ok_or_else(|| AuthError::ServerNotAuthentic(self.entity.clone()))?;
            let bytes: [u8; 32] = plain
                .as_slice()
                .try_into()
                .map_err(|_| AuthError::ServerNotAuthentic(self.entity.clone()))?;
            out.push(ClientTicket {
                service: grant.service,
                expires_ms: grant.expires_ms,
                ticket: grant.ticket,
                session_key: Secret::from_bytes(bytes),
            });
        }
        Ok(out)
    }
}

/// The monitor's side of one handshake.
pub struct ServerHandshake {
    entity: EntityName,
    key: Secret,
    caps: Caps,
    client_challenge: [u8; 16],
    server_challenge: [u8; 16],
}

impl ServerHandshake {
    /// Answers a Hello; `key` and `caps` are the entity's in the auth database (`None`:
    /// unknown entity), `server_challenge` fresh random bytes.
    pub fn on_hello(
        hello: &Hello,
        record: Option<(&Secret, &Caps)>,
        server_challenge: [u8; 16],
    ) -> Result<(Self, Challenge), AuthError> {
        let (key, caps) = record.ok_or_else(|| AuthError::UnknownEntity(hello.entity.clone()))?;
        let name = hello.entity.to_string();
        let challenge = Challenge {
            server_challenge,
            server_proof: hmac(
                key,
                &[
                    b"server",
                    name.as_bytes(),
                    &hello.client_challenge,
                    &server_challenge,
                ],
            ),
        };
        Ok((
            ServerHandshake {
                entity: hello.entity.clone(),
                key: key.clone(),
                caps: caps.clone(),
                client_challenge: hello.client_challenge,
                server_challenge,
            },
            challenge,
        ))
    }

    /// Checks the client's proof and grants one ticket per service in `grants`, valid for
    /// `ttl_ms` from `now_ms`. Each grant names the service, its secrets, a fresh session key
    /// and two fresh nonces (the ticket's and the sealed session key's).
    pub fn on_proof(
        self,
        proof: &Proof,
        now_ms: u64,
        ttl_ms: u64,
        grants: Vec<(Service, &ServiceKeys, Secret, [u8; 12], [u8; 12])>,
    ) -> Result<(EntityName, Granted), AuthError> {
        let name = self.entity.to_string();
        if !hmac_ok(
            &self.key,
            &[
                b"client",
                name.as_bytes(),
                &self.server_challenge,
                &self.client_challenge,
            ],
            &proof.client_proof,
        ) {
            return Err(AuthError::BadProof(self.entity));
        }
        let mut tickets = Vec::new();
        for (service, keys, session_key, ticket_nonce, key_nonce) in grants {
            let ticket = Ticket {
                entity: self.entity.clone(),
                caps: self.caps.clone(),
                expires_ms: now_ms.saturating_add(ttl_ms),
                session_key: session_key.clone(),
            };
            let sealed = keys
                .seal(&ticket, ticket_nonce)
                .ok_or(AuthError::BadTicket)?;
            tickets.push(ServiceGrant {
                service,
                expires_ms: ticket.expires_ms,
                ticket: sealed,
                nonce: key_nonce,
                session_key: seal(&self.key, key_nonce, session_key.as_bytes()),
            });
        }
        Ok((self.entity, Granted { tickets }))
    }
}

/// What a client presents to a service on each connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Authorizer {
    pub ticket: SealedTicket,
    pub stamp_ms: u64,
    pub nonce: u64,
    pub mac: [u8; 32],
}

fn authorizer_parts(t: &SealedTicket, stamp_ms: u64, nonce: u64) -> ([u8; 8], [u8; 8], [u8; 8]) {
    (
        t.key_id.to_le_bytes(),
        stamp_ms.to_le_bytes(),
        nonce.to_le_bytes(),
    )
}

impl Authorizer {
    /// A fresh authorizer: `nonce` random, `stamp_ms` the client's wall clock.
    pub fn new(ticket: SealedTicket, session_key: &Secret, stamp_ms: u64, nonce: u64) -> Self {
        let (id, stamp, n) = authorizer_parts(&ticket, stamp_ms, nonce);
        let mac = hmac(
            session_key,
            &[
                b"authorizer",
                &id,
                &ticket.nonce,
                &ticket.sealed,
                &stamp,
                &n,
            ],
        );
        Authorizer {
            ticket,
            stamp_ms,
            nonce,
            mac,
        }
    }

    /// Checks the service's reply: it proves the service opened the ticket.
    pub fn check_reply(&self, session_key: &Secret, reply: &[u8; 32]) -> Result<(), AuthError> {
        if hmac_ok(session_key, &[b"reply", &self.nonce.to_le_bytes()], reply) {
            Ok(())
        } else {
            Err(AuthError::ServiceNotAuthentic)
        }
    }
}

/// A service's check of authorizers, with the memory of those seen inside the window.
pub struct AuthorizerVerifier {
    window_ms: u64,
    /// (stamp, entity, nonce) of authorizers accepted within the window.
    seen: BTreeSet<(u64, EntityName, u64)>,
}

impl AuthorizerVerifier {
    pub fn new(window_ms: u64) -> Self {
        AuthorizerVerifier {
            window_ms,
            seen: BTreeSet::new(),
        }
    }

    /// Verifies `a` at `now_ms`; returns the ticket (who, with which caps) and the reply that
    /// proves this service to the client.
    pub fn verify(
        &mut self,
        a: &Authorizer,
        service: &ServiceKeys,
        now_ms: u64,
    ) -> Result<(Ticket, [u8; 32]), AuthError> {
        let ticket = service.open(&a.ticket, now_ms)?;
        let (id, stamp, n) = authorizer_parts(&a.ticket, a.stamp_ms, a.nonce);
        if !hmac_ok(
            &ticket.session_key,
            &[
                b"authorizer",
                &id,
                &a.ticket.nonce,
                &a.ticket.sealed,
                &stamp,
                &n,
            ],
            &a.mac,
        ) {
            return Err(AuthError::BadAuthorizer);
        }
        let skew_ms = now_ms.abs_diff(a.stamp_ms);
        if skew_ms > self.window_ms {
            return Err(AuthError::Stale {
                skew_ms,
                window_ms: self.window_ms,
            });
        }
        // Forget what fell out of the window: it would be refused as stale anyway.
        let floor = now_ms.saturating_sub(self.window_ms);
        while self.seen.first().is_some_and(|(s, _, _)| *s < floor) {
            self.seen.pop_first();
        }
        if !self
            .seen
            .insert((a.stamp_ms, ticket.entity.clone(), a.nonce))
        {
            return Err(AuthError::Replayed);
        }
        let reply = hmac(&ticket.session_key, &[b"reply", &a.nonce.to_le_bytes()]);
        Ok((ticket, reply))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: u64 = 3_600_000;

    fn key(b: u8) -> Secret {
        Secret::from_bytes([b; 32])
    }

    fn service() -> ServiceKeys {
        let mut s = ServiceKeys::default();
        s.rotate(1, key(200), 2);
        s
    }

    fn grant(svc: &ServiceKeys) -> Vec<(Service, &ServiceKeys, Secret, [u8; 12], [u8; 12])> {
        vec![(Service::Osd, svc, key(9), [3; 12], [4; 12])]
    }

    fn admin() -> EntityName {
        "client.admin".parse().unwrap()
    }

    fn caps() -> Caps {
        Caps::from_pairs(&["mon", "allow *"]).unwrap()
    }

    /// A whole handshake; `client_key` is what the client's keyring holds, `db_key` what
    /// the monitors hold.
    fn handshake(
        client_key: Secret,
        db_key: Secret,
        now: u64,
    ) -> Result<(Secret, SealedTicket), AuthError> {
        let (mut client, hello) = ClientHandshake::start(admin(), client_key, [1; 16]);
        let caps = caps();
        let (server, challenge) =
            ServerHandshake::on_hello(&hello, Some((&db_key, &caps)), [2; 16])?;
        let proof = client.on_challenge(&challenge)?;
        let svc = service();
        let (_, granted) = server.on_proof(&proof, now, TTL, grant(&svc))?;
        let mut tickets = client.on_granted(granted)?;
        let t = tickets.pop().expect("one ticket granted");
        assert_eq!(t.service, Service::Osd);
        Ok((t.session_key, t.ticket))
    }

    #[test]
    fn both_sides_prove_the_key_and_the_client_gets_a_ticket() {
        let (session, ticket) = handshake(key(7), key(7), 1000).unwrap();
        assert_eq!(session, key(9));
        let opened = service().open(&ticket, 2000).unwrap();
        assert_eq!(opened.entity, admin());
        assert_eq!(opened.caps, caps());
        assert_eq!(opened.expires_ms, 1000 + TTL);
    }

    #[test]
    fn a_wrong_key_is_refused_on_either_side() {
        // The client's key is wrong: it cannot even accept the monitor's proof.
        assert_eq!(
            handshake(key(8), key(7), 0).unwrap_err(),
            AuthError::ServerNotAuthentic(admin())
        );
        // A client that skips checking the monitor still cannot prove a key it lacks.
        let (_, hello) = ClientHandshake::start(admin(), key(8), [1; 16]);
        let caps = caps();
        let (server, _) =
            ServerHandshake::on_hello(&hello, Some((&key(7), &caps)), [2; 16]).unwrap();
        let forged = Proof {
            client_proof: hmac(&key(8), &[b"client", b"client.admin", &[2; 16], &[1; 16]]),
        };
        assert_eq!(
            server
                .on_proof(&forged, 0, TTL, grant(&service()))
                .unwrap_err(),
            AuthError::BadProof(admin())
        );
        assert_eq!(
            ServerHandshake::on_hello(&hello, None, [2; 16]).err(),
            Some(AuthError::UnknownEntity(admin()))
        );
    }

    #[test]
    fn a_replayed_handshake_is_refused() {
        // An eavesdropper records a whole successful exchange...
        let (mut client, hello) = ClientHandshake::start(admin(), key(7), [1; 16]);
        let caps = caps();
        let (server, challenge) =
            ServerHandshake::on_hello(&hello, Some((&key(7), &caps)), [2; 16]).unwrap();
        let proof = client.on_challenge(&challenge).unwrap();
        server.on_proof(&proof, 0, TTL, grant(&service())).unwrap();
        // ...and replays it: the monitor's new challenge makes the old proof worthless.
        let (server, _) =
            ServerHandshake::on_hello(&hello, Some((&key(7), &caps)), [5; 16]).unwrap();
        assert_eq!(
            server
                .on_proof(&proof, 0, TTL, grant(&service()))
                .unwrap_err(),
            AuthError::BadProof(admin())
        );
    }

    #[test]
    fn authorizers_are_checked_for_signature_expiry_window_and_replay() {
        let (session, ticket) = handshake(key(7), key(7), 1_000).unwrap();
        let svc = service();
        let mut verifier = AuthorizerVerifier::new(300_000);
        let a = Authorizer::new(ticket.clone(), &session, 10_000, 42);
        let (t, reply) = verifier.verify(&a, &svc, 10_500).unwrap();
        assert_eq!(t.entity, admin());
        a.check_reply(&session, &reply).unwrap();
        assert_eq!(
            a.check_reply(&key(1), &reply),
            Err(AuthError::ServiceNotAuthentic)
        );

        // The same authorizer again: a replay.
        assert_eq!(
            verifier.verify(&a, &svc, 10_600).unwrap_err(),
            AuthError::Replayed
        );
        // A fresh nonce is fine.
        verifier
            .verify(
                &Authorizer::new(ticket.clone(), &session, 10_000, 43),
                &svc,
                10_600,
            )
            .unwrap();
        // Signed with another key (a thief holding the ticket but not the session key).
        assert_eq!(
            verifier
                .verify(
                    &Authorizer::new(ticket.clone(), &key(1), 10_000, 44),
                    &svc,
                    10_600
                )
                .unwrap_err(),
            AuthError::BadAuthorizer
        );
        // Outside the clock window.
        assert!(matches!(
            verifier
                .verify(
                    &Authorizer::new(ticket.clone(), &session, 10_000, 45),
                    &svc,
                    400_000
                )
                .unwrap_err(),
            AuthError::Stale { .. }
        ));
        // Expired ticket.
        assert!(matches!(
            verifier
                .verify(
                    &Authorizer::new(ticket.clone(), &session, 1_000 + TTL, 46),
                    &svc,
                    1_000 + TTL
                )
                .unwrap_err(),
            AuthError::Expired { .. }
        ));
        // A ticket with a flipped byte, or sealed by a secret the service does not hold.
        let mut bent = ticket.clone();
        bent.sealed[0] ^= 1;
        assert_eq!(
            verifier
                .verify(&Authorizer::new(bent, &session, 10_000, 47), &svc, 10_600)
                .unwrap_err(),
            AuthError::BadTicket
        );
        let mut other = ServiceKeys::default();
        other.rotate(1, key(201), 2);
        assert_eq!(
            verifier
                .verify(
                    &Authorizer::new(ticket, &session, 10_000, 48),
                    &other,
                    10_600
                )
                .unwrap_err(),
            AuthError::BadTicket
        );
    }

    #[test]
    fn rotation_keeps_recent_secrets_for_tickets_in_flight() {
        let (_, ticket) = handshake(key(7), key(7), 0).unwrap();
        let mut svc = service();
        svc.rotate(2, key(202), 2);
        assert!(
            svc.open(&ticket, 1).is_ok(),
            "sealed by secret 1, still kept"
        );
        svc.rotate(3, key(203), 2);
        assert_eq!(svc.open(&ticket, 1).unwrap_err(), AuthError::BadTicket);
    }
}
