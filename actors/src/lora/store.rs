//! The LoRA store: adapter bytes by name, from a directory and optionally from Redis.
//!
//! ```text
//! name ─▶ <dir>/<name>.safetensors ─(absent)─▶ Redis GET katz:lora:<name> ─(absent)─▶ unknown LoRA
//! ```
//! A configured delay is added to every fetch (not to the existence check) to simulate a slow
//! store; the service must not let it delay a job's first steps in async mode.

use std::path::PathBuf;
use std::time::Duration;

use redis::AsyncCommands;

use crate::error::JobError;

/// Redis key of an adapter's bytes.
pub fn lora_key(name: &str) -> String {
    format!("katz:lora:{name}")
}

#[derive(Clone)]
pub struct LoraStore {
    dir: PathBuf,
    redis: Option<redis::aio::ConnectionManager>,
    delay: Duration,
}

impl LoraStore {
    pub fn new(dir: PathBuf, redis: Option<redis::aio::ConnectionManager>, delay: Duration) -> Self {
        LoraStore { dir, redis, delay }
    }

    /// Connects to the Redis source, if one is configured.
    pub async fn open(cfg: &super::LoraConfig) -> Result<Self, JobError> {
        let redis = match &cfg.redis {
            None => None,
            Some(url) => {
                let client = redis::Client::open(url.as_str())?;
                Some(redis::aio::ConnectionManager::new(client).await?)
            }
        };
        Ok(LoraStore::new(cfg.dir.clone(), redis, cfg.fetch_delay))
    }

    /// Where `name` would be in the directory; a name that is not plain is refused here too, so
    /// that no caller (a prefetch runs before a job's request is checked) can read outside it.
    fn path(&self, name: &str) -> Result<PathBuf, JobError> {
        if !katz_onnx::request::plain_name(name) {
            return Err(JobError::Invalid(format!(
                "LoRA name {name:?} is not a plain name"
            )));
        }
        Ok(self.dir.join(format!("{name}.safetensors")))
    }

    fn unknown(&self, name: &str) -> JobError {
        let mut places = vec![format!("{}", self.dir.display())];
        if self.redis.is_some() {
            places.push(format!("Redis {}", lora_key(name)));
        }
        JobError::Invalid(format!(
            "unknown LoRA `{name}` (not in the LoRA store: {})",
            places.join(", ")
        ))
    }

    /// Whether the store holds `name` (cheap: no bytes move, no delay).
    pub async fn check(&self, name: &str) -> Result<(), JobError> {
        if tokio::fs::metadata(self.path(name)?)
            .await
            .is_ok_and(|m| m.is_file())
        {
            return Ok(());
        }
        if let Some(r) = &self.redis {
            let found: bool = r.clone().exists(lora_key(name)).await?;
            if found {
                return Ok(());
            }
        }
        Err(self.unknown(name))
    }

    /// The adapter's bytes (after the configured delay).
    pub async fn fetch(&self, name: &str) -> Result<Vec<u8>, JobError> {
        let path = self.path(name)?;
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        match tokio::fs::read(&path).await {
            Ok(b) => return Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(JobError::Model(katz_onnx::Error::Lora {
                    path,
                    message: format!("reading it: {e}"),
                }));
            }
        }
        if let Some(r) = &self.redis {
            let b: Option<Vec<u8>> = r.clone().get(lora_key(name)).await?;
            if let Some(b) = b {
                return Ok(b);
            }
        }
        Err(self.unknown(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn names_that_are_paths_are_refused_before_any_file_is_touched() {
        let dir = std::env::temp_dir().join(format!("katz-lora-store-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("inner")).unwrap();
        std::fs::write(dir.join("outside.safetensors"), b"x").unwrap();
        let store = LoraStore::new(dir.join("inner"), None, Duration::ZERO);
        for name in ["../outside", "a/b", "", ".."] {
            let e = store.fetch(name).await.unwrap_err();
            assert!(e.to_string().contains("not a plain name"), "{name}: {e}");
            assert!(store.check(name).await.is_err(), "{name}");
        }
        std::fs::write(dir.join("inner/ok.safetensors"), b"y").unwrap();
        assert_eq!(store.fetch("ok").await.unwrap(), b"y");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
