//! Which exports a client may see and open, by the name its TLS client certificate gives it.

use std::collections::BTreeMap;

/// Decides per client and export. `client` is the name the client's TLS certificate gives it
/// (its subject CN), `None` for a client that sent no certificate (or did not use TLS).
pub trait ExportAccess: Send + Sync + 'static {
    fn allows(&self, client: Option<&str>, export: &str) -> bool;
}

/// Rules by client name: each client may open the exports its patterns match; a client
/// without rules, or without a certificate, may open nothing. A pattern is `*` (every
/// export), `POOL/*` (every image of a pool), or `POOL/IMAGE`; a pattern that matches an
/// image also matches its snapshots (`POOL/IMAGE@SNAP`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportRules {
    by_client: BTreeMap<String, Vec<String>>,
}

impl ExportRules {
    pub fn new() -> ExportRules {
        ExportRules::default()
    }

    /// Lets `client` open what `patterns` match (added to any earlier rule for it). A
    /// malformed pattern is refused with why.
    pub fn allow(
        &mut self,
        client: &str,
        patterns: impl IntoIterator<Item = String>,
    ) -> Result<(), String> {
        let mut checked = Vec::new();
        for p in patterns {
            let ok = p == "*"
                || matches!(p.split_once('/'), Some((pool, rest))
                    if !pool.is_empty() && !rest.is_empty() && !rest.contains('/')
                        && (rest == "*" || !rest.contains('*')) && !pool.contains('*'));
            if !ok {
                return Err(format!(
                    "export pattern {p:?} for {client:?} must be *, POOL/* or POOL/IMAGE"
                ));
            }
            checked.push(p);
        }
        self.by_client
            .entry(client.to_string())
            .or_default()
            .extend(checked);
        Ok(())
    }

    pub fn clients(&self) -> impl Iterator<Item = &str> {
        self.by_client.keys().map(String::as_str)
    }
}

fn matches(pattern: &str, export: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let image = export.split_once('@').map_or(export, |(image, _)| image);
    match pattern.strip_suffix("/*") {
        Some(pool) => image
            .split_once('/')
            .is_some_and(|(p, name)| p == pool && !name.is_empty()),
        None => image == pattern,
    }
}

impl ExportAccess for ExportRules {
    fn allows(&self, client: Option<&str>, export: &str) -> bool {
        let Some(patterns) = client.and_then(|c| self.by_client.get(c)) else {
            return false;
        };
        patterns.iter().any(|p| matches(p, export))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_pools_images_and_their_snapshots() {
        let mut r = ExportRules::new();
        r.allow("client.vm1", ["rbd/vm1".to_string(), "vms/*".to_string()])
            .expect("valid");
        r.allow("client.admin", ["*".to_string()]).expect("valid");
        let vm1 = Some("client.vm1");
        assert!(r.allows(vm1, "rbd/vm1"));
        assert!(r.allows(vm1, "rbd/vm1@daily"));
        assert!(!r.allows(vm1, "rbd/vm10"));
        assert!(!r.allows(vm1, "rbd/other"));
        assert!(r.allows(vm1, "vms/anything"));
        assert!(!r.allows(vm1, "vmsx/a"));
        assert!(r.allows(Some("client.admin"), "any/thing"));
        assert!(!r.allows(Some("client.stranger"), "rbd/vm1"));
        assert!(!r.allows(None, "rbd/vm1"), "no certificate, no access");
    }

    #[test]
    fn malformed_patterns_are_refused() {
        for bad in ["", "rbd", "rbd/", "/x", "r*/x", "rbd/a*", "a/b/c"] {
            let e = ExportRules::new()
                .allow("c", [bad.to_string()])
                .expect_err(bad);
            assert!(e.contains("must be"), "{e}");
        }
    }
}
