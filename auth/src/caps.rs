//! Capabilities: what an entity may do, as Ceph writes them.
//!
//! An entity's caps are one string per service: `mon 'allow r'`, `osd 'allow rw pool=rbd'`.
//! A string is grants separated by commas; a grant is one of
//!
//! ```text
//! allow *                      everything the service offers
//! allow PERMS [pool=NAME]      PERMS: any of r (read), w (write), x (class-style ops:
//!                              locks, watch/notify); pool= only for osd caps
//! allow profile NAME [pool=NAME]
//! ```
//!
//! Profiles (Ceph's names): mon `profile osd` (what an OSD daemon asks of the monitors:
//! boot, beacons, failure reports, PG activations, plus reads), mon `profile rbd` (reads plus
//! adding blocklist entries, which an image lock breaker needs), osd `profile rbd` (`rwx`),
//! osd `profile rbd-read-only` (`r`).
//!
//! Parsing is strict (an unknown word is an error naming it, never a grant silently
//! narrowed or widened); checks are pure functions of the parsed grants.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum CapsError {
    #[error("unknown service '{0}' in caps: basalt knows 'mon' and 'osd'")]
    UnknownService(String),
    #[error("caps are given as pairs SERVICE 'CAP' (e.g. mon 'allow r' osd 'allow rw pool=rbd'); '{0}' has no cap string after it")]
    Unpaired(String),
    #[error("caps for '{0}' are given twice")]
    Duplicate(String),
    #[error("cannot parse {service} cap '{cap}': {why}")]
    Syntax {
        service: &'static str,
        cap: String,
        why: String,
    },
}

/// Read, write, class-style execute.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Perm {
    pub read: bool,
    pub write: bool,
    pub exec: bool,
}

impl Perm {
    pub const R: Perm = Perm {
        read: true,
        write: false,
        exec: false,
    };
    pub const W: Perm = Perm {
        read: false,
        write: true,
        exec: false,
    };
    pub const X: Perm = Perm {
        read: false,
        write: false,
        exec: true,
    };
    pub const RWX: Perm = Perm {
        read: true,
        write: true,
        exec: true,
    };

    pub fn union(self, o: Perm) -> Perm {
        Perm {
            read: self.read || o.read,
            write: self.write || o.write,
            exec: self.exec || o.exec,
        }
    }

    /// Every permission in `need` is in `self`.
    pub fn covers(self, need: Perm) -> bool {
        (self.read || !need.read) && (self.write || !need.write) && (self.exec || !need.exec)
    }

    fn parse(word: &str) -> Option<Perm> {
        let mut p = Perm::default();
        for c in word.chars() {
            match c {
                'r' if !p.read => p.read = true,
                'w' if !p.write => p.write = true,
                'x' if !p.exec => p.exec = true,
                _ => return None,
            }
        }
        (!word.is_empty()).then_some(p)
    }
}

impl fmt::Display for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (on, c) in [(self.read, 'r'), (self.write, 'w'), (self.exec, 'x')] {
            if on {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

/// One `allow ...` clause, service-independent.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Grant {
    /// `allow *`.
    star: bool,
    perm: Perm,
    profile: Option<String>,
    pool: Option<String>,
}

fn parse_grants(service: &'static str, cap: &str) -> Result<Vec<Grant>, CapsError> {
    let err = |why: String| CapsError::Syntax {
        service,
        cap: cap.to_string(),
        why,
    };
    let mut grants = Vec::new();
    for clause in cap.split(',') {
        let words: Vec<&str> = clause.split_whitespace().collect();
        let Some((&first, rest)) = words.split_first() else {
            return Err(err("an empty grant (a stray comma?)".into()));
        };
        if first != "allow" {
            return Err(err(format!("a grant starts with 'allow', not '{first}'")));
        }
        let mut grant = Grant {
            star: false,
            perm: Perm::default(),
            profile: None,
            pool: None,
        };
        let mut rest = rest.iter().copied().peekable();
        match rest.next() {
            Some("*") => grant.star = true,
            Some("profile") => {
                let Some(name) = rest.next() else {
                    return Err(err("'profile' needs a name".into()));
                };
                grant.profile = Some(name.to_string());
            }
            Some(word) => {
                grant.perm = Perm::parse(word)
                    .ok_or_else(|| err(format!("'{word}' is not r, w, x or a mix of them")))?;
            }
            None => {
                return Err(err(
                    "'allow' needs what it allows (*, r, rw, rwx, profile NAME)".into(),
                ))
            }
        }
        for word in rest {
            match word.split_once('=') {
                Some(("pool", name)) if !name.is_empty() && grant.pool.is_none() => {
                    grant.pool = Some(name.to_string())
                }
                _ => {
                    return Err(err(format!(
                        "unexpected '{word}' (only pool=NAME may follow)"
                    )))
                }
            }
        }
        grants.push(grant);
    }
    Ok(grants)
}

/// What a request asks of the monitors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MonAccess {
    /// Maps, status, health.
    Read,
    /// Cluster changes: pools, OSD states, flags, ratios, blocklist.
    Write,
    /// `auth ...`: keys and caps (needs `allow *`).
    AuthAdmin,
    /// What an OSD daemon sends: boot, beacons, failure reports, PG activations.
    OsdDaemon,
    /// Adding or removing a blocklist entry (an image lock breaker's fencing).
    Blocklist,
    /// Creating or removing a pool's self-managed snapshot id (`rbd snap create|rm`).
    Snapshots,
}

impl MonAccess {
    /// What a caps string must grant for this, for error messages.
    pub fn needs(self) -> &'static str {
        match self {
            MonAccess::Read => "mon 'allow r'",
            MonAccess::Write => "mon 'allow rw'",
            MonAccess::AuthAdmin => "mon 'allow *'",
            MonAccess::OsdDaemon => "mon 'allow profile osd'",
            MonAccess::Blocklist | MonAccess::Snapshots => {
                "mon 'allow w' or mon 'allow profile rbd'"
            }
        }
    }
}

/// Parsed mon caps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MonCap {
    grants: Vec<Grant>,
}

impl MonCap {
    pub fn parse(cap: &str) -> Result<Self, CapsError> {
        let grants = parse_grants("mon", cap)?;
        for g in &grants {
            if g.pool.is_some() {
                return Err(CapsError::Syntax {
                    service: "mon",
                    cap: cap.to_string(),
                    why: "pool= applies to osd caps only".into(),
                });
            }
            if let Some(p) = &g.profile {
                if !matches!(p.as_str(), "osd" | "rbd") {
                    return Err(CapsError::Syntax {
                        service: "mon",
                        cap: cap.to_string(),
                        why: format!("unknown profile '{p}' (mon profiles: osd, rbd)"),
                    });
                }
            }
        }
        Ok(MonCap { grants })
    }

    /// No grants at all (an entity without mon caps).
    pub fn none() -> Self {
        MonCap { grants: Vec::new() }
    }

    pub fn allows(&self, access: MonAccess) -> bool {
        self.grants.iter().any(|g| {
            if g.star {
                return true;
            }
            let profile = g.profile.as_deref();
            match access {
                MonAccess::Read => g.perm.read || profile.is_some(),
                MonAccess::Write => g.perm.write,
                MonAccess::AuthAdmin => false,
                MonAccess::OsdDaemon => profile == Some("osd"),
                MonAccess::Blocklist | MonAccess::Snapshots => {
                    g.perm.write || profile == Some("rbd")
                }
            }
        })
    }
}

/// Parsed osd caps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OsdCap {
    grants: Vec<Grant>,
}

impl OsdCap {
    pub fn parse(cap: &str) -> Result<Self, CapsError> {
        let grants = parse_grants("osd", cap)?;
        for g in &grants {
            if let Some(p) = &g.profile {
                if !matches!(p.as_str(), "rbd" | "rbd-read-only") {
                    return Err(CapsError::Syntax {
                        service: "osd",
                        cap: cap.to_string(),
                        why: format!("unknown profile '{p}' (osd profiles: rbd, rbd-read-only)"),
                    });
                }
            }
        }
        Ok(OsdCap { grants })
    }

    pub fn none() -> Self {
        OsdCap { grants: Vec::new() }
    }

    /// The permissions granted on `pool` (the union of every grant that applies to it).
    pub fn on_pool(&self, pool: &str) -> Perm {
        self.grants
            .iter()
            .filter(|g| g.pool.as_deref().is_none_or(|p| p == pool))
            .map(|g| {
                if g.star {
                    return Perm::RWX;
                }
                match g.profile.as_deref() {
                    Some("rbd") => Perm::RWX,
                    Some(_) => Perm::R,
                    None => g.perm,
                }
            })
            .fold(Perm::default(), Perm::union)
    }

    /// Whether a request needing `need` on `pool` is allowed.
    pub fn allows(&self, pool: &str, need: Perm) -> bool {
        self.on_pool(pool).covers(need)
    }
}

/// An entity's caps: the cap string of each service, validated, kept as the operator wrote
/// them (what `auth get` shows).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caps(BTreeMap<String, String>);

impl Caps {
    /// Caps from `SERVICE CAP` pairs as the CLI takes them (`mon 'allow r' osd 'allow rw'`).
    pub fn from_pairs<S: AsRef<str>>(words: &[S]) -> Result<Self, CapsError> {
        let mut caps = BTreeMap::new();
        let mut it = words.iter();
        while let Some(service) = it.next() {
            let service = service.as_ref();
            let Some(cap) = it.next() else {
                return Err(CapsError::Unpaired(service.to_string()));
            };
            if caps.contains_key(service) {
                return Err(CapsError::Duplicate(service.to_string()));
            }
            Self::check(service, cap.as_ref())?;
            caps.insert(service.to_string(), cap.as_ref().to_string());
        }
        Ok(Caps(caps))
    }

    fn check(service: &str, cap: &str) -> Result<(), CapsError> {
        match service {
            "mon" => MonCap::parse(cap).map(|_| ()),
            "osd" => OsdCap::parse(cap).map(|_| ()),
            other => Err(CapsError::UnknownService(other.to_string())),
        }
    }

    /// Adds or replaces one service's cap.
    pub fn set(&mut self, service: &str, cap: &str) -> Result<(), CapsError> {
        Self::check(service, cap)?;
        self.0.insert(service.to_string(), cap.to_string());
        Ok(())
    }

    /// The cap strings by service.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(s, c)| (s.as_str(), c.as_str()))
    }

    pub fn get(&self, service: &str) -> Option<&str> {
        self.0.get(service).map(String::as_str)
    }

    /// Parsed mon caps (none if the entity has no mon cap). Caps are validated when they are
    /// set, so a stored string that no longer parses grants nothing rather than failing.
    pub fn mon(&self) -> MonCap {
        self.get("mon")
            .and_then(|c| MonCap::parse(c).ok())
            .unwrap_or_else(MonCap::none)
    }

    pub fn osd(&self) -> OsdCap {
        self.get("osd")
            .and_then(|c| OsdCap::parse(c).ok())
            .unwrap_or_else(OsdCap::none)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mon_caps_grant_what_they_say() {
        let r = MonCap::parse("allow r").unwrap();
        assert!(r.allows(MonAccess::Read));
        assert!(!r.allows(MonAccess::Write));
        assert!(!r.allows(MonAccess::Blocklist));
        assert!(!r.allows(MonAccess::AuthAdmin));

        let rw = MonCap::parse("allow rw").unwrap();
        assert!(rw.allows(MonAccess::Write) && rw.allows(MonAccess::Blocklist));
        assert!(!rw.allows(MonAccess::OsdDaemon) && !rw.allows(MonAccess::AuthAdmin));

        let admin = MonCap::parse("allow *").unwrap();
        for a in [
            MonAccess::Read,
            MonAccess::Write,
            MonAccess::AuthAdmin,
            MonAccess::OsdDaemon,
            MonAccess::Blocklist,
        ] {
            assert!(admin.allows(a), "{a:?}");
        }

        let osd = MonCap::parse("allow profile osd").unwrap();
        assert!(osd.allows(MonAccess::OsdDaemon) && osd.allows(MonAccess::Read));
        assert!(!osd.allows(MonAccess::Write));

        let rbd = MonCap::parse("allow profile rbd").unwrap();
        assert!(rbd.allows(MonAccess::Blocklist) && rbd.allows(MonAccess::Read));
        assert!(!rbd.allows(MonAccess::Write) && !rbd.allows(MonAccess::OsdDaemon));

        assert!(!MonCap::none().allows(MonAccess::Read));
    }

    #[test]
    fn osd_caps_are_per_pool() {
        let c = OsdCap::parse("allow r pool=rbd, allow rwx pool=vms").unwrap();
        assert!(c.allows("rbd", Perm::R));
        assert!(!c.allows("rbd", Perm::W));
        assert!(c.allows("vms", Perm::RWX));
        assert!(!c.allows("other", Perm::R));

        let all = OsdCap::parse("allow rw").unwrap();
        assert!(all.allows("anything", Perm::R.union(Perm::W)));
        assert!(!all.allows("anything", Perm::X), "locks need x");

        assert!(OsdCap::parse("allow *").unwrap().allows("p", Perm::RWX));
        assert!(OsdCap::parse("allow profile rbd pool=rbd")
            .unwrap()
            .allows("rbd", Perm::RWX));
        let ro = OsdCap::parse("allow profile rbd-read-only").unwrap();
        assert!(ro.allows("rbd", Perm::R) && !ro.allows("rbd", Perm::W));
        assert_eq!(
            OsdCap::parse("allow r, allow w pool=a")
                .unwrap()
                .on_pool("a")
                .to_string(),
            "rw"
        );
    }

    #[test]
    fn malformed_caps_are_refused_naming_the_problem() {
        for (svc, bad) in [
            ("mon", "allo r"),
            ("mon", "allow"),
            ("mon", "allow rz"),
            ("mon", "allow rr"),
            ("mon", "allow r pool=rbd"),
            ("mon", "allow profile nope"),
            ("osd", "allow r pool="),
            ("osd", "allow r pool=a pool=b"),
            ("osd", "allow r,"),
            ("osd", "allow r namespace=x"),
            ("osd", "allow profile"),
        ] {
            let e = Caps::from_pairs(&[svc, bad]).expect_err(bad);
            assert!(matches!(e, CapsError::Syntax { .. }), "{bad}: {e}");
        }
        assert_eq!(
            Caps::from_pairs(&["mds", "allow"]),
            Err(CapsError::UnknownService("mds".into()))
        );
        assert_eq!(
            Caps::from_pairs(&["mon"]),
            Err(CapsError::Unpaired("mon".into()))
        );
        assert_eq!(
            Caps::from_pairs(&["mon", "allow r", "mon", "allow *"]),
            Err(CapsError::Duplicate("mon".into()))
        );
    }

    #[test]
    fn caps_keep_the_operators_text_and_parse_per_service() {
        let c = Caps::from_pairs(&["mon", "allow r", "osd", "allow rw pool=rbd"]).unwrap();
        assert_eq!(c.get("osd"), Some("allow rw pool=rbd"));
        assert!(c.mon().allows(MonAccess::Read));
        assert!(c.osd().allows("rbd", Perm::W));
        assert!(!c.osd().allows("vms", Perm::R));
        assert!(!Caps::default().mon().allows(MonAccess::Read));
    }
}
