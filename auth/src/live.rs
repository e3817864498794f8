//! The thin drivers around the sans-IO [`handshake`](crate::handshake) core that every daemon
//! and client shares: the wall clock, fresh random inputs, a client's current ticket for a
//! service ([`TicketCell`]), a service's [`Guard`] (its secrets and replay memory), and what a
//! service knows of an authenticated peer ([`Authenticated`]) with the cap checks every
//! request goes through. std only (a lock, `SystemTime`, `getrandom`); transports live in
//! `basalt-proto` (gRPC) and `basalt-messenger`.

use std::sync::{Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::caps::{Caps, MonAccess, MonCap, OsdCap, Perm};
use crate::entity::{EntityName, EntityType};
use crate::handshake::{AuthError, Authorizer, AuthorizerVerifier, ClientTicket, ServiceKeys};
use crate::key::Secret;

/// How far an authorizer's timestamp may be from the service's clock, and how long the
/// service remembers authorizers it accepted (replays inside it are refused, older ones are
/// refused as stale). Hosts' clocks must agree within this (NTP).
pub const AUTHORIZER_WINDOW_MS: u64 = 60_000;

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `N` fresh random bytes from the operating system.
pub fn random<const N: usize>() -> Result<[u8; N], AuthError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| AuthError::NoRandomness(e.to_string()))?;
    Ok(b)
}

/// A fresh random secret (a session key).
pub fn random_secret() -> Result<Secret, AuthError> {
    Ok(Secret::from_bytes(random::<32>()?))
}

/// A request was authenticated but its entity's caps do not allow it.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("permission denied: {entity} needs {missing}; grant it with `basalt auth caps {entity} ...` (an admin's command)")]
pub struct PermissionDenied {
    pub entity: EntityName,
    /// The cap (or identity) that was missing, as an operator would write it.
    pub missing: String,
}

/// Who sent a request, as the service established it from a ticket: the entity and its caps
/// as of the ticket's issue (parsed once per connection or request).
#[derive(Clone, Debug)]
pub struct Authenticated {
    pub entity: EntityName,
    pub caps: Caps,
    /// The ticket's session key: what the service seals replies meant for this peer only.
    pub session_key: Secret,
    mon: MonCap,
    osd: OsdCap,
}

impl Authenticated {
    pub fn new(entity: EntityName, caps: Caps, session_key: Secret) -> Self {
        Authenticated {
            mon: caps.mon(),
            osd: caps.osd(),
            entity,
            caps,
            session_key,
        }
    }

    /// The OSD id if the peer is `osd.N`.
    pub fn osd_id(&self) -> Option<u32> {
        self.entity.osd_id()
    }

    pub fn is_mon(&self) -> bool {
        self.entity.kind() == EntityType::Mon
    }

    fn denied(&self, missing: String) -> PermissionDenied {
        PermissionDenied {
            entity: self.entity.clone(),
            missing,
        }
    }

    /// A monitor request needing `access`.
    pub fn check_mon(&self, access: MonAccess) -> Result<(), PermissionDenied> {
        if self.is_mon() || self.mon.allows(access) {
            Ok(())
        } else {
            Err(self.denied(access.needs().to_string()))
        }
    }

    /// An OSD request needing `need` on pool `pool`.
    pub fn check_osd(&self, pool: &str, need: Perm) -> Result<(), PermissionDenied> {
        if self.osd.allows(pool, need) {
            Ok(())
        } else {
            Err(self.denied(format!("osd 'allow {need} pool={pool}'")))
        }
    }

    /// Requests only an OSD daemon sends (sub-ops, peering): the peer must be `osd.N` and,
    /// when the message names its sender, `claimed` must be N.
    pub fn check_is_osd(&self, claimed: Option<u32>) -> Result<u32, PermissionDenied> {
        match (self.osd_id(), claimed) {
            (Some(id), None) => Ok(id),
            (Some(id), Some(c)) if c == id => Ok(id),
            (Some(id), Some(c)) => Err(self.denied(format!(
                "to be osd.{c} (it claimed to be osd.{c} but authenticated as osd.{id})"
            ))),
            (None, _) => Err(self.denied("to be an OSD daemon (osd.N)".into())),
        }
    }
}

/// A client's current ticket for one service, replaced when it is renewed; every connection
/// or request to the service builds a fresh [`Authorizer`] from it.
#[derive(Default)]
pub struct TicketCell {
    held: RwLock<Option<ClientTicket>>,
}

impl TicketCell {
    pub fn set(&self, t: ClientTicket) {
        *self.held.write().unwrap_or_else(|p| p.into_inner()) = Some(t);
    }

    /// The ticket's expiry, if one is held.
    pub fn expires_ms(&self) -> Option<u64> {
        self.held
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|t| t.expires_ms)
    }

    /// The held ticket's session key.
    pub fn session_key(&self) -> Option<Secret> {
        self.held
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|t| t.session_key.clone())
    }

    /// A fresh authorizer and the session key that checks the service's reply; `None`
    /// before the first ticket arrived.
    pub fn authorizer(&self) -> Option<(Authorizer, Secret)> {
        let held = self.held.read().unwrap_or_else(|p| p.into_inner());
        let t = held.as_ref()?;
        let nonce = u64::from_le_bytes(random::<8>().ok()?);
        Some((
            Authorizer::new(t.ticket.clone(), &t.session_key, now_ms(), nonce),
            t.session_key.clone(),
        ))
    }
}

/// A service's side: the secrets its tickets are sealed with and the memory of authorizers
/// seen, shared by every connection and request of the daemon.
pub struct Guard {
    keys: RwLock<ServiceKeys>,
    verifier: Mutex<AuthorizerVerifier>,
}

impl Default for Guard {
    fn default() -> Self {
        Guard {
            keys: RwLock::new(ServiceKeys::default()),
            verifier: Mutex::new(AuthorizerVerifier::new(AUTHORIZER_WINDOW_MS)),
        }
    }
}

impl Guard {
    pub fn set_keys(&self, keys: ServiceKeys) {
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
    }

    pub fn has_keys(&self) -> bool {
        !self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// Verifies an authorizer now; the peer and the reply proving this service to it.
    pub fn verify(&self, a: &Authorizer) -> Result<(Authenticated, [u8; 32]), AuthError> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        if keys.is_empty() {
            return Err(AuthError::NoServiceSecrets);
        }
        let (ticket, reply) = self
            .verifier
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .verify(a, &keys, now_ms())?;
        Ok((
            Authenticated::new(ticket.entity, ticket.caps, ticket.session_key),
            reply,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::{Service, Ticket};

    #[test]
    fn a_guard_admits_a_fresh_authorizer_once_and_checks_caps() {
        let mon_key = Secret::from_bytes([5; 32]);
        let mut keys = ServiceKeys::default();
        keys.rotate(1, Secret::from_bytes([7; 32]), 2);
        keys.rotate(2, Secret::from_bytes([8; 32]), 2);
        let guard = Guard::default();
        let entity: EntityName = "client.ro".parse().unwrap();
        let caps = Caps::from_pairs(&["osd", "allow r pool=rbd"]).unwrap();
        let session = Secret::from_bytes([6; 32]);
        let ticket = Ticket {
            entity: entity.clone(),
            caps,
            expires_ms: now_ms() + 60_000,
            session_key: session.clone(),
        };
        let cell = TicketCell::default();
        assert!(cell.authorizer().is_none());
        cell.set(ClientTicket {
            service: Service::Osd,
            expires_ms: ticket.expires_ms,
            ticket: keys.seal(&ticket, [1; 12]).unwrap(),
            session_key: session.clone(),
        });
        let (a, key) = cell.authorizer().unwrap();
        assert_eq!(guard.verify(&a).unwrap_err(), AuthError::NoServiceSecrets);
        guard.set_keys(keys);
        let (peer, reply) = guard.verify(&a).unwrap();
        a.check_reply(&key, &reply).unwrap();
        assert_eq!(guard.verify(&a).unwrap_err(), AuthError::Replayed);
        assert_eq!(peer.entity, entity);
        peer.check_osd("rbd", Perm::R).unwrap();
        let denied = peer.check_osd("rbd", Perm::W).unwrap_err();
        assert_eq!(denied.missing, "osd 'allow w pool=rbd'");
        assert!(peer.check_osd("vms", Perm::R).is_err());
        assert!(peer.check_mon(MonAccess::Read).is_err());
        assert!(peer.check_is_osd(None).is_err());
        let osd = Authenticated::new(EntityName::osd(3), Caps::default(), session);
        assert_eq!(osd.check_is_osd(Some(3)), Ok(3));
        assert!(osd.check_is_osd(Some(4)).is_err());
        // The monitors' peer secrets differ per period and never share an id with a
        // committed secret.
        let peers = ServiceKeys::monitor_peers(&mon_key, 1, 2);
        let ids: Vec<u64> = peers.secrets().map(|(id, _)| id).collect();
        assert_eq!(
            ids,
            vec![
                crate::handshake::MONITOR_PEER_KEY_IDS | 1,
                crate::handshake::MONITOR_PEER_KEY_IDS | 2
            ]
        );
        let secrets: Vec<&Secret> = peers.secrets().map(|(_, k)| k).collect();
        assert_ne!(secrets[0], secrets[1]);
    }
}
