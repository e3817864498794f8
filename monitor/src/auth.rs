//! Auth service: turns `auth add|get-or-create|caps|rm` into pending [`AuthChange`]s on the
//! leader, seeds a new cluster's database from the monitors' bootstrap keyring, and rotates
//! the services' secrets (`rotate_if_due`). Pure apart from the randomness of new secrets,
//! like the OSDMap service: the node calls it and proposes what it returns.
//!
//! Commands are validated against the *pending* database (committed + in flight +
//! pending), so two `auth add` of one entity in the same batch are caught. Every accepted
//! command proposes a change, even one that changes nothing (a `get-or-create` of an
//! existing entity re-puts it), so its reply always follows a commit and shows committed
//! state.

use std::sync::Arc;

use basalt_auth::handshake::Service;
use basalt_auth::{AuthChange, AuthDb, AuthEntry, Caps, EntityName, Keyring, Secret};

/// An `auth` mutation, decoded from the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthCommand {
    /// Creates `entity` with `key` (a fresh one if none); refused if it exists with another
    /// key or other caps.
    Add {
        entity: EntityName,
        key: Option<Secret>,
        caps: Caps,
    },
    /// The entity's key, created with `caps` if it does not exist; refused if it exists with
    /// other caps.
    GetOrCreate {
        entity: EntityName,
        caps: Caps,
    },
    /// Replaces an entity's caps.
    SetCaps {
        entity: EntityName,
        caps: Caps,
    },
    Remove {
        entity: EntityName,
    },
}

/// Why an auth command was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AuthCmdError {
    #[error("{0} does not exist; create it with `basalt auth add {0}` or `basalt auth get-or-create {0}`")]
    NotFound(EntityName),
    #[error("{0} already exists with another key or other caps; see it with `basalt auth get {0}`, change caps with `basalt auth caps`")]
    Exists(EntityName),
    #[error("cannot make a key: {0}")]
    Random(String),
}

pub struct AuthService {
    committed: Arc<AuthDb>,
    /// The version the changes in flight will commit as, with those changes.
    in_flight: Option<(u64, Vec<AuthChange>)>,
    pending: Vec<AuthChange>,
    /// committed + in flight + pending: what commands are validated against.
    pending_db: AuthDb,
    /// Entities a new cluster starts with (the monitors' `--keyring`).
    bootstrap: Keyring,
    /// A ticket's life, and so the rotation period of the services' secrets.
    ttl_ms: u64,
}

impl AuthService {
    pub fn new(committed: Arc<AuthDb>, bootstrap: Keyring, ttl_ms: u64) -> Self {
        AuthService {
            pending_db: (*committed).clone(),
            committed,
            in_flight: None,
            pending: Vec::new(),
            bootstrap,
            ttl_ms: ttl_ms.max(1),
        }
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// A commit arrived: rebase what is pending on it.
    pub fn on_commit(&mut self, db: Arc<AuthDb>) {
        if self
            .in_flight
            .as_ref()
            .is_some_and(|(v, _)| *v <= db.version)
        {
            self.in_flight = None;
        }
        self.committed = db;
        self.rebuild();
    }

    fn rebuild(&mut self) {
        let mut db = (*self.committed).clone();
        if let Some((_, changes)) = &self.in_flight {
            db.apply_unnumbered(changes);
        }
        db.apply_unnumbered(&self.pending);
        self.pending_db = db;
    }

    /// Leadership changed: nothing pending is ours any more.
    pub fn reset(&mut self) {
        self.in_flight = None;
        self.pending.clear();
        self.rebuild();
    }

    /// The proposal carrying the in-flight changes failed.
    pub fn abandon_in_flight(&mut self) {
        self.in_flight = None;
        self.rebuild();
    }

    /// The pending changes, now in flight, for the next Paxos value.
    pub fn take_changes(&mut self) -> Vec<AuthChange> {
        if self.pending.is_empty() || self.in_flight.is_some() {
            return Vec::new();
        }
        let changes = std::mem::take(&mut self.pending);
        self.in_flight = Some((self.committed.version + 1, changes.clone()));
        changes
    }

    /// On a leader: a cluster whose database was never written gets the bootstrap keyring's
    /// entities (the same file on every monitor, so whichever leads first seeds the same).
    pub fn seed_if_new(&mut self) {
        if self.committed.version > 0
            || self.in_flight.is_some()
            || !self.pending.is_empty()
            || self.bootstrap.is_empty()
        {
            return;
        }
        let changes: Vec<AuthChange> = self
            .bootstrap
            .iter()
            .map(|(entity, e)| AuthChange::Put {
                entity: entity.clone(),
                key: e.key.clone(),
                caps: e.caps.clone(),
            })
            .collect();
        tracing::info!(
            entities = changes.len(),
            "seeding the auth database from the bootstrap keyring"
        );
        self.push(changes);
    }

    /// On a leader: makes sure each service has a committed secret for the current rotation
    /// period and the next (committed a period ahead, so every monitor and OSD holds it before
    /// any ticket is sealed with it). Each is random, made here, and reaches the other
    /// monitors only through Paxos, so holding the `mon.` key does not give them (as Ceph's
    /// rotating keys). Ids are periods of the wall clock; a leader with a clock behind the
    /// others only rotates a little late.
    pub fn rotate_if_due(&mut self, now_ms: u64, secret: impl Fn() -> Option<Secret>) {
        let period = now_ms / self.ttl_ms;
        for service in [Service::Mon, Service::Osd] {
            let newest = self.pending_db.rotating(service).newest_id();
            for id in [period, period + 1] {
                if newest.is_some_and(|n| n >= id) {
                    continue;
                }
                let Some(secret) = secret() else {
                    return;
                };
                self.push(vec![AuthChange::RotateSecret {
                    service,
                    id,
                    secret,
                }]);
            }
        }
    }

    fn push(&mut self, changes: Vec<AuthChange>) {
        self.pending_db.apply_unnumbered(&changes);
        self.pending.extend(changes);
    }

    /// Validates a command and queues its change; returns the entity's record as it will
    /// be committed (what the reply shows), or `None` for a removal.
    pub fn command(
        &mut self,
        cmd: AuthCommand,
    ) -> Result<(EntityName, Option<AuthEntry>), AuthCmdError> {
        let db = &self.pending_db;
        let (entity, entry) = match cmd {
            AuthCommand::Add { entity, key, caps } => {
                let entry = match (db.get(&entity), key) {
                    (Some(e), Some(k)) if e.key == k && e.caps == caps => e.clone(),
                    (Some(e), None) if e.caps == caps => e.clone(),
                    (Some(_), _) => return Err(AuthCmdError::Exists(entity)),
                    (None, key) => AuthEntry {
                        key: match key {
                            Some(k) => k,
                            None => new_key()?,
                        },
                        caps,
                    },
                };
                (entity, Some(entry))
            }
            AuthCommand::GetOrCreate { entity, caps } => {
                let entry = match db.get(&entity) {
                    Some(e) if e.caps == caps => e.clone(),
                    Some(_) => return Err(AuthCmdError::Exists(entity)),
                    None => AuthEntry {
                        key: new_key()?,
                        caps,
                    },
                };
                (entity, Some(entry))
            }
            AuthCommand::SetCaps { entity, caps } => {
                let Some(e) = db.get(&entity) else {
                    return Err(AuthCmdError::NotFound(entity));
                };
                let entry = AuthEntry {
                    key: e.key.clone(),
                    caps,
                };
                (entity, Some(entry))
            }
            AuthCommand::Remove { entity } => {
                if db.get(&entity).is_none() {
                    return Err(AuthCmdError::NotFound(entity));
                }
                (entity, None)
            }
        };
        let change = match &entry {
            Some(e) => AuthChange::Put {
                entity: entity.clone(),
                key: e.key.clone(),
                caps: e.caps.clone(),
            },
            None => AuthChange::Remove {
                entity: entity.clone(),
            },
        };
        self.push(vec![change]);
        Ok((entity, entry))
    }
}

fn new_key() -> Result<Secret, AuthCmdError> {
    Secret::generate().map_err(|e| AuthCmdError::Random(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> EntityName {
        s.parse().unwrap()
    }

    fn caps(words: &[&str]) -> Caps {
        Caps::from_pairs(words).unwrap()
    }

    fn commit(svc: &mut AuthService, db: &mut AuthDb) {
        let changes = svc.take_changes();
        db.apply(&changes);
        svc.on_commit(Arc::new(db.clone()));
    }

    #[test]
    fn commands_are_validated_against_what_is_pending() {
        let mut db = AuthDb::default();
        let mut svc = AuthService::new(Arc::new(db.clone()), Keyring::new(), 1_000);
        let ro = caps(&["osd", "allow r pool=rbd"]);
        let (_, created) = svc
            .command(AuthCommand::GetOrCreate {
                entity: name("client.ro"),
                caps: ro.clone(),
            })
            .unwrap();
        let key = created.unwrap().key;
        // Still pending, yet a second get-or-create sees it and returns the same key.
        let (_, again) = svc
            .command(AuthCommand::GetOrCreate {
                entity: name("client.ro"),
                caps: ro.clone(),
            })
            .unwrap();
        assert_eq!(again.unwrap().key, key);
        assert_eq!(
            svc.command(AuthCommand::GetOrCreate {
                entity: name("client.ro"),
                caps: caps(&["osd", "allow rw"]),
            }),
            Err(AuthCmdError::Exists(name("client.ro")))
        );
        assert_eq!(
            svc.command(AuthCommand::Add {
                entity: name("client.ro"),
                key: Some(Secret::generate().unwrap()),
                caps: ro.clone(),
            }),
            Err(AuthCmdError::Exists(name("client.ro")))
        );
        commit(&mut svc, &mut db);
        assert_eq!(db.version, 1);
        assert_eq!(db.get(&name("client.ro")).unwrap().key, key);

        svc.command(AuthCommand::SetCaps {
            entity: name("client.ro"),
            caps: Caps::default(),
        })
        .unwrap();
        svc.command(AuthCommand::Remove {
            entity: name("client.ro"),
        })
        .unwrap();
        assert_eq!(
            svc.command(AuthCommand::Remove {
                entity: name("client.ro")
            }),
            Err(AuthCmdError::NotFound(name("client.ro")))
        );
        commit(&mut svc, &mut db);
        assert!(db.is_empty());
        assert_eq!(db.version, 2);
    }

    #[test]
    fn a_new_cluster_is_seeded_once_and_a_lost_proposal_is_forgotten() {
        let mut boot = Keyring::new();
        boot.insert(
            name("client.admin"),
            Secret::generate().unwrap(),
            caps(&["mon", "allow *"]),
        );
        let mut db = AuthDb::default();
        let mut svc = AuthService::new(Arc::new(db.clone()), boot, 1_000);
        svc.seed_if_new();
        svc.seed_if_new();
        let changes = svc.take_changes();
        assert_eq!(changes.len(), 1);
        // Leadership lost before the commit: the next leader seeds again.
        svc.abandon_in_flight();
        svc.reset();
        svc.seed_if_new();
        commit(&mut svc, &mut db);
        assert_eq!(db.len(), 1);
        svc.seed_if_new();
        assert!(!svc.has_pending(), "a written database is never re-seeded");
    }

    #[test]
    fn the_leader_commits_random_secrets_a_period_ahead() {
        let mut db = AuthDb::default();
        let mut svc = AuthService::new(Arc::new(db.clone()), Keyring::new(), 1_000);
        let fresh = || Secret::generate().ok();
        // A new cluster: the current period's secret and the next, for each service.
        svc.rotate_if_due(5_500, fresh);
        commit(&mut svc, &mut db);
        for service in [Service::Mon, Service::Osd] {
            let ids: Vec<u64> = db.rotating(service).secrets().map(|(id, _)| id).collect();
            assert_eq!(ids, vec![5, 6], "{service:?}");
        }
        let mon: Vec<Secret> = db
            .rotating(Service::Mon)
            .secrets()
            .map(|(_, k)| k.clone())
            .collect();
        let osd: Vec<Secret> = db
            .rotating(Service::Osd)
            .secrets()
            .map(|(_, k)| k.clone())
            .collect();
        assert!(
            mon.iter().all(|k| !osd.contains(k)),
            "each secret is its own"
        );
        // Nothing is due within the period, even before the commit (pending counts).
        svc.rotate_if_due(5_900, fresh);
        assert!(!svc.has_pending());
        // The next period brings the one after it.
        svc.rotate_if_due(6_100, fresh);
        commit(&mut svc, &mut db);
        let ids: Vec<u64> = db
            .rotating(Service::Osd)
            .secrets()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, vec![5, 6, 7]);
        // Without randomness nothing is proposed.
        svc.rotate_if_due(9_000, || None);
        assert!(!svc.has_pending());
    }
}
