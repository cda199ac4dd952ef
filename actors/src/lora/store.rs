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

    /// What the adapter `name` holds, read from its safetensors header alone (a few KB: its
    /// tensor names and shapes; no delay). A header that does not parse is the file's error.
    pub async fn header_parts(&self, name: &str) -> Result<HeaderParts, JobError> {
        let path = self.path(name)?;
        let bad = |message: String| {
            JobError::Model(katz_onnx::Error::Lora {
                path: path.clone(),
                message,
            })
        };
        let header = match read_header_file(&path).await {
            Ok(Some(h)) => h,
            Ok(None) => match &self.redis {
                Some(r) => read_header_redis(r, name)
                    .await?
                    .ok_or_else(|| self.unknown(name))?,
                None => return Err(self.unknown(name)),
            },
            Err(e) => return Err(bad(format!("reading its header: {e}"))),
        };
        let tensors = header_tensors(&header).map_err(bad)?;
        Ok(HeaderParts {
            text_encoder: tensors
                .iter()
                .any(|(k, _)| katz_onnx::lora::is_text_encoder_key(k)),
            conv: tensors.iter().any(|(_, dims)| *dims == 4),
            time_emb: tensors.iter().any(|(k, _)| k.contains("time_emb_proj")),
        })
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

/// The largest safetensors header read (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100 << 20;

/// A safetensors file's header (the JSON after its 8-byte length); None: no such file.
async fn read_header_file(path: &std::path::Path) -> std::io::Result<Option<Vec<u8>>> {
    use tokio::io::AsyncReadExt;
    let mut f = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut len = [0u8; 8];
    f.read_exact(&mut len).await?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER {
        return Err(std::io::Error::other(format!(
            "a header of {n} bytes is not a safetensors header"
        )));
    }
    let mut h = vec![0u8; n as usize];
    f.read_exact(&mut h).await?;
    Ok(Some(h))
}

/// The same from Redis (two GETRANGEs); None: no such key.
async fn read_header_redis(
    r: &redis::aio::ConnectionManager,
    name: &str,
) -> Result<Option<Vec<u8>>, JobError> {
    let key = lora_key(name);
    let mut c = r.clone();
    let len: Vec<u8> = c.getrange(&key, 0, 7).await?;
    if len.is_empty() {
        return Ok(None);
    }
    let bad = |m: String| {
        JobError::Model(katz_onnx::Error::Lora {
            path: key.clone().into(),
            message: m,
        })
    };
    let n = u64::from_le_bytes(
        len.try_into()
            .map_err(|_| bad("shorter than a safetensors header".into()))?,
    );
    if n > MAX_HEADER {
        return Err(bad(format!("a header of {n} bytes is not a safetensors header")));
    }
    let h: Vec<u8> = c.getrange(&key, 8, 8 + n as isize - 1).await?;
    if h.len() as u64 != n {
        return Err(bad("its header is cut short".into()));
    }
    Ok(Some(h))
}

/// What a LoRA file's header says about its parts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeaderParts {
    /// Keys adapting a text encoder.
    pub text_encoder: bool,
    /// 4-D tensors: convolution factors (LoCon).
    pub conv: bool,
    /// Keys of the resnets' `time_emb_proj` (LoCon).
    pub time_emb: bool,
}

/// The tensor names of a safetensors header, each with its number of dimensions.
fn header_tensors(header: &[u8]) -> Result<Vec<(String, usize)>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(header).map_err(|e| format!("not a safetensors file (its header: {e})"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| "not a safetensors file (its header is not a JSON object)".to_string())?;
    Ok(obj
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, t)| {
            let dims = t.get("shape").and_then(|s| s.as_array()).map_or(0, |s| s.len());
            (k.clone(), dims)
        })
        .collect())
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
