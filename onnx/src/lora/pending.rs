//! A LoRA merge in flight (asynchronous LoRA loading): the job starts denoising with the pristine
//! weights and switches to the merged set when it arrives.
//!
//! ```text
//! merging side (the LoraManager, or the thread of spawn / spawn_loading)    model thread (pipeline)
//!   MergeSender::send(Result<Arc<MergedWeights>>) ══ channel ══▶ PendingMerge::poll at step
//!                                                                boundaries, waiting at the bound step
//!   MergeSender dropped unsent ═══════════════════ channel ══▶ poll: "the LoRA merge was abandoned"
//! ```

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Duration;

use super::adapter::LoraAdapter;
use crate::weights::{MergedWeights, Weights};
use crate::{Error, Result};

/// A merge that finishes while a job runs (asynchronous LoRA loading): the merging side holds a
/// [`MergeSender`], the pipeline polls this at step boundaries and waits at the bound step.
pub struct PendingMerge {
    rx: Receiver<Result<Arc<MergedWeights>>>,
}

/// The merging side of a [`PendingMerge`]; dropping it unsent fails the pending merge.
pub struct MergeSender {
    tx: Sender<Result<Arc<MergedWeights>>>,
}

impl MergeSender {
    pub fn send(self, result: Result<Arc<MergedWeights>>) {
        // the job may be gone (cancelled, failed): nobody to tell
        let _ = self.tx.send(result);
    }
}

impl PendingMerge {
    pub fn channel() -> (MergeSender, PendingMerge) {
        let (tx, rx) = mpsc::channel();
        (MergeSender { tx }, PendingMerge { rx })
    }

    /// A merge that is already done (or failed).
    pub fn ready(result: Result<Arc<MergedWeights>>) -> PendingMerge {
        let (tx, rx) = PendingMerge::channel();
        tx.send(result);
        rx
    }

    /// Merges on a thread of its own (`katz generate --lora-mode async` without the service).
    pub fn spawn(weights: Arc<Weights>, loras: Vec<(Arc<LoraAdapter>, f32)>) -> PendingMerge {
        PendingMerge::on_thread("lora-merge", move || weights.merge(&loras).map(Arc::new))
    }

    /// Runs `merge` on a thread named `name`. A thread that cannot start drops its sender, so the
    /// pending merge reports itself abandoned instead of panicking the caller.
    fn on_thread(
        name: &str,
        merge: impl FnOnce() -> Result<Arc<MergedWeights>> + Send + 'static,
    ) -> PendingMerge {
        let (tx, rx) = PendingMerge::channel();
        if let Err(e) = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || tx.send(merge()))
        {
            tracing::error!(error = %e, "cannot start the {name} thread");
        }
        rx
    }

    /// Reads and parses LoRA files, then merges them, on a thread of its own: the whole of a
    /// request's LoRA loading overlaps its first steps (without a service's caches).
    pub fn spawn_loading(weights: Arc<Weights>, files: Vec<(std::path::PathBuf, f32)>) -> PendingMerge {
        PendingMerge::on_thread("lora-load", move || {
            let loaded = files
                .iter()
                .map(|(p, s)| Ok((Arc::new(LoraAdapter::load(p, weights.map())?), *s)))
                .collect::<Result<Vec<_>>>()?;
            weights.merge(&loaded).map(Arc::new)
        })
    }

    /// The merged set once it is ready; with `wait`, blocks until it is (at most `limit`).
    pub fn poll(&mut self, wait: Option<Duration>) -> Option<Result<Arc<MergedWeights>>> {
        let gone = || {
            Some(Err(Error::Lora {
                path: "<merge>".into(),
                message: "the LoRA merge was abandoned before it finished".into(),
            }))
        };
        match wait {
            None => match self.rx.try_recv() {
                Ok(r) => Some(r),
                Err(mpsc::TryRecvError::Empty) => None,
                Err(mpsc::TryRecvError::Disconnected) => gone(),
            },
            Some(limit) => match self.rx.recv_timeout(limit) {
                Ok(r) => Some(r),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => gone(),
            },
        }
    }
}
