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
//! ```
//!
//! The LoRA-targetable weights are graph inputs, so a bucket's sessions hold only the graph and
//! its activations; the weights (and, with CUDA graphs, the one slot they read) are shared by
//! every bucket. What a bucket costs on a GPU is measured as it loads ([`UnetShape::memory`]).

use std::sync::Arc;

use katz_kernels::cuda::GpuKernels;
use ort::session::Session;

use crate::bundle::{check_io, BaseBundle};
use crate::device::{current, free_memory};
use crate::runtime::{self, FixedShape, SessionOptions};
use crate::shapes::{skip_names, unet_dims};
use crate::weights::Weights;
use crate::{Error, Result};

use super::graphed::{GraphedUnet, WeightSlot};

/// The UNet pair of one shape bucket (`fixed`), or of free shapes (`fixed: None`).
pub(crate) struct UnetShape {
    pub fixed: Option<FixedShape>,
    pub encoder: Session,
    pub decoder: Session,
    /// Bound and captured for CUDA graphs (buckets on a GPU with `cuda_graph`).
    pub graph: Option<GraphedUnet>,
    /// The free dimensions of the encoder and decoder (empty for free shapes).
    dims: [Vec<(String, i64)>; 2],
    /// GPU memory this bucket took as it loaded (sessions, bindings, capture), in bytes.
    pub memory: Option<u64>,
}

/// Every UNet pair of one device, by shape.
pub(crate) struct UnetSet {
    pub shapes: Vec<UnetShape>,
}

/// Sessions made at once while a set opens (each is mostly graph optimisation, on one core).
const OPEN_AT_ONCE: usize = 4;

impl UnetSet {
    /// Opens a pair per bucket of `opts` and, when other sizes run dynamically, a pair with free
    /// shapes; checks each against the manifest. Nothing is captured yet.
    pub(crate) fn open(bundle: &BaseBundle, opts: &SessionOptions) -> Result<Self> {
        let m = &bundle.manifest;
        let mut wanted: Vec<Option<FixedShape>> = opts.buckets.iter().copied().map(Some).collect();
        if opts.dynamic() {
            wanted.push(None);
        }
        let enc_path = bundle.path(&m.unet.encoder);
        let dec_path = bundle.path(&m.unet.decoder);
        let mut dims = Vec::with_capacity(wanted.len());
        for f in &wanted {
            dims.push(match f {
                Some(f) => unet_dims(bundle, *f)?,
                None => [vec![], vec![]],
            });
        }
        // graph capture is for the buckets; the free-shape pair has CPU shape nodes
        let graph = |f: &Option<FixedShape>| opts.cuda_graph && f.is_some();
        let mut sessions: Vec<Option<Result<(Session, Session)>>> = (0..wanted.len()).map(|_| None).collect();
        for chunk in (0..wanted.len()).collect::<Vec<_>>().chunks(OPEN_AT_ONCE) {
            std::thread::scope(|s| {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|&i| {
                        let (f, d) = (&wanted[i], &dims[i]);
                        let (enc_path, dec_path) = (&enc_path, &dec_path);
                        s.spawn(move || -> Result<(Session, Session)> {
                            let e = runtime::unet_session(enc_path, opts, &d[0], graph(f))?;
                            let dd = runtime::unet_session(dec_path, opts, &d[1], graph(f))?;
                            Ok((e, dd))
                        })
                    })
                    .collect();
                for (&i, h) in chunk.iter().zip(handles) {
                    sessions[i] = Some(h.join().unwrap_or_else(|_| {
                        Err(Error::Gpu("a thread making UNet sessions panicked".into()))
                    }));
                }
            });
        }
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

        let mut shapes = Vec::with_capacity(wanted.len());
        for ((fixed, d), s) in wanted.into_iter().zip(dims).zip(sessions) {
            let (encoder, decoder) =
                s.unwrap_or_else(|| Err(Error::Gpu("a UNet session was not made".into())))?;
            check_io(&enc_path, &encoder, &enc_in, &enc_out)?;
            check_io(&dec_path, &decoder, &dec_in, &["noise_pred".into()])?;
            shapes.push(UnetShape {
                fixed,
                encoder,
                decoder,
                graph: None,
                dims: d,
                memory: None,
            });
        }
        Ok(UnetSet { shapes })
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
        let slot = WeightSlot::new(weights, k)?;
        for s in self.shapes.iter_mut().filter(|s| s.fixed.is_some()) {
            let before = free_memory(k);
            let mut g = GraphedUnet::new(
                &s.encoder,
                &s.decoder,
                weights,
                slot.clone(),
                k.clone(),
                skips,
                &s.dims[0],
                &s.dims[1],
            )?;
            g.capture(&mut s.encoder, &mut s.decoder)
                .map_err(|e| match s.fixed {
                    Some(f) => Error::Gpu(format!("bucket {}x{}: {e}", f.width, f.height)),
                    None => e,
                })?;
            s.graph = Some(g);
            s.memory = before.zip(free_memory(k)).map(|(b, a)| b.saturating_sub(a));
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
