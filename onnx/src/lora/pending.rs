//! A LoRA merge in flight (asynchronous LoRA loading): the job starts denoising with the pristine
//! weights and switches to the merged set when it arrives.
//!
//! ```text
//! merging side (the LoraManager, or the thread of spawn / spawn_loading)    model thread (pipeline)
//!   adapters read ─ MergeSender::text_encoders(touched) ══▶ PendingMerge::touches_text, before
//!                                                          the prompt is encoded: true → the job
//!                                                          waits for the merge (step 0)
//!   MergeSender::send(Result<Arc<MergedWeights>>) ══ channel ══▶ PendingMerge::poll at step
//!                                                                boundaries, waiting at the bound step
//!   MergeSender dropped unsent ═══════════════════ channel ══▶ poll: "the LoRA merge was abandoned"
//! ```
//!
//! A LoRA's text-encoder layers change the prompt's conditioning, which every step reads: such a
//! merge is waited for before the first step. A job waits for the notice (its LoRA files read and
//! checked) before it starts, so a bad file fails the job before any step runs.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::adapter::{LoraAdapter, LoraParts};
use crate::weights::{MergedWeights, Weights};
use crate::{Error, Result};

enum Msg {
    /// The adapters are read: whether they have text-encoder layers.
    TextEncoders(bool),
    Done(Result<Arc<MergedWeights>>),
}

/// A merge that finishes while a job runs (asynchronous LoRA loading): the merging side holds a
/// [`MergeSender`], the pipeline polls this at step boundaries and waits at the bound step.
pub struct PendingMerge {
    rx: Receiver<Msg>,
    /// The merge, received while waiting for the text-encoder notice.
    done: Option<Result<Arc<MergedWeights>>>,
}

/// The merging side of a [`PendingMerge`]; dropping it unsent fails the pending merge.
pub struct MergeSender {
    tx: Sender<Msg>,
}

impl MergeSender {
    /// Says, once the adapters are read and before they are merged, whether they adapt a text
    /// encoder (the job then waits for the merge before it encodes its prompt).
    pub fn text_encoders(&self, touched: bool) {
        let _ = self.tx.send(Msg::TextEncoders(touched));
    }

    pub fn send(self, result: Result<Arc<MergedWeights>>) {
        // the job may be gone (cancelled, failed): nobody to tell
        let _ = self.tx.send(Msg::Done(result));
    }
}

/// Whether `loras` adapt a text encoder.
fn touch_text(loras: &[(Arc<LoraAdapter>, f32)]) -> bool {
    loras.iter().any(|(a, _)| a.has_text_encoder_layers())
}

impl PendingMerge {
    pub fn channel() -> (MergeSender, PendingMerge) {
        let (tx, rx) = mpsc::channel();
        (MergeSender { tx }, PendingMerge { rx, done: None })
    }

    /// A merge that is already done (or failed).
    pub fn ready(result: Result<Arc<MergedWeights>>) -> PendingMerge {
        let (tx, rx) = PendingMerge::channel();
        tx.send(result);
        rx
    }

    /// Merges on a thread of its own (`katz generate --lora-mode async` without the service).
    pub fn spawn(weights: Arc<Weights>, loras: Vec<(Arc<LoraAdapter>, f32)>) -> PendingMerge {
        PendingMerge::on_thread("lora-merge", move |notice| {
            notice.text_encoders(touch_text(&loras));
            weights.merge(&loras).map(Arc::new)
        })
    }

    /// Runs `merge` on a thread named `name`. A thread that cannot start drops its sender, so the
    /// pending merge reports itself abandoned instead of panicking the caller.
    fn on_thread(
        name: &str,
        merge: impl FnOnce(&MergeSender) -> Result<Arc<MergedWeights>> + Send + 'static,
    ) -> PendingMerge {
        let (tx, rx) = PendingMerge::channel();
        if let Err(e) = std::thread::Builder::new().name(name.into()).spawn(move || {
            let r = merge(&tx);
            tx.send(r)
        }) {
            tracing::error!(error = %e, "cannot start the {name} thread");
        }
        rx
    }

    /// Reads and parses LoRA files (using their `parts`), then merges them, on a thread of its
    /// own: the whole of a request's LoRA loading overlaps its first steps (without a service's
    /// caches). Skipped parts are logged.
    pub fn spawn_loading(
        weights: Arc<Weights>,
        files: Vec<(std::path::PathBuf, f32)>,
        parts: LoraParts,
    ) -> PendingMerge {
        PendingMerge::on_thread("lora-load", move |notice| {
            let loaded = files
                .iter()
                .map(|(p, s)| {
                    let a = LoraAdapter::load_with(p, weights.map(), parts)?;
                    if !a.untaken.is_empty() {
                        tracing::warn!(lora = %p.display(), skipped = %a.untaken, "LoRA parts skipped (unet_only)");
                    }
                    Ok((Arc::new(a), *s))
                })
                .collect::<Result<Vec<_>>>()?;
            notice.text_encoders(touch_text(&loaded));
            weights.merge(&loaded).map(Arc::new)
        })
    }

    /// Whether the merge touches the text encoders' weights: waits (at most `limit`) for the
    /// merging side to say so, or for the merge itself. A merge that failed (a bad LoRA file) is
    /// its error, before any step has run.
    pub fn touches_text(&mut self, limit: Duration) -> Result<bool> {
        let until = Instant::now() + limit;
        loop {
            if let Some(done) = &self.done {
                return match done {
                    Ok(m) => Ok(m.touches_text()),
                    Err(_) => Err(self.done.take().and_then(|d| d.err()).unwrap_or_else(gone)),
                };
            }
            let left = until.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(Msg::TextEncoders(t)) => return Ok(t),
                Ok(Msg::Done(r)) => self.done = Some(r),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(Error::Lora {
                        path: "<merge>".into(),
                        message: format!("the job's LoRA files were not read within {limit:?}"),
                    })
                }
                Err(RecvTimeoutError::Disconnected) => return Err(gone()),
            }
        }
    }

    /// The merged set once it is ready; with `wait`, blocks until it is (at most `limit`).
    pub fn poll(&mut self, wait: Option<Duration>) -> Option<Result<Arc<MergedWeights>>> {
        if let Some(done) = self.done.take() {
            return Some(done);
        }
        let until = wait.map(|w| Instant::now() + w);
        loop {
            let msg = match until {
                None => match self.rx.try_recv() {
                    Ok(m) => m,
                    Err(mpsc::TryRecvError::Empty) => return None,
                    Err(mpsc::TryRecvError::Disconnected) => return Some(Err(gone())),
                },
                Some(t) => match self.rx.recv_timeout(t.saturating_duration_since(Instant::now())) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => return None,
                    Err(RecvTimeoutError::Disconnected) => return Some(Err(gone())),
                },
            };
            match msg {
                Msg::Done(r) => return Some(r),
                Msg::TextEncoders(_) => continue,
            }
        }
    }
}

/// The error of a merge whose sender was dropped unsent.
fn gone() -> Error {
    Error::Lora {
        path: "<merge>".into(),
        message: "the LoRA merge was abandoned before it finished".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_encoder_notice_comes_before_the_merge() {
        let (tx, mut p) = PendingMerge::channel();
        tx.text_encoders(true);
        assert!(p.touches_text(Duration::from_secs(1)).unwrap());
        assert!(p.poll(None).is_none(), "no merge yet");
        tx.send(Ok(Arc::new(MergedWeights::default())));
        assert!(p.poll(Some(Duration::from_secs(1))).is_some_and(|r| r.is_ok()));
    }

    #[test]
    fn a_merge_without_a_notice_answers_for_itself() {
        // a ready merge (or a merging side that never says) is its own answer, and is kept
        let mut p = PendingMerge::ready(Ok(Arc::new(MergedWeights::default())));
        assert!(!p.touches_text(Duration::from_secs(1)).unwrap());
        assert!(p.poll(None).is_some_and(|r| r.is_ok()));
        // a failed merge fails the notice, before any step
        let mut p = PendingMerge::ready(Err(Error::InvalidRequest("bad file".into())));
        let e = p.touches_text(Duration::from_secs(1)).unwrap_err().to_string();
        assert!(e.contains("bad file"), "{e}");
        // an abandoned one too
        let (tx, mut p) = PendingMerge::channel();
        drop(tx);
        assert!(p
            .touches_text(Duration::from_secs(1))
            .unwrap_err()
            .to_string()
            .contains("abandoned"));
        // and one that says nothing in time
        let (_tx, mut p) = PendingMerge::channel();
        let e = p.touches_text(Duration::from_millis(10)).unwrap_err().to_string();
        assert!(e.contains("not read within"), "{e}");
    }
}
