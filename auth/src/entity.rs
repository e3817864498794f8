//! Entity names: the identity a key belongs to.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What kind of party an entity is; decides which checks apply to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum EntityType {
    /// Applications, the CLI, and gateways run as clients (`client.gw0`).
    Client,
    /// An OSD daemon: `osd.N`, N its id in the OSDMap.
    Osd,
    /// The monitors: `mon.` is the key all monitors share (Ceph's convention), `mon.N` a rank.
    Mon,
    /// A gateway daemon identity (`gw.NAME`), for gateways not run as a client entity.
    Gw,
}

impl EntityType {
    pub fn as_str(self) -> &'static str {
        match self {
            EntityType::Client => "client",
            EntityType::Osd => "osd",
            EntityType::Mon => "mon",
            EntityType::Gw => "gw",
        }
    }
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum EntityError {
    #[error("'{0}' is not an entity name: expected TYPE.ID with TYPE one of client, osd, mon, gw (e.g. client.admin, osd.3)")]
    Malformed(String),
    #[error("'{0}': an OSD's id is a number (osd.3)")]
    OsdIdNotNumeric(String),
    #[error("'{0}': the id may hold only letters, digits, '_', '-' and '.'")]
    BadId(String),
}

/// `TYPE.ID`, e.g. `client.admin`, `osd.3`, `mon.` (the monitors' shared key).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EntityName {
    kind: EntityType,
    id: String,
}

impl EntityName {
    pub fn new(kind: EntityType, id: impl Into<String>) -> Result<Self, EntityError> {
        let id = id.into();
        let text = format!("{}.{id}", kind.as_str());
        if id.is_empty() && kind != EntityType::Mon {
            return Err(EntityError::Malformed(text));
        }
        if !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            return Err(EntityError::BadId(text));
        }
        if kind == EntityType::Osd && id.parse::<u32>().is_err() {
            return Err(EntityError::OsdIdNotNumeric(text));
        }
        Ok(EntityName { kind, id })
    }

    /// `client.NAME`.
    pub fn client(id: &str) -> Result<Self, EntityError> {
        Self::new(EntityType::Client, id)
    }

    /// `osd.N`.
    pub fn osd(id: u32) -> Self {
        EntityName {
            kind: EntityType::Osd,
            id: id.to_string(),
        }
    }

    /// `mon.`: the key every monitor holds.
    pub fn mon() -> Self {
        EntityName {
            kind: EntityType::Mon,
            id: String::new(),
        }
    }

    pub fn kind(&self) -> EntityType {
        self.kind
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The OSD id of an `osd.N` entity.
    pub fn osd_id(&self) -> Option<u32> {
        (self.kind == EntityType::Osd)
            .then(|| self.id.parse().ok())
            .flatten()
    }
}

impl fmt::Display for EntityName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.kind.as_str(), self.id)
    }
}

impl FromStr for EntityName {
    type Err = EntityError;
    fn from_str(s: &str) -> Result<Self, EntityError> {
        let Some((kind, id)) = s.split_once('.') else {
            return Err(EntityError::Malformed(s.to_string()));
        };
        let kind = match kind {
            "client" => EntityType::Client,
            "osd" => EntityType::Osd,
            "mon" => EntityType::Mon,
            "gw" => EntityType::Gw,
            _ => return Err(EntityError::Malformed(s.to_string())),
        };
        EntityName::new(kind, id)
    }
}

impl TryFrom<String> for EntityName {
    type Error = EntityError;
    fn try_from(s: String) -> Result<Self, EntityError> {
        s.parse()
    }
}

impl From<EntityName> for String {
    fn from(e: EntityName) -> String {
        e.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print_back() {
        for s in [
            "client.admin",
            "osd.3",
            "mon.",
            "mon.0",
            "gw.gw-1",
            "client.rbd.vm1",
        ] {
            let e: EntityName = s.parse().expect(s);
            assert_eq!(e.to_string(), s);
        }
        assert_eq!("osd.12".parse::<EntityName>().unwrap().osd_id(), Some(12));
        assert_eq!(EntityName::mon().to_string(), "mon.");
    }

    #[test]
    fn bad_names_are_refused_with_the_reason() {
        assert!(matches!(
            "admin".parse::<EntityName>(),
            Err(EntityError::Malformed(_))
        ));
        assert!(matches!(
            "user.x".parse::<EntityName>(),
            Err(EntityError::Malformed(_))
        ));
        assert!(matches!(
            "client.".parse::<EntityName>(),
            Err(EntityError::Malformed(_))
        ));
        assert!(matches!(
            "osd.a".parse::<EntityName>(),
            Err(EntityError::OsdIdNotNumeric(_))
        ));
        assert!(matches!(
            "client.a b".parse::<EntityName>(),
            Err(EntityError::BadId(_))
        ));
    }
}
