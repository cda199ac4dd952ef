//! The optimized-graph cache: ONNX Runtime's graph optimisations of a session, done once and
//! saved, so that a later session of the same graph loads the saved graph with the
//! optimisations off (a warm restart skips them).
//!
//! ```text
//! session(graph, opts, dims) ─key─▶ DIR/<stem>-<key>/graph.onnx (+ graph.data, its initializers)
//!    ready? ─yes─▶ load it, optimisations off ──fails──▶ entry refused: this graph loads
//!                                                        uncached from now on
//!           └─no──▶ load the source graph, level 3, ONNX Runtime writes the optimized graph into
//!                   DIR/.staging-<host>-<pid>-<n>/ ─▶ renamed to DIR/<stem>-<key>/ (atomic: a
//!                   concurrent writer of the same entry keeps the first one)
//! ```
//!
//! The key covers what changes the optimized graph: the ONNX Runtime and katz versions, the
//! graph's path, size and modification time (and those of its external-data files), the fixed
//! dimensions, the execution provider and whether it captures CUDA graphs. It does not cover
//! run-time choices (threads, TF32, algorithm search, determinism): those apply when a session
//! runs, not to the saved graph.

use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Device, SessionOptions, ORT_VERSION};

/// One graph's place in the cache.
pub(super) struct Entry {
    /// `DIR/<stem>-<key>`: complete once it exists (made by a rename).
    ready: PathBuf,
    /// `DIR/<stem>-<key>.refused`: the saved graph did not load again; this graph is not cached.
    refused: PathBuf,
    /// Where this process writes it first.
    staging: PathBuf,
}

const GRAPH: &str = "graph.onnx";
const DATA: &str = "graph.data";

static STAGING: AtomicU64 = AtomicU64::new(0);

impl Entry {
    /// The entry of `graph` made with `opts`, `dims` and `cuda_graph`, under `dir` (made if
    /// missing). None, with a warning, when the cache cannot be used (unreadable graph,
    /// unwritable directory): sessions are then made without it.
    pub(super) fn new(
        dir: &Path,
        graph: &Path,
        opts: &SessionOptions,
        dims: &[(String, i64)],
        cuda_graph: bool,
    ) -> Option<Entry> {
        let key = match key(graph, opts, dims, cuda_graph) {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(graph = %graph.display(), error = %e, "no optimized-graph cache for this graph");
                return None;
            }
        };
        let stem = graph
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "graph".into());
        if let Err(e) = std::fs::create_dir_all(dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "the optimized-graph cache cannot be made");
            return None;
        }
        let refused = dir.join(format!("{stem}-{key:016x}.refused"));
        if refused.exists() {
            return None;
        }
        let n = STAGING.fetch_add(1, Ordering::Relaxed);
        Some(Entry {
            refused,
            ready: dir.join(format!("{stem}-{key:016x}")),
            // host and pid: containers sharing a cache volume all run as pid 1
            staging: dir.join(format!(".staging-{}-{}-{n}", host(), std::process::id())),
        })
    }

    /// Whether the optimized graph is there.
    pub(super) fn is_ready(&self) -> bool {
        self.graph().is_file()
    }

    /// The optimized graph (when ready).
    pub(super) fn graph(&self) -> PathBuf {
        self.ready.join(GRAPH)
    }

    /// Where ONNX Runtime writes the optimized graph of this session (its directory is made).
    pub(super) fn staging_graph(&self) -> PathBuf {
        let _ = std::fs::create_dir_all(&self.staging);
        self.staging.join(GRAPH)
    }

    /// The file name, beside the staged graph, of its initializers.
    pub(super) fn staging_data_name(&self) -> &'static str {
        DATA
    }

    /// Makes the staged graph the entry (a rename; if another process made it first, theirs
    /// stays and ours is removed).
    pub(super) fn commit(&self) {
        if !self.staging.join(GRAPH).is_file() {
            tracing::warn!(dir = %self.staging.display(), "ONNX Runtime wrote no optimized graph");
            let _ = std::fs::remove_dir_all(&self.staging);
            return;
        }
        if std::fs::rename(&self.staging, &self.ready).is_err() {
            let _ = std::fs::remove_dir_all(&self.staging);
        } else {
            tracing::debug!(entry = %self.ready.display(), "optimized graph cached");
        }
    }

    /// Removes what this entry holds (staged or ready).
    pub(super) fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.staging);
        let _ = std::fs::remove_dir_all(&self.ready);
    }

    /// Removes the entry and keeps this graph out of the cache from now on: its saved graph did
    /// not load again (ONNX Runtime can save graphs it cannot reload, e.g. with its own copy
    /// nodes), so saving it each start would only cost time.
    pub(super) fn refuse(&self) {
        self.remove();
        let _ = std::fs::write(&self.refused, b"");
    }
}

/// The entry's key (FNV-1a over what changes the optimized graph).
fn key(
    graph: &Path,
    opts: &SessionOptions,
    dims: &[(String, i64)],
    cuda_graph: bool,
) -> std::io::Result<u64> {
    let graph = graph.canonicalize()?;
    let mut h = fnv::FnvHasher::default();
    let mut put = |s: &str| {
        h.write(s.as_bytes());
        h.write_u8(0);
    };
    put(ORT_VERSION);
    put(env!("CARGO_PKG_VERSION"));
    put(&graph.to_string_lossy());
    // the graph and its external-data files (same stem, same directory)
    let stem = graph
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut files: Vec<PathBuf> = match graph.parent() {
        Some(d) => std::fs::read_dir(d)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .map(|n| n.to_string_lossy().starts_with(&stem))
                    .unwrap_or(false)
            })
            .collect(),
        None => vec![graph.clone()],
    };
    files.sort();
    for f in files {
        let m = std::fs::metadata(&f)?;
        let t = m
            .modified()?
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        put(&format!("{}:{}:{}", f.display(), m.len(), t.as_nanos()));
    }
    for (n, v) in dims {
        put(&format!("{n}={v}"));
    }
    let provider = match opts.device {
        Device::Cpu => "cpu",
        Device::Cuda(_) => "cuda",
        Device::TensorRt(_) => "tensorrt",
    };
    put(provider);
    if opts.device.is_gpu() {
        for (k, v) in super::cuda_options().unwrap_or_default() {
            put(&format!("{k}={v}"));
        }
    }
    put(if cuda_graph { "graph" } else { "nograph" });
    Ok(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph_in(dir: &Path) -> PathBuf {
        let g = dir.join("unet_encoder.onnx");
        std::fs::write(&g, b"not really a graph").unwrap();
        g
    }

    #[test]
    fn the_key_follows_shapes_provider_and_the_file() {
        let d = std::env::temp_dir().join(format!("katz-cache-key-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let g = graph_in(&d);
        let cpu = SessionOptions::default();
        let gpu = SessionOptions {
            device: Device::Cuda(3),
            ..Default::default()
        };
        let dims = vec![("height".to_string(), 64)];
        let k = key(&g, &cpu, &dims, false).unwrap();
        assert_eq!(k, key(&g, &cpu, &dims, false).unwrap(), "stable");
        assert_ne!(k, key(&g, &gpu, &dims, false).unwrap(), "provider");
        assert_ne!(k, key(&g, &cpu, &[], false).unwrap(), "dims");
        assert_ne!(k, key(&g, &cpu, &dims, true).unwrap(), "CUDA graphs");
        let other_gpu = SessionOptions {
            device: Device::Cuda(0),
            exact_fp32: true,
            ..Default::default()
        };
        assert_eq!(
            key(&g, &gpu, &dims, false).unwrap(),
            key(&g, &other_gpu, &dims, false).unwrap(),
            "run-time choices and the GPU's index do not change the graph"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(d.join("unet_encoder.onnx.data"), b"weights").unwrap();
        assert_ne!(k, key(&g, &cpu, &dims, false).unwrap(), "an external-data file");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_committed_entry_is_ready_and_a_second_writer_keeps_the_first() {
        let d = std::env::temp_dir().join(format!("katz-cache-commit-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let g = graph_in(&d);
        let cache = d.join("cache");
        let opts = SessionOptions::default();
        let a = Entry::new(&cache, &g, &opts, &[], false).unwrap();
        let b = Entry::new(&cache, &g, &opts, &[], false).unwrap();
        assert!(!a.is_ready());
        std::fs::write(a.staging_graph(), b"first").unwrap();
        std::fs::write(b.staging_graph(), b"second").unwrap();
        a.commit();
        b.commit();
        assert!(a.is_ready() && b.is_ready());
        assert_eq!(std::fs::read(a.graph()).unwrap(), b"first");
        let left: Vec<_> = std::fs::read_dir(&cache)
            .unwrap()
            .filter_map(|e| e.ok())
            .collect();
        assert_eq!(left.len(), 1, "no staging directory is left behind");
        a.remove();
        assert!(!b.is_ready());
        std::fs::remove_dir_all(&d).unwrap();
    }
}

/// This host's name (a container's own), for staging names that no other process shares.
fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| {
            h.trim()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
                .collect()
        })
        .unwrap_or_default()
}
