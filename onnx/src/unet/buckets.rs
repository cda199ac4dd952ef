//! A device's UNet sessions by shape: one encoder/decoder pair per shape bucket (its free
//! dimensions fixed to the bucket's size and UNet batch, captured as CUDA graphs on a GPU when
//! asked), and one pair with free shapes when other sizes run dynamically.
//!
//! ```text
//! SessionOptions { buckets: [1024², 1152×896, …], other_sizes, cuda_graph }
//!   UnetSet::open ─▶ [UnetShape{fixed: 1024², enc, dec}, …, UnetShape{fixed: None, enc, dec}]
//!                    (sessions made on a few threads at once)
//!   UnetSet::capture(weights, kernels) ─▶ per bucket: GraphedUnet bound to the one WeightSlot
//!                    of this GPU, captured on the calling thread (the one that runs the jobs)
//!   UnetSet::pick(width, height, batch) ─▶ the bucket's pair, else the free-shape pair
//!
//! BucketLoad::FirstUse: open() makes the first bucket's pair (and the free one) only; once the
//!   pipeline is ready (warmed up, or its first job) a background thread opens the rest, one
//!   after another, each only while no job runs and none has for OPEN_AFTER_IDLE
//!   (UnetSet::job_running marks a job) ─▶ Opening.done
//!   UnetSet::prepare(width, height, batch) at a job's start: its bucket's pair, taken from
//!   Opening (or opened now, if the thread has not reached it), captured now on the model thread
//!   (holding device::capturing: the opener and LoRA merges on the GPU wait for it)
//! ```
//!
//! The LoRA-targetable weights are graph inputs, so a bucket's sessions hold only the graph and
//! its activations; the weights (and, with CUDA graphs, the one slot they read) are shared by
//! every bucket. What a bucket costs on a GPU is measured as it loads ([`UnetShape::memory`]).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use katz_kernels::cuda::GpuKernels;
use ort::session::Session;

use crate::bundle::{check_io, BaseBundle};
use crate::device::{beside_capture, capturing, current, free_memory};
use crate::runtime::{self, BucketLoad, FixedShape, SessionOptions};
use crate::shapes::{skip_names, unet_dims};
use crate::weights::Weights;
use crate::{Error, Result};

use super::graphed::{GraphedUnet, WeightSlot};
use super::prelude;

/// The UNet pair of one shape bucket (`fixed`), or of free shapes (`fixed: None`).
pub(crate) struct UnetShape {
    pub fixed: Option<FixedShape>,
    /// Bound and captured for CUDA graphs (buckets on a GPU with `cuda_graph`). Declared before
    /// the sessions so that it is dropped first: its bindings and their bound outputs (from the
    /// sessions' allocators) must go before the sessions do.
    pub graph: Option<GraphedUnet>,
    pub encoder: Session,
    pub decoder: Session,
    /// The UNet prelude (free shapes, never graphed), where the pair takes its outputs
    /// (super::prelude): run once per job and LoRA switch.
    pub prelude: Option<Session>,
    /// The free dimensions of the encoder and decoder (empty for free shapes).
    dims: [Vec<(String, i64)>; 2],
    /// GPU memory this bucket took as it loaded (sessions, bindings, capture), in bytes.
    pub memory: Option<u64>,
}

/// Every UNet pair of one device, by shape.
pub(crate) struct UnetSet {
    pub shapes: Vec<UnetShape>,
    /// The buckets still opening in the background ([`BucketLoad::FirstUse`]).
    deferred: Option<Deferred>,
    /// The weight slot every bucket's CUDA graphs read (made by the first capture).
    slot: Option<Arc<WeightSlot>>,
    /// The opener waits (the pipeline warms up).
    pub hold_opener: bool,
}

/// What a pair's sessions are checked against, and made from.
struct PairSpec {
    enc_path: PathBuf,
    dec_path: PathBuf,
    prelude_path: Option<PathBuf>,
    enc_in: Vec<String>,
    enc_out: Vec<String>,
    dec_in: Vec<String>,
}

impl PairSpec {
    /// A pair's sessions, fixed to `dims` (free shapes when empty), checked against the manifest.
    fn open(&self, opts: &SessionOptions, dims: &[Vec<(String, i64)>; 2], graph: bool) -> Result<Pair> {
        let e = runtime::unet_session(&self.enc_path, opts, &dims[0], graph)?;
        let d = runtime::unet_session(&self.dec_path, opts, &dims[1], graph)?;
        // the inputs the prelude makes are checked against its outputs, the rest against the manifest
        let (ej, dj) = (prelude::job_inputs(&e), prelude::job_inputs(&d));
        check_io(
            &self.enc_path,
            &e,
            &[self.enc_in.clone(), ej.clone()].concat(),
            &self.enc_out,
        )?;
        check_io(
            &self.dec_path,
            &d,
            &[self.dec_in.clone(), dj.clone()].concat(),
            &["noise_pred".into()],
        )?;
        if ej.is_empty() && dj.is_empty() {
            return Ok(Pair(e, d, None));
        }
        let path = self.prelude_path.as_ref().ok_or_else(|| {
            Error::bundle(
                &self.enc_path,
                format!(
                    "the UNet graphs take inputs the prelude makes ({}), and the manifest names no prelude",
                    ej.iter().chain(&dj).next().map(String::as_str).unwrap_or("")
                ),
            )
        })?;
        let p = runtime::unet_session(path, opts, &[], false)?;
        let made: Vec<&str> = p.outputs().iter().map(|o| o.name()).collect();
        if let Some(missing) = ej.iter().chain(&dj).find(|n| !made.contains(&n.as_str())) {
            return Err(Error::bundle(
                path,
                format!("the prelude does not make {missing}, which the UNet graphs take"),
            ));
        }
        tracing::debug!(
            prelude = %path.display(),
            encoder_inputs = ej.len(),
            decoder_inputs = dj.len(),
            "UNet prelude: these step inputs are computed once per job"
        );
        Ok(Pair(e, d, Some(p)))
    }
}

/// A pair's encoder and decoder sessions, and its prelude's where it takes one.
struct Pair(Session, Session, Option<Session>);

/// A bucket not opened at load.
struct Later {
    fixed: FixedShape,
    dims: [Vec<(String, i64)>; 2],
}

/// The background opening of [`BucketLoad::FirstUse`]'s buckets.
#[derive(Default)]
struct Opening {
    /// Not started, in order.
    queue: VecDeque<Later>,
    /// The bucket the opener works on now.
    busy: Option<FixedShape>,
    /// Opened, not yet taken by a job.
    done: Vec<(Later, Result<Pair>)>,
    /// The set is dropped: the opener stops after its current pair.
    stop: bool,
    /// Jobs running on the set now, and since when none has (see [`OPEN_AFTER_IDLE`]).
    running: usize,
    idle_since: Option<Instant>,
}

/// How long the set must have run no job before the opener starts on its next bucket: opening a
/// pair uploads its initializers and allocates device memory, which slows a job that runs beside
/// it by some 15% (1×H200, SDXL); buckets open while the worker is idle, and a job for a bucket
/// not open yet opens it itself.
pub(crate) const OPEN_AFTER_IDLE: Duration = Duration::from_millis(1000);

/// A job running on a [`UnetSet`] (from [`UnetSet::job_running`]): the background opener waits
/// until it ends, then for [`OPEN_AFTER_IDLE`].
pub(crate) struct RunningJob(Option<Arc<(Mutex<Opening>, Condvar)>>);

impl Drop for RunningJob {
    fn drop(&mut self) {
        if let Some(state) = self.0.take() {
            let (lock, cv) = &*state;
            let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
            st.running = st.running.saturating_sub(1);
            if st.running == 0 {
                st.idle_since = Some(Instant::now());
            }
            cv.notify_all();
        }
    }
}

struct Deferred {
    state: Arc<(Mutex<Opening>, Condvar)>,
    spec: Arc<PairSpec>,
    opts: Arc<SessionOptions>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Deferred {
    /// The pair of the bucket `want` picks: opened by the background thread (waiting for it
    /// when it is at work on that very bucket), or opened here if the thread has not reached
    /// it. None: no such bucket was left for later (or it was taken).
    fn take(&self, want: &impl Fn(&FixedShape) -> bool) -> Option<(Later, Result<Pair>)> {
        let (lock, cv) = &*self.state;
        let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(i) = st.done.iter().position(|(l, _)| want(&l.fixed)) {
                break Some(st.done.swap_remove(i));
            }
            let queued = st.queue.iter().position(|l| want(&l.fixed));
            if let Some(l) = queued.and_then(|i| st.queue.remove(i)) {
                drop(st);
                let r = {
                    let _gpu = beside_capture();
                    self.spec.open(&self.opts, &l.dims, self.opts.cuda_graph)
                };
                break Some((l, r));
            }
            if st.busy.as_ref().is_some_and(want) {
                st = cv.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            break None;
        }
    }
}

impl Drop for Deferred {
    fn drop(&mut self) {
        let (lock, cv) = &*self.state;
        lock.lock().unwrap_or_else(|p| p.into_inner()).stop = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The opener thread: the queued buckets' pairs, one after another, each made holding
/// [`beside_capture`] (a capture on the model thread waits for it, and it for the capture).
fn open_in_background(state: Arc<(Mutex<Opening>, Condvar)>, spec: Arc<PairSpec>, opts: Arc<SessionOptions>) {
    let (lock, cv) = &*state;
    loop {
        let later = {
            let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
            // only while no job runs, and none has for OPEN_AFTER_IDLE
            loop {
                if st.stop {
                    return;
                }
                let idle = st.idle_since.map_or(Duration::ZERO, |t| t.elapsed());
                if st.running == 0 && idle >= OPEN_AFTER_IDLE {
                    break;
                }
                let wait = if st.running > 0 {
                    OPEN_AFTER_IDLE
                } else {
                    OPEN_AFTER_IDLE - idle
                };
                st = cv.wait_timeout(st, wait).unwrap_or_else(|p| p.into_inner()).0;
            }
            match st.queue.pop_front() {
                Some(l) => {
                    st.busy = Some(l.fixed);
                    l
                }
                None => return,
            }
        };
        let t0 = Instant::now();
        let r = {
            let _gpu = beside_capture();
            spec.open(&opts, &later.dims, opts.cuda_graph)
        };
        tracing::debug!(
            bucket = %format!("{}x{}", later.fixed.width, later.fixed.height),
            ms = t0.elapsed().as_millis() as u64,
            ok = r.is_ok(),
            "shape bucket opened in the background"
        );
        let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
        st.busy = None;
        st.done.push((later, r));
        cv.notify_all();
    }
}

/// Sessions made at once while a set opens (each is mostly graph optimisation, on one core).
const OPEN_AT_ONCE: usize = 4;

impl UnetSet {
    /// Opens a pair per bucket of `opts` and, when other sizes run dynamically, a pair with free
    /// shapes; checks each against the manifest. Nothing is captured yet. With
    /// [`BucketLoad::FirstUse`], only the first bucket (and the free pair) open now; the others
    /// open on a background thread ([`UnetSet::prepare`] takes them).
    pub(crate) fn open(bundle: &BaseBundle, opts: &SessionOptions) -> Result<Self> {
        let now_count = match opts.bucket_load {
            BucketLoad::All => opts.buckets.len(),
            BucketLoad::FirstUse => opts.buckets.len().min(1),
        };
        let mut wanted: Vec<Option<FixedShape>> =
            opts.buckets[..now_count].iter().copied().map(Some).collect();
        if opts.dynamic() {
            wanted.push(None);
        }
        let mut dims = Vec::with_capacity(wanted.len());
        for f in &wanted {
            dims.push(match f {
                Some(f) => unet_dims(bundle, *f)?,
                None => [vec![], vec![]],
            });
        }
        let mut later = VecDeque::new();
        for f in &opts.buckets[now_count..] {
            later.push_back(Later {
                fixed: *f,
                dims: unet_dims(bundle, *f)?,
            });
        }
        let fp8 = opts.precision == crate::runtime::Precision::Fp8;
        let spec = Arc::new(pair_spec(bundle, opts.deterministic, fp8));
        // graph capture is for the buckets; the free-shape pair has CPU shape nodes
        let graph = |f: &Option<FixedShape>| opts.cuda_graph && f.is_some();
        let mut sessions: Vec<Option<Result<Pair>>> = (0..wanted.len()).map(|_| None).collect();
        for chunk in (0..wanted.len()).collect::<Vec<_>>().chunks(OPEN_AT_ONCE) {
            std::thread::scope(|s| {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|&i| {
                        let (f, d, spec) = (&wanted[i], &dims[i], &spec);
                        s.spawn(move || spec.open(opts, d, graph(f)))
                    })
                    .collect();
                for (&i, h) in chunk.iter().zip(handles) {
                    sessions[i] = Some(h.join().unwrap_or_else(|_| {
                        Err(Error::Gpu("a thread making UNet sessions panicked".into()))
                    }));
                }
            });
        }
        let mut shapes = Vec::with_capacity(wanted.len());
        for ((fixed, d), s) in wanted.into_iter().zip(dims).zip(sessions) {
            let Pair(encoder, decoder, prelude) =
                s.unwrap_or_else(|| Err(Error::Gpu("a UNet session was not made".into())))?;
            shapes.push(UnetShape {
                fixed,
                encoder,
                decoder,
                prelude,
                graph: None,
                dims: d,
                memory: None,
            });
        }
        let deferred = (!later.is_empty()).then(|| {
            let state = Arc::new((
                Mutex::new(Opening {
                    queue: later,
                    idle_since: Some(Instant::now()),
                    ..Opening::default()
                }),
                Condvar::new(),
            ));
            Deferred {
                state,
                spec,
                opts: Arc::new(opts.clone()),
                thread: None,
            }
        });
        Ok(UnetSet {
            shapes,
            deferred,
            slot: None,
            hold_opener: false,
        })
    }

    /// Starts opening the buckets left for their first use on a background thread (once; call
    /// when the pipeline is ready: until then the opener would compete with the load for the
    /// CPU and the GPU's copy engines). Buckets a job needs before the opener reaches them
    /// open on the job's thread.
    pub(crate) fn open_later_in_background(&mut self) {
        let Some(d) = self.deferred.as_mut().filter(|_| !self.hold_opener) else {
            return;
        };
        if d.thread.is_some() {
            return;
        }
        let (st, sp, op) = (d.state.clone(), d.spec.clone(), d.opts.clone());
        d.thread = std::thread::Builder::new()
            .name("katz-buckets".into())
            .spawn(move || open_in_background(st, sp, op))
            .ok();
    }

    /// Marks a job as running until the returned guard drops: the background opener does not
    /// start a bucket meanwhile.
    pub(crate) fn job_running(&self) -> RunningJob {
        RunningJob(self.deferred.as_ref().map(|d| {
            d.state.0.lock().unwrap_or_else(|p| p.into_inner()).running += 1;
            d.state.clone()
        }))
    }

    /// Makes the bucket of a request of `width`×`height` (UNet batch `batch`) ready if it was
    /// left for its first use: takes its pair from the background opener (or opens it here if
    /// the opener has not reached it) and, with `capture` (the weights, this thread's kernels,
    /// the skips), captures it on this thread, holding [`capturing`]. Nothing to do for a
    /// bucket that is ready or a size without a bucket.
    pub(crate) fn prepare(
        &mut self,
        width: usize,
        height: usize,
        batch: usize,
        capture: Option<(&Weights, &Arc<GpuKernels>, usize)>,
    ) -> Result<()> {
        let want = |f: &FixedShape| (f.width, f.height, f.unet_batch) == (width, height, batch);
        if self.shapes.iter().any(|s| s.fixed.as_ref().is_some_and(want)) {
            return Ok(());
        }
        self.open_later_in_background();
        let t0 = Instant::now();
        let taken = self.deferred.as_ref().and_then(|d| d.take(&want));
        let Some((later, pair)) = taken else {
            return Ok(());
        };
        let Pair(encoder, decoder, prelude) = pair?;
        let opened_ms = t0.elapsed().as_millis() as u64;
        let mut shape = UnetShape {
            fixed: Some(later.fixed),
            encoder,
            decoder,
            prelude,
            graph: None,
            dims: later.dims,
            memory: None,
        };
        if let Some((weights, k, skips)) = capture {
            let _gpu = capturing();
            current(k)?;
            let slot = self.slot(weights, k)?;
            capture_one(&mut shape, weights, slot, k, skips)?;
        }
        tracing::info!(
            bucket = %format!("{width}x{height}"),
            waited_ms = opened_ms,
            ms = t0.elapsed().as_millis() as u64,
            mib = shape.memory.map(|b| b >> 20),
            "shape bucket ready on its first job"
        );
        self.shapes
            .insert(self.shapes.len() - usize::from(self.has_free()), shape);
        Ok(())
    }

    /// The buckets whose pairs are open (all of them, unless some were left for first use).
    pub(crate) fn ready_buckets(&self) -> Vec<FixedShape> {
        self.shapes.iter().filter_map(|s| s.fixed).collect()
    }

    fn has_free(&self) -> bool {
        self.shapes.last().is_some_and(|s| s.fixed.is_none())
    }

    /// The weight slot of this set's GPU, made on the first capture.
    fn slot(&mut self, weights: &Weights, k: &Arc<GpuKernels>) -> Result<Arc<WeightSlot>> {
        if let Some(s) = &self.slot {
            return Ok(s.clone());
        }
        let s = WeightSlot::new(weights, k)?;
        self.slot = Some(s.clone());
        Ok(s)
    }

    /// The pair every set has, for what all pairs share (inputs, their types).
    pub(crate) fn first(&self) -> &UnetShape {
        &self.shapes[0]
    }

    /// Binds each bucket for CUDA graphs, reading one weight slot made from `weights`, and
    /// captures it on this thread (the thread that will run it; ONNX Runtime keeps a session's
    /// graph per thread). Call before any job or other thread uses the GPU. Records what each
    /// bucket took of the GPU's memory.
    pub(crate) fn capture(&mut self, weights: &Weights, k: &Arc<GpuKernels>, skips: usize) -> Result<()> {
        let buckets = self.shapes.iter().filter(|s| s.fixed.is_some()).count();
        if buckets == 0 {
            return Ok(());
        }
        current(k)?;
        let slot = self.slot(weights, k)?;
        for s in self.shapes.iter_mut().filter(|s| s.fixed.is_some()) {
            capture_one(s, weights, slot.clone(), k, skips)?;
        }
        Ok(())
    }

    /// The pair for a request of `width`×`height` with a UNet batch of `batch`: its bucket's,
    /// else the free-shape pair (the request check refuses other sizes when there is none).
    pub(crate) fn pick(&mut self, width: usize, height: usize, batch: usize) -> Result<&mut UnetShape> {
        let i = self
            .shapes
            .iter()
            .position(|s| {
                s.fixed
                    .is_some_and(|f| (f.width, f.height, f.unet_batch) == (width, height, batch))
            })
            .or_else(|| self.shapes.iter().position(|s| s.fixed.is_none()));
        match i {
            Some(i) => Ok(&mut self.shapes[i]),
            None => Err(Error::InvalidRequest(format!(
                "no shape bucket takes {width}x{height} with a UNet batch of {batch}, and other sizes are refused"
            ))),
        }
    }

    /// The bucket sizes, `WxH` (for logs).
    pub(crate) fn describe(&self) -> String {
        let v: Vec<String> = self
            .shapes
            .iter()
            .map(|s| match s.fixed {
                Some(f) => format!("{}x{}", f.width, f.height),
                None => "free".to_string(),
            })
            .collect();
        v.join(", ")
    }
}

/// Binds `s` for CUDA graphs, reading `slot`, and captures it on this thread; records what it
/// took of the GPU's memory.
fn capture_one(
    s: &mut UnetShape,
    weights: &Weights,
    slot: Arc<WeightSlot>,
    k: &Arc<GpuKernels>,
    skips: usize,
) -> Result<()> {
    let before = free_memory(k);
    let t0 = std::time::Instant::now();
    let mut g = GraphedUnet::new(
        &s.encoder,
        &s.decoder,
        weights,
        slot,
        k.clone(),
        skips,
        &s.dims[0],
        &s.dims[1],
    )?;
    let bind_ms = t0.elapsed().as_millis() as u64;
    g.capture(&mut s.encoder, &mut s.decoder)
        .map_err(|e| match s.fixed {
            Some(f) => Error::Gpu(format!("bucket {}x{}: {e}", f.width, f.height)),
            None => e,
        })?;
    if let Some(f) = s.fixed {
        tracing::info!(
            bucket = %format!("{}x{}", f.width, f.height),
            bind_ms,
            runs_ms = t0.elapsed().as_millis() as u64 - bind_ms,
            "bucket bound and captured (ONNX Runtime's first runs, then the capture)"
        );
    }
    s.graph = Some(g);
    s.memory = before.zip(free_memory(k)).map(|(b, a)| b.saturating_sub(a));
    Ok(())
}

/// The manifest's paths and input/output names of the UNet pair.
fn pair_spec(bundle: &BaseBundle, deterministic: bool, fp8: bool) -> PairSpec {
    let m = &bundle.manifest;
    let weight_inputs = |graph: &str| -> Vec<String> {
        m.weights
            .map
            .iter()
            .filter(|(_, e)| e.graph == graph)
            .map(|(n, _)| n.clone())
            .collect()
    };
    let skips = skip_names(m.unet.skips);
    let mut enc_in: Vec<String> = [
        "sample",
        "timestep",
        "encoder_hidden_states",
        "text_embeds",
        "time_ids",
    ]
    .map(String::from)
    .to_vec();
    enc_in.extend(weight_inputs("unet_encoder"));
    let mut enc_out: Vec<String> = vec!["emb".into(), "mid".into()];
    enc_out.extend(skips.iter().cloned());
    let mut dec_in: Vec<String> = vec!["emb".into(), "encoder_hidden_states".into(), "mid".into()];
    dec_in.extend(skips.iter().cloned());
    dec_in.extend(weight_inputs("unet_decoder"));
    let [enc_path, dec_path] = bundle.unet_graphs(deterministic, fp8);
    PairSpec {
        enc_path,
        dec_path,
        prelude_path: bundle.unet_prelude(),
        enc_in,
        enc_out,
        dec_in,
    }
}
