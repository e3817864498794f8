//! Keyring files: the keys (and caps) a host holds, in Ceph's INI-like format.
//!
//! ```text
//! [client.admin]
//!     key = AQ...base64...
//!     caps mon = "allow *"
//!     caps osd = "allow *"
//! ```
//!
//! Blank lines and lines starting with `#` or `;` are ignored. A keyring holds secrets, so
//! [`Keyring::save`] writes it readable by its owner only (mode 0600), through a temporary
//! file renamed into place, so a reader never sees half a keyring.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use crate::caps::{Caps, CapsError};
use crate::entity::{EntityError, EntityName};
use crate::key::{Secret, SecretError};

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("line {line}: {why}")]
    Syntax { line: usize, why: String },
    #[error("line {line}: {source}")]
    Entity { line: usize, source: EntityError },
    #[error("line {line}: {source}")]
    Key { line: usize, source: SecretError },
    #[error("line {line}: {source}")]
    Caps { line: usize, source: CapsError },
    #[error("[{0}] has no key")]
    NoKey(EntityName),
    #[error("the keyring holds no key for {0}; get it with `basalt auth get {0}`")]
    Missing(EntityName),
}

/// One entity's key and caps as a keyring records them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyringEntry {
    pub key: Secret,
    pub caps: Caps,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Keyring {
    entries: BTreeMap<EntityName, KeyringEntry>,
}

impl Keyring {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, entity: EntityName, key: Secret, caps: Caps) {
        self.entries.insert(entity, KeyringEntry { key, caps });
    }

    pub fn get(&self, entity: &EntityName) -> Option<&KeyringEntry> {
        self.entries.get(entity)
    }

    /// The key of `entity`, or an error saying how to get it.
    pub fn key(&self, entity: &EntityName) -> Result<&Secret, KeyringError> {
        self.get(entity)
            .map(|e| &e.key)
            .ok_or_else(|| KeyringError::Missing(entity.clone()))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&EntityName, &KeyringEntry)> {
        self.entries.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn parse(text: &str) -> Result<Self, KeyringError> {
        let mut entries = BTreeMap::new();
        let mut current: Option<(EntityName, Option<Secret>, Caps)> = None;
        let finish = |cur: Option<(EntityName, Option<Secret>, Caps)>,
                      entries: &mut BTreeMap<EntityName, KeyringEntry>|
         -> Result<(), KeyringError> {
            if let Some((name, key, caps)) = cur {
                let key = key.ok_or_else(|| KeyringError::NoKey(name.clone()))?;
                entries.insert(name, KeyringEntry { key, caps });
            }
            Ok(())
        };
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let l = raw.trim();
            if l.is_empty() || l.starts_with('#') || l.starts_with(';') {
                continue;
            }
            if let Some(section) = l.strip_prefix('[') {
                let Some(name) = section.strip_suffix(']') else {
                    return Err(KeyringError::Syntax {
                        line,
                        why: format!("'{l}' opens a section without closing it"),
                    });
                };
                finish(current.take(), &mut entries)?;
                let name: EntityName = name
                    .trim()
                    .parse()
                    .map_err(|source| KeyringError::Entity { line, source })?;
                current = Some((name, None, Caps::default()));
                continue;
            }
            let Some((k, v)) = l.split_once('=') else {
                return Err(KeyringError::Syntax {
                    line,
                    why: format!("expected 'key = VALUE' or 'caps SERVICE = \"CAP\"', got '{l}'"),
                });
            };
            let Some((_, key, caps)) = current.as_mut() else {
                return Err(KeyringError::Syntax {
                    line,
                    why: "a setting before any [entity] section".into(),
                });
            };
            let k: Vec<&str> = k.split_whitespace().collect();
            let v = v.trim();
            match k.as_slice() {
                ["key"] => {
                    *key = Some(
                        Secret::from_base64(v)
                            .map_err(|source| KeyringError::Key { line, source })?,
                    )
                }
                ["caps", service] => {
                    let cap = v
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .unwrap_or(v);
                    caps.set(service, cap)
                        .map_err(|source| KeyringError::Caps { line, source })?;
                }
                _ => {
                    return Err(KeyringError::Syntax {
                        line,
                        why: format!("unknown setting '{}'", k.join(" ")),
                    })
                }
            }
        }
        finish(current, &mut entries)?;
        Ok(Keyring { entries })
    }

    /// The keyring in the file format (it holds the secrets in clear).
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for (name, e) in &self.entries {
            out.push_str(&format!("[{name}]\n\tkey = {}\n", e.key.to_base64()));
            for (service, cap) in e.caps.iter() {
                out.push_str(&format!("\tcaps {service} = \"{cap}\"\n"));
            }
        }
        out
    }

    pub fn load(path: &Path) -> Result<Self, KeyringError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyringError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Writes the keyring to `path`, mode 0600, replacing any file there atomically.
    pub fn save(&self, path: &Path) -> Result<(), KeyringError> {
        use std::os::unix::fs::OpenOptionsExt;
        let io = |source| KeyringError::Io {
            path: path.display().to_string(),
            source,
        };
        let tmp = path.with_extension("keyring-tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(self.to_text().as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyrings_round_trip_through_text_and_files() {
        let mut k = Keyring::new();
        let admin: EntityName = "client.admin".parse().unwrap();
        k.insert(
            admin.clone(),
            Secret::generate().unwrap(),
            Caps::from_pairs(&["mon", "allow *", "osd", "allow *"]).unwrap(),
        );
        k.insert(
            EntityName::mon(),
            Secret::generate().unwrap(),
            Caps::default(),
        );
        assert_eq!(Keyring::parse(&k.to_text()).unwrap(), k);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring");
        k.save(&path).unwrap();
        assert_eq!(Keyring::load(&path).unwrap(), k);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(k.key(&admin).is_ok());
        assert!(matches!(
            k.key(&EntityName::osd(1)),
            Err(KeyringError::Missing(_))
        ));
    }

    #[test]
    fn cephs_layout_parses_and_errors_name_the_line() {
        let key = Secret::generate().unwrap().to_base64();
        let text = format!(
            "# admin\n[client.admin]\n    key = {key}\n    caps mon = \"allow *\"\n\n[osd.0]\nkey={key}\n"
        );
        let k = Keyring::parse(&text).unwrap();
        assert_eq!(k.iter().count(), 2);
        let admin = k.get(&"client.admin".parse().unwrap()).unwrap();
        assert_eq!(admin.caps.get("mon"), Some("allow *"));

        let e = Keyring::parse("[client.a]\nkey = nope\n").unwrap_err();
        assert!(matches!(e, KeyringError::Key { line: 2, .. }), "{e}");
        let e = Keyring::parse("key = x\n").unwrap_err();
        assert!(matches!(e, KeyringError::Syntax { line: 1, .. }), "{e}");
        let e = Keyring::parse("[client.a]\n").unwrap_err();
        assert!(matches!(e, KeyringError::NoKey(_)), "{e}");
        let e = Keyring::parse(&format!(
            "[client.a]\nkey = {key}\ncaps mon = \"allow q\"\n"
        ))
        .unwrap_err();
        assert!(matches!(e, KeyringError::Caps { line: 3, .. }), "{e}");
        let e = Keyring::parse("[bogus]\n").unwrap_err();
        assert!(matches!(e, KeyringError::Entity { line: 1, .. }), "{e}");
    }
}
