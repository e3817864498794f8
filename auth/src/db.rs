//! The monitors' auth database: every entity's key and caps.
//!
//! Changed only by [`AuthChange`]s carried in Paxos values, applied by [`AuthDb::apply`] on
//! every monitor; `apply` is total and deterministic (as `OsdMap::apply`), so every monitor
//! holds the same database after the same commits. Whether a change makes sense (say, adding
//! an entity that exists with another key) is decided before it is proposed, against the
//! committed database plus the changes in flight (the monitor's auth service).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::caps::Caps;
use crate::entity::EntityName;
use crate::handshake::{Service, ServiceKeys};
use crate::key::Secret;

/// One entity's record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthEntry {
    pub key: Secret,
    pub caps: Caps,
}

/// A change to the database, as committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthChange {
    /// Creates `entity`, or replaces its key and caps.
    Put {
        entity: EntityName,
        key: Secret,
        caps: Caps,
    },
    /// Replaces an existing entity's caps (no effect if it is gone).
    SetCaps { entity: EntityName, caps: Caps },
    /// Removes an entity (no effect if it is gone).
    Remove { entity: EntityName },
    /// Adds `service`'s rotating secret `id` (its rotation period), made at random by the
    /// leader (Ceph's rotating service keys); the [`ROTATING_SECRETS_KEPT`] newest are kept.
    RotateSecret {
        service: Service,
        id: u64,
        secret: Secret,
    },
}

/// How many rotating secrets each service keeps: the one sealing now, the next (committed a
/// period ahead, so every OSD has it before it is used), and the two before, which open
/// tickets sealed before the rotation until they expire (a ticket lives one period).
pub const ROTATING_SECRETS_KEPT: usize = 4;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthDb {
    /// Bumped by every committed batch of changes; 0 is the empty database of a new cluster.
    pub version: u64,
    entities: BTreeMap<EntityName, AuthEntry>,
    /// Each service's rotating secrets, by period.
    rotating: BTreeMap<Service, ServiceKeys>,
}

impl AuthDb {
    /// `service`'s kept rotating secrets (none before the leader's first rotation commits).
    pub fn rotating(&self, service: Service) -> ServiceKeys {
        self.rotating.get(&service).cloned().unwrap_or_default()
    }

    pub fn get(&self, entity: &EntityName) -> Option<&AuthEntry> {
        self.entities.get(entity)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&EntityName, &AuthEntry)> {
        self.entities.iter()
    }

    pub fn len(&self) -> usize {
        self.entities.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entities.is_empty()
    }

    /// Applies one committed batch: total (every change has a defined effect) and
    /// deterministic, and the version moves by one.
    pub fn apply(&mut self, changes: &[AuthChange]) {
        self.apply_unnumbered(changes);
        self.version += 1;
    }

    /// Applies changes without moving the version: how the leader's view of what is pending
    /// is built.
    pub fn apply_unnumbered(&mut self, changes: &[AuthChange]) {
        for c in changes {
            match c {
                AuthChange::Put { entity, key, caps } => {
                    self.entities.insert(
                        entity.clone(),
                        AuthEntry {
                            key: key.clone(),
                            caps: caps.clone(),
                        },
                    );
                }
                AuthChange::SetCaps { entity, caps } => {
                    if let Some(e) = self.entities.get_mut(entity) {
                        e.caps = caps.clone();
                    }
                }
                AuthChange::Remove { entity } => {
                    self.entities.remove(entity);
                }
                AuthChange::RotateSecret {
                    service,
                    id,
                    secret,
                } => {
                    self.rotating.entry(*service).or_default().rotate(
                        *id,
                        secret.clone(),
                        ROTATING_SECRETS_KEPT,
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_is_total_and_versions_each_batch() {
        let a: EntityName = "client.a".parse().unwrap();
        let k = Secret::generate().unwrap();
        let caps = Caps::from_pairs(&["mon", "allow r"]).unwrap();
        let mut db = AuthDb::default();
        db.apply(&[AuthChange::Put {
            entity: a.clone(),
            key: k.clone(),
            caps: caps.clone(),
        }]);
        assert_eq!(db.version, 1);
        assert_eq!(db.get(&a).unwrap().key, k);
        let none = Caps::default();
        db.apply(&[
            AuthChange::SetCaps {
                entity: a.clone(),
                caps: none.clone(),
            },
            AuthChange::SetCaps {
                entity: "client.gone".parse().unwrap(),
                caps: caps.clone(),
            },
            AuthChange::Remove {
                entity: "client.gone".parse().unwrap(),
            },
        ]);
        assert_eq!(db.version, 2);
        assert_eq!(db.get(&a).unwrap().caps, none);
        assert_eq!(db.len(), 1);
        db.apply(&[AuthChange::Remove { entity: a.clone() }]);
        assert!(db.is_empty());

        // What travels in a Paxos value decodes to the same change.
        let change = AuthChange::Put {
            entity: a,
            key: k,
            caps,
        };
        let bytes = postcard::to_stdvec(&change).unwrap();
        assert_eq!(postcard::from_bytes::<AuthChange>(&bytes).unwrap(), change);
    }

    #[test]
    fn each_service_keeps_its_newest_rotating_secrets() {
        let mut db = AuthDb::default();
        assert!(db.rotating(Service::Osd).is_empty());
        let secrets: Vec<Secret> = (0..6).map(|_| Secret::generate().unwrap()).collect();
        for (id, secret) in secrets.iter().enumerate() {
            db.apply(&[AuthChange::RotateSecret {
                service: Service::Osd,
                id: id as u64 + 10,
                secret: secret.clone(),
            }]);
        }
        let kept: Vec<(u64, Secret)> = db
            .rotating(Service::Osd)
            .secrets()
            .map(|(id, k)| (id, k.clone()))
            .collect();
        let want: Vec<(u64, Secret)> = (12..16).zip(secrets[2..].iter().cloned()).collect();
        assert_eq!(kept, want);
        assert!(db.rotating(Service::Mon).is_empty());
        assert_eq!(db.rotating(Service::Osd).up_to(13).newest_id(), Some(13));
    }
}
