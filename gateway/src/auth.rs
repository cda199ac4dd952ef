//! API keys → tenants, and what a tenant may see.
//!
//! ```text
//! Authorization: Bearer <key> ─sha256─▶ compared in constant time with every configured key's
//!   digest (subtle) ─▶ Tenant { name, limits } | 401 unknown_key | 401 revoked_key
//! job id `<tenant>.<uuid>` ─owns()─▶ the tenant's own jobs only (others' ids answer 404)
//! ```
//! Keys are never logged: only their tenant's name is.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{GatewayConfig, TenantConfig};
use crate::error::ApiError;

/// A tenant that presented a valid key.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub name: String,
    pub cfg: Arc<TenantConfig>,
}

impl Tenant {
    /// The prefix of every job id this tenant owns (`<tenant>.`).
    pub fn id_prefix(&self) -> String {
        format!("{}.", self.name)
    }

    /// Whether the job `id` is this tenant's.
    pub fn owns(&self, id: &str) -> bool {
        id.strip_prefix(&self.name)
            .is_some_and(|rest| rest.starts_with('.') && rest.len() > 1)
    }
}

struct Entry {
    digest: [u8; 32],
    tenant: usize,
    revoked: bool,
}

/// Every configured key, by digest.
pub struct Tenants {
    entries: Vec<Entry>,
    tenants: Vec<Tenant>,
}

fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

impl Tenants {
    pub fn new(cfg: &GatewayConfig) -> Tenants {
        let mut entries = Vec::new();
        let mut tenants = Vec::new();
        for (i, (name, t)) in cfg.tenants.iter().enumerate() {
            tenants.push(Tenant {
                name: name.clone(),
                cfg: Arc::new(t.clone()),
            });
            for (keys, revoked) in [(&t.keys, false), (&t.revoked, true)] {
                for k in keys {
                    entries.push(Entry {
                        digest: digest(k.as_bytes()),
                        tenant: i,
                        revoked,
                    });
                }
            }
        }
        Tenants { entries, tenants }
    }

    /// The tenant of `key`. Every entry is compared, in constant time, whatever matches.
    pub fn authenticate(&self, key: &str) -> Result<Tenant, ApiError> {
        let d = digest(key.as_bytes());
        let mut found: Option<&Entry> = None;
        for e in &self.entries {
            if bool::from(e.digest[..].ct_eq(&d[..])) {
                found = Some(e);
            }
        }
        match found {
            None => Err(ApiError::UnknownKey),
            Some(e) if e.revoked => Err(ApiError::RevokedKey),
            Some(e) => Ok(self.tenants[e.tenant].clone()),
        }
    }

    pub fn by_name(&self, name: &str) -> Option<&Tenant> {
        self.tenants.iter().find(|t| t.name == name)
    }

    /// The key from an `Authorization: Bearer <key>` header (or `X-Api-Key: <key>`).
    pub fn from_headers(&self, h: &axum::http::HeaderMap) -> Result<Tenant, ApiError> {
        let bearer = h
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")));
        let key = bearer.or_else(|| h.get("x-api-key").and_then(|v| v.to_str().ok()));
        match key.map(str::trim) {
            None | Some("") => Err(ApiError::MissingKey),
            Some(k) => self.authenticate(k),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TenantConfig;

    fn tenants() -> Tenants {
        let mut c = GatewayConfig::default();
        c.tenants.insert(
            "acme".into(),
            TenantConfig {
                keys: vec!["acme-key-0000000001".into()],
                revoked: vec!["acme-old-0000000001".into()],
                ..Default::default()
            },
        );
        c.tenants.insert(
            "acme2".into(),
            TenantConfig {
                keys: vec!["acme2-key-000000001".into()],
                ..Default::default()
            },
        );
        Tenants::new(&c)
    }

    #[test]
    fn keys_open_their_tenant_and_no_other() {
        let t = tenants();
        let a = t.authenticate("acme-key-0000000001").unwrap();
        assert_eq!(a.name, "acme");
        assert!(matches!(
            t.authenticate("acme-old-0000000001"),
            Err(ApiError::RevokedKey)
        ));
        assert!(matches!(t.authenticate("nope"), Err(ApiError::UnknownKey)));
        assert!(a.owns("acme.1234"));
        // a tenant whose name extends another's owns none of its jobs, and the reverse
        assert!(!a.owns("acme2.1234"));
        assert!(!t.authenticate("acme2-key-000000001").unwrap().owns("acme.1234"));
        assert!(!a.owns("acme."));
        assert!(!a.owns("acme"));
    }
}
