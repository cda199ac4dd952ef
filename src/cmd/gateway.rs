//! `katz gateway`: the HTTP face of katz (katz-gateway, docs/http.md).
//!
//! ```text
//! --config FILE.toml ─▶ GatewayConfig ◀─ flags and KATZ_* over it (listen, amqp, redis, keys)
//!   ─▶ katz_gateway::run(cfg, listener, SIGTERM/SIGINT)
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use katz_gateway::GatewayConfig;

use super::terminated;

#[derive(Args, Debug, Clone)]
pub struct GatewayArgs {
    /// TOML file with every option and the tenants (docs/http.md, "Configuration").
    #[arg(long, env = "KATZ_GATEWAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "KATZ_GATEWAY_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// AMQP URI of RabbitMQ [default: amqp://guest:guest@127.0.0.1:5672/%2f].
    #[arg(long, env = "KATZ_AMQP")]
    pub amqp: Option<String>,
    /// Redis URL [default: redis://127.0.0.1:6379/].
    #[arg(long, env = "KATZ_REDIS")]
    pub redis: Option<String>,
    /// API keys as TENANT=KEY, comma-separated (added to the file's tenants, with their defaults).
    #[arg(
        long,
        env = "KATZ_GATEWAY_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub keys: Vec<String>,
    /// Revoked API keys as TENANT=KEY, comma-separated.
    #[arg(
        long,
        env = "KATZ_GATEWAY_REVOKED_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub revoked_keys: Vec<String>,
}

impl GatewayArgs {
    fn config(self) -> anyhow::Result<GatewayConfig> {
        let mut c = match &self.config {
            Some(p) => GatewayConfig::from_file(p)?,
            None => GatewayConfig::default(),
        };
        if let Some(l) = self.listen {
            c.listen = l;
        }
        if let Some(a) = self.amqp {
            c.amqp = a;
        }
        if let Some(r) = self.redis {
            c.redis = r;
        }
        for (list, revoked) in [(&self.keys, false), (&self.revoked_keys, true)] {
            for kv in list.iter().filter(|s| !s.trim().is_empty()) {
                // the key is never printed
                let Some((tenant, key)) = kv.split_once('=') else {
                    bail!("--keys and --revoked-keys take TENANT=KEY pairs (a pair has no `=`)");
                };
                let t = c.tenants.entry(tenant.trim().to_string()).or_default();
                if revoked {
                    t.revoked.push(key.trim().to_string());
                } else {
                    t.keys.push(key.trim().to_string());
                }
            }
        }
        c.check()?;
        if c.tenants.is_empty() {
            bail!("no tenants: give --config FILE with [tenants.<name>] or --keys TENANT=KEY");
        }
        Ok(c)
    }
}

pub fn run(a: GatewayArgs) -> anyhow::Result<()> {
    let cfg = a.config()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("listening on {}", cfg.listen))?;
        katz_gateway::run(cfg, listener, terminated()).await?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: GatewayArgs,
    }

    #[test]
    fn keys_from_flags_make_tenants() {
        let c = Cli::parse_from([
            "x",
            "--keys",
            "acme=acme-key-0123456789,beta=beta-key-0123456789",
            "--revoked-keys",
            "acme=acme-old-0123456789",
        ])
        .a
        .config()
        .unwrap();
        assert_eq!(c.tenants["acme"].keys, vec!["acme-key-0123456789"]);
        assert_eq!(c.tenants["acme"].revoked, vec!["acme-old-0123456789"]);
        assert!(Cli::parse_from(["x", "--keys", "nokey"]).a.config().is_err());
    }
}
