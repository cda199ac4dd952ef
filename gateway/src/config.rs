//! The gateway's one configuration struct: TOML (`--config FILE`), then flags and `KATZ_*`
//! environment variables over it (src/cmd/gateway.rs). Each default is written once, here.
//!
//! ```text
//! gateway.toml ─serde─▶ GatewayConfig { listen, amqp, redis, limits, webhooks, tenants }
//!   tenants.<name> { keys, revoked, webhook_secret, rate_per_s, burst, max_active, max_priority }
//!                ─Tenants::new─▶ key → tenant (auth.rs)
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

/// Everything a gateway needs. Doc comments are the user documentation (docs/http.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Where the HTTP server listens.
    pub listen: SocketAddr,
    /// RabbitMQ URL (jobs are published here, with publisher confirms).
    pub amqp: String,
    /// Redis URL (records, images, uploads, events, heartbeats).
    pub redis: String,
    /// The largest request body taken, in bytes (JSON or multipart): 20 MiB.
    pub max_body_bytes: usize,
    /// Result TTL of a job that gives none, in seconds (the protocol's default: one day).
    pub default_result_ttl_s: u64,
    /// Show the operator page at `/` (queue depths, live workers, recent jobs of every tenant):
    /// turn it off where the gateway faces the public.
    pub operator_page: bool,
    pub webhooks: WebhookConfig,
    /// Tenants by name (`[A-Za-z0-9_-]`, 1-32 characters: a job id is `<tenant>.<uuid>`).
    pub tenants: BTreeMap<String, TenantConfig>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            amqp: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            redis: "redis://127.0.0.1:6379/".into(),
            max_body_bytes: 20 << 20,
            default_result_ttl_s: katz_actors::protocol::DEFAULT_RESULT_TTL_S,
            operator_page: true,
            webhooks: WebhookConfig::default(),
            tenants: BTreeMap::new(),
        }
    }
}

/// How webhooks are delivered (webhook.rs).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// Deliveries tried at most this many times.
    pub max_attempts: u32,
    /// The first retry waits this long; each next one twice as long, up to `max_delay_ms`.
    pub base_delay_ms: u64,
    pub max_delay_ms: u64,
    /// One delivery's time limit.
    pub timeout_ms: u64,
    /// How often a gateway looks for deliveries that are due.
    pub poll_ms: u64,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            max_attempts: 8,
            base_delay_ms: 1000,
            max_delay_ms: 300_000,
            timeout_ms: 10_000,
            poll_ms: 250,
        }
    }
}

/// One tenant: its API keys, webhook secret and limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantConfig {
    /// API keys (`Authorization: Bearer <key>`).
    pub keys: Vec<String>,
    /// Keys that no longer open anything (answered 401 `revoked_key`).
    pub revoked: Vec<String>,
    /// The HMAC-SHA256 key of its webhook signatures; webhooks are refused without one.
    pub webhook_secret: Option<String>,
    /// Token bucket: jobs submitted per second, sustained.
    pub rate_per_s: f64,
    /// Token bucket: jobs submitted at once after a quiet while.
    pub burst: u32,
    /// Jobs not yet ended (queued or running) at once.
    pub max_active: u32,
    /// The highest priority its jobs may ask for (0-10); above it a job is refused (422).
    pub max_priority: u8,
}

impl Default for TenantConfig {
    fn default() -> Self {
        TenantConfig {
            keys: Vec::new(),
            revoked: Vec::new(),
            webhook_secret: None,
            rate_per_s: 10.0,
            burst: 20,
            max_active: 64,
            max_priority: 5,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {source}")]
    Toml { path: String, source: toml::de::Error },
    #[error("{0}")]
    Invalid(String),
}

/// Whether `name` may name a tenant: 1-32 characters of `[A-Za-z0-9_-]` (no `.`, which ends the
/// tenant's part of a job id, and no `:`, which separates Redis key parts).
pub fn valid_tenant(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl GatewayConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Toml {
            path: path.display().to_string(),
            source,
        })
    }

    /// Checks what serde cannot: tenant names, limits, keys used once.
    pub fn check(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let mut seen = std::collections::HashSet::new();
        for (name, t) in &self.tenants {
            if !valid_tenant(name) {
                return bad(format!(
                    "tenant name `{name}` is not 1-32 characters of [A-Za-z0-9_-]"
                ));
            }
            if !(t.rate_per_s > 0.0 && t.rate_per_s.is_finite()) || t.burst == 0 || t.max_active == 0 {
                return bad(format!(
                    "tenant `{name}`: rate_per_s, burst and max_active must be above 0"
                ));
            }
            if t.max_priority > katz_actors::protocol::MAX_PRIORITY {
                return bad(format!("tenant `{name}`: max_priority is 0 to 10"));
            }
            for k in t.keys.iter().chain(&t.revoked) {
                if k.len() < 16 {
                    return bad(format!(
                        "tenant `{name}`: an API key is shorter than 16 characters"
                    ));
                }
                if !seen.insert(k.clone()) {
                    // the key itself is never printed
                    return bad(format!("tenant `{name}`: an API key is listed twice"));
                }
            }
        }
        if self.max_body_bytes < 1024 {
            return bad("max_body_bytes must be at least 1024".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_fills_what_it_names_and_defaults_the_rest() {
        let c: GatewayConfig = toml::from_str(
            "listen = \"0.0.0.0:9000\"\n[tenants.acme]\nkeys = [\"acme-key-0123456789\"]\nmax_active = 2\n",
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.max_body_bytes, 20 << 20);
        let t = &c.tenants["acme"];
        assert_eq!((t.max_active, t.burst, t.max_priority), (2, 20, 5));
        c.check().unwrap();
        assert!(
            toml::from_str::<GatewayConfig>("lisen = \"x\"").is_err(),
            "unknown keys are refused"
        );
    }

    #[test]
    fn bad_tenants_are_refused() {
        for (name, key) in [
            ("a.b", "k123456789012345678"),
            ("ok", "short"),
            ("", "k123456789012345678"),
        ] {
            let mut c = GatewayConfig::default();
            c.tenants.insert(
                name.into(),
                TenantConfig {
                    keys: vec![key.into()],
                    ..Default::default()
                },
            );
            assert!(c.check().is_err(), "{name} {key}");
        }
    }
}
