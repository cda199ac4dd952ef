//! A generation request, and the one validation that turns it into a [`ValidRequest`].
//!
//! ```text
//! protocol decode (worker) ─┐
//! katz generate / demo ─────┼─▶ Request ─ValidRequest::new(req, &Accepts)─▶ ValidRequest ─▶ Pipeline::run
//! benches, tests ───────────┘              every check, once                  (the only type the
//!                                                                              pipeline and loops take)
//! ```
//!
//! [`Accepts`] says what one pipeline takes: the size limits, its size multiple, its shape buckets
//! (static-shape graphs), whether guidance is split, which ControlNets it has loaded and how many
//! a ControlNet service serves. [`crate::pipeline::Pipeline::accepts`] gives a pipeline's; a
//! worker overlays its configured [`Limits`] and its service models.

use std::sync::Arc;

use crate::conditioning::{self, Preprocess};
use crate::lora::LoraAdapter;
use crate::runtime::{FixedShape, OtherSizes};
use crate::scheduler::SchedulerKind;
use crate::tensor::Tensor;
use crate::{Error, Result};

/// A ControlNet the pipeline loaded: what [`crate::pipeline::Pipeline::place`] and
/// [`crate::pipeline::Pipeline::controlnet`] return, in the order they loaded them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelId(usize);

impl ModelId {
    pub(crate) fn new(i: usize) -> Self {
        ModelId(i)
    }

    /// The position among the pipeline's loaded ControlNets.
    pub fn index(self) -> usize {
        self.0
    }
}

/// A ControlNet model served by ControlNet workers: its position in the worker's list of
/// ControlNet services (`--controlnet-service`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServiceId(pub usize);

/// Which ControlNet a request entry names. One meaning all the way down: the pipeline's own
/// sessions take [`ControlModel::Loaded`], a ControlNet service takes [`ControlModel::Served`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ControlModel {
    Loaded(ModelId),
    Served(ServiceId),
}

impl From<ModelId> for ControlModel {
    fn from(m: ModelId) -> Self {
        ControlModel::Loaded(m)
    }
}

/// One ControlNet of a request.
#[derive(Debug, Clone)]
pub struct ControlRequest {
    pub model: ControlModel,
    /// `[1, 3, h, w]` in [0, 1], any size; a [`ValidRequest`]'s is the request's size, prepared.
    pub image: Tensor,
    /// What is still to be done to `image` (resize mode, canny): [`ValidRequest::new`] does it,
    /// so a [`ValidRequest`]'s is the default (nothing left to do).
    pub prep: Preprocess,
    pub scale: f32,
    /// Fraction of the steps at which it starts and ends (diffusers' control_guidance_start/end).
    pub start: f32,
    pub end: f32,
}

/// One LoRA of a request: by name, with its adapter where it was read already (`katz
/// generate`'s sync mode; the worker's LoRAs are fetched and merged by name elsewhere).
#[derive(Debug, Clone)]
pub struct LoraRequest {
    pub name: String,
    pub scale: f32,
    pub adapter: Option<Arc<LoraAdapter>>,
}

impl LoraRequest {
    /// A LoRA read already, named as its file.
    pub fn loaded(adapter: Arc<LoraAdapter>, scale: f32) -> Self {
        LoraRequest {
            name: adapter.name.clone(),
            scale,
            adapter: Some(adapter),
        }
    }

    /// A LoRA known by name only (merged elsewhere, e.g. by the worker's LoRA manager).
    pub fn named(name: impl Into<String>, scale: f32) -> Self {
        LoraRequest {
            name: name.into(),
            scale,
            adapter: None,
        }
    }
}

/// Everything a generation needs besides the models; not yet checked.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: String,
    /// `None`: zero embeddings as the unconditional half (SDXL's force_zeros_for_empty_prompt).
    pub negative_prompt: Option<String>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f32,
    pub scheduler: SchedulerKind,
    pub karras: bool,
    pub seed: u64,
    pub controlnets: Vec<ControlRequest>,
    pub loras: Vec<LoraRequest>,
}

/// Limits on every request, whatever the pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Largest image side, in pixels.
    pub max_side: usize,
    /// Most denoising steps.
    pub max_steps: usize,
    /// Largest guidance scale.
    pub max_guidance: f32,
    /// Most ControlNets in one request.
    pub max_controlnets: usize,
    /// Most LoRAs in one request.
    pub max_loras: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_side: 4096,
            max_steps: 1000,
            max_guidance: 100.0,
            max_controlnets: 8,
            max_loras: 8,
        }
    }
}

/// What one pipeline accepts (see the module doc).
#[derive(Debug, Clone)]
pub struct Accepts {
    pub limits: Limits,
    /// Width and height must be positive multiples of this (the VAE's scale factor).
    pub size_multiple: usize,
    /// The shape buckets: sizes and UNet batch with graphs of their own.
    pub buckets: Vec<FixedShape>,
    /// What a request of a size no bucket has gets (with buckets).
    pub other_sizes: OtherSizes,
    /// Whether guidance is split over two GPUs (one UNet batch per GPU).
    pub split: bool,
    /// How many ControlNets the pipeline loaded ([`ModelId`]s below this are valid).
    pub loaded: usize,
    /// How many ControlNet-service models can be named ([`ServiceId`]s below this are valid).
    pub served: usize,
}

/// A request that passed every check against one pipeline's [`Accepts`]. The pipeline, its
/// loops and the actors take only this; it reads as a [`Request`] and cannot be changed.
#[derive(Debug, Clone)]
pub struct ValidRequest(Request);

impl std::ops::Deref for ValidRequest {
    type Target = Request;
    fn deref(&self) -> &Request {
        &self.0
    }
}

/// Whether `n` names something without being a path: no separators, no `..`, not empty (LoRA
/// names are keys of a store, never paths into it).
pub fn plain_name(n: &str) -> bool {
    !n.is_empty() && !n.contains('/') && !n.contains('\\') && !n.contains("..")
}

impl ValidRequest {
    /// Checks `req` against `a`; every problem is an [`Error::InvalidRequest`] naming it. The
    /// conditioning images come out at the request's size, preprocessed (`conditioning`).
    pub fn new(mut req: Request, a: &Accepts) -> Result<Self> {
        let bad = |m: String| Err(Error::InvalidRequest(m));
        let (l, f) = (&a.limits, a.size_multiple.max(1));
        if req.steps == 0 {
            return bad("steps must be at least 1".into());
        }
        if req.steps > l.max_steps {
            return bad(format!(
                "steps {} is over the limit: must be at most {}",
                req.steps, l.max_steps
            ));
        }
        for (what, v) in [("width", req.width), ("height", req.height)] {
            if v == 0 || v % f != 0 {
                return bad(format!(
                    "{what} must be a positive multiple of {f} (sizes are multiples of {f}), got {v}"
                ));
            }
            if v > l.max_side {
                return bad(format!(
                    "{what} {v} exceeds the limit: must be at most {}",
                    l.max_side
                ));
            }
        }
        if !req.guidance.is_finite() || req.guidance < 0.0 || req.guidance > l.max_guidance {
            return bad(format!(
                "guidance must be a finite number in 0..={}, got {}",
                l.max_guidance, req.guidance
            ));
        }
        if !a.buckets.is_empty() && a.other_sizes == OtherSizes::Refuse {
            let cfg = req.guidance > 1.0;
            let batch = if cfg && !a.split { 2 } else { 1 };
            let fits = a
                .buckets
                .iter()
                .any(|b| (b.width, b.height, b.unet_batch) == (req.width, req.height, batch));
            if !fits {
                let sizes: Vec<String> = a
                    .buckets
                    .iter()
                    .map(|b| format!("{}x{}", b.width, b.height))
                    .collect();
                let guided = if batch == a.buckets[0].unet_batch {
                    String::new()
                } else {
                    " (its guidance needs another UNet batch than the buckets': guidance ≤ 1 runs a batch of 1)".into()
                };
                return bad(format!(
                    "this worker serves the sizes {} and refuses others; the request is {}x{}{guided}",
                    sizes.join(", "),
                    req.width,
                    req.height
                ));
            }
        }
        if req.controlnets.len() > l.max_controlnets {
            return bad(format!(
                "{} ControlNets, the limit is {}",
                req.controlnets.len(),
                l.max_controlnets
            ));
        }
        for (i, c) in req.controlnets.iter().enumerate() {
            match c.model {
                ControlModel::Loaded(m) if m.index() >= a.loaded => {
                    return bad(format!("ControlNet #{i} refers to a model that is not loaded"));
                }
                ControlModel::Served(s) if s.0 >= a.served => {
                    return bad(format!(
                        "ControlNet #{i} refers to a ControlNet service that is not configured"
                    ));
                }
                _ => {}
            }
            if !c.scale.is_finite() {
                return bad(format!("ControlNet #{i}: scale must be finite"));
            }
            if !(0.0..=1.0).contains(&c.start) || !(0.0..=1.0).contains(&c.end) || c.start >= c.end {
                return bad(format!(
                    "ControlNet #{i}: need 0 ≤ start < end ≤ 1, got {}..{}",
                    c.start, c.end
                ));
            }
            if let Some(k) = c.prep.canny {
                if let Err(m) = k.check() {
                    return bad(format!("ControlNet #{i}: {m}"));
                }
            }
        }
        let size = (req.width, req.height);
        for (i, c) in req.controlnets.iter_mut().enumerate() {
            c.image = conditioning::prepare(&c.image, size, &c.prep).map_err(|e| match e {
                Error::InvalidRequest(m) => Error::InvalidRequest(format!("ControlNet #{i}: {m}")),
                e => e,
            })?;
            c.prep = Preprocess::default();
        }
        if req.loras.len() > l.max_loras {
            return bad(format!("{} LoRAs, the limit is {}", req.loras.len(), l.max_loras));
        }
        for lo in &req.loras {
            if !lo.scale.is_finite() {
                return bad(format!("LoRA {}: scale must be finite", lo.name));
            }
            if !plain_name(&lo.name) {
                return bad(format!("LoRA name {:?} is not a plain name", lo.name));
            }
        }
        Ok(ValidRequest(req))
    }

    /// Whether classifier-free guidance is on (two halves per step).
    pub fn guided(&self) -> bool {
        self.0.guidance > 1.0
    }

    /// The ControlNets acting at step `i` (diffusers' controlnet_keep: start ≤ i/n and
    /// (i+1)/n ≤ end), as indices into `controlnets`.
    pub fn active_controlnets(&self, i: usize) -> Vec<usize> {
        let n = self.0.steps;
        let (lo, hi) = (i as f32 / n as f32, (i + 1) as f32 / n as f32);
        self.0
            .controlnets
            .iter()
            .enumerate()
            .filter(|(_, c)| lo >= c.start && hi <= c.end)
            .map(|(j, _)| j)
            .collect()
    }

    /// The LoRAs read already, with their scales (what a sync merge takes).
    pub fn loaded_loras(&self) -> Result<Vec<(Arc<LoraAdapter>, f32)>> {
        self.0
            .loras
            .iter()
            .map(|l| match &l.adapter {
                Some(a) => Ok((a.clone(), l.scale)),
                None => Err(Error::InvalidRequest(format!(
                    "LoRA {} is named but not read; merge it before the job or pass its file",
                    l.name
                ))),
            })
            .collect()
    }

    /// The request, for a copy to change and validate again.
    pub fn into_inner(self) -> Request {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepts() -> Accepts {
        Accepts {
            limits: Limits::default(),
            size_multiple: 8,
            buckets: Vec::new(),
            other_sizes: OtherSizes::Dynamic,
            split: false,
            loaded: 1,
            served: 0,
        }
    }

    fn request() -> Request {
        Request {
            prompt: "a red circle".into(),
            negative_prompt: None,
            width: 64,
            height: 32,
            steps: 4,
            guidance: 5.0,
            scheduler: SchedulerKind::Euler,
            karras: false,
            seed: 1,
            controlnets: vec![],
            loras: vec![],
        }
    }

    fn control(model: ControlModel, start: f32, end: f32) -> ControlRequest {
        ControlRequest {
            model,
            image: Tensor::zeros(vec![1, 3, 32, 64]),
            prep: Preprocess::default(),
            scale: 1.0,
            start,
            end,
        }
    }

    #[test]
    fn every_problem_is_named() {
        type Edit = Box<dyn Fn(&mut Request)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|r| r.steps = 0), "steps must be at least 1"),
            (
                Box::new(|r| r.steps = 5000),
                "steps 5000 is over the limit: must be at most 1000",
            ),
            (Box::new(|r| r.width = 60), "multiples of 8"),
            (
                Box::new(|r| r.height = 0),
                "height must be a positive multiple of 8",
            ),
            (Box::new(|r| r.width = 8192), "at most 4096"),
            (Box::new(|r| r.guidance = f32::NAN), "guidance"),
            (Box::new(|r| r.guidance = 101.0), "guidance"),
            (
                Box::new(|r| r.controlnets.push(control(ModelId(1).into(), 0.0, 1.0))),
                "not loaded",
            ),
            (
                Box::new(|r| {
                    r.controlnets
                        .push(control(ControlModel::Served(ServiceId(0)), 0.0, 1.0))
                }),
                "service",
            ),
            (
                Box::new(|r| r.controlnets.push(control(ModelId(0).into(), 0.5, 0.5))),
                "start < end",
            ),
            (
                Box::new(|r| {
                    let mut c = control(ModelId(0).into(), 0.0, 1.0);
                    c.prep.canny = Some(conditioning::Canny {
                        low: 200.0,
                        high: 100.0,
                    });
                    r.controlnets.push(c)
                }),
                "ControlNet #0: canny thresholds must be 0 ≤ low ≤ high",
            ),
            (
                Box::new(|r| {
                    let mut c = control(ModelId(0).into(), 0.0, 1.0);
                    c.image = Tensor::zeros(vec![1, 3, 0, 5]);
                    r.controlnets.push(c)
                }),
                "ControlNet #0: conditioning image is empty",
            ),
            (
                Box::new(|r| r.loras.push(LoraRequest::named("../etc", 1.0))),
                "not a plain name",
            ),
            (
                Box::new(|r| r.loras.push(LoraRequest::named("a", f32::INFINITY))),
                "finite",
            ),
            (
                Box::new(|r| r.loras = (0..9).map(|i| LoraRequest::named(format!("l{i}"), 1.0)).collect()),
                "9 LoRAs, the limit is 8",
            ),
        ];
        for (edit, needle) in cases {
            let mut r = request();
            edit(&mut r);
            let e = ValidRequest::new(r, &accepts()).unwrap_err();
            assert!(matches!(e, Error::InvalidRequest(_)), "{e}");
            assert!(e.to_string().contains(needle), "`{e}` does not say `{needle}`");
        }
        assert!(ValidRequest::new(request(), &accepts()).is_ok());
    }

    #[test]
    fn shape_buckets_take_their_sizes_and_batch_and_other_sizes_as_configured() {
        let mut a = accepts();
        let b = |width, height, unet_batch| FixedShape {
            width,
            height,
            unet_batch,
        };
        a.buckets = vec![b(64, 32, 2), b(96, 64, 2)];
        a.other_sizes = OtherSizes::Refuse;
        assert!(ValidRequest::new(request(), &a).is_ok());
        let mut other = request();
        other.width = 128;
        let e = ValidRequest::new(other.clone(), &a).unwrap_err();
        assert!(e.to_string().contains("64x32, 96x64"), "{e}");
        let mut unguided = request();
        unguided.guidance = 1.0;
        let e = ValidRequest::new(unguided, &a).unwrap_err();
        assert!(e.to_string().contains("batch of 1"), "{e}");
        a.split = true;
        a.buckets = vec![b(64, 32, 1)];
        assert!(ValidRequest::new(request(), &a).is_ok());
        // other sizes run on the free-shape sessions when the policy says so
        a.other_sizes = OtherSizes::Dynamic;
        assert!(ValidRequest::new(other, &a).is_ok());
    }

    #[test]
    fn conditioning_images_of_any_size_come_out_prepared_at_the_request_size() {
        use crate::conditioning::{Canny, ResizeMode};
        let mut r = request();
        let mut c = control(ModelId(0).into(), 0.0, 1.0);
        c.image = Tensor::new(vec![1, 3, 50, 100], vec![0.5; 3 * 50 * 100]);
        c.prep = Preprocess {
            resize: ResizeMode::Crop,
            canny: Some(Canny {
                low: 100.0,
                high: 200.0,
            }),
        };
        r.controlnets.push(c);
        let v = ValidRequest::new(r, &accepts()).unwrap();
        assert_eq!(v.controlnets[0].image.shape, [1, 3, 32, 64]);
        assert!(
            v.controlnets[0].image.data.iter().all(|&x| x == 0.0),
            "flat: no edges"
        );
        assert_eq!(v.controlnets[0].prep, Preprocess::default(), "nothing left to do");
        // validating again does not preprocess twice
        let again = ValidRequest::new(v.clone().into_inner(), &accepts()).unwrap();
        assert_eq!(again.controlnets[0].image, v.controlnets[0].image);
    }

    #[test]
    fn active_controlnets_follow_their_windows() {
        let mut r = request();
        r.steps = 4;
        r.controlnets = vec![
            control(ModelId(0).into(), 0.0, 1.0),
            control(ModelId(0).into(), 0.5, 1.0),
            control(ModelId(0).into(), 0.0, 0.25),
        ];
        let v = ValidRequest::new(r, &accepts()).unwrap();
        assert_eq!(v.active_controlnets(0), vec![0, 2]);
        assert_eq!(v.active_controlnets(1), vec![0]);
        assert_eq!(v.active_controlnets(2), vec![0, 1]);
    }
}
