//! Loading a pipeline and placing its parts: the base bundle's sessions and weights, then
//! where [`Placement`] says, the conditional guidance half and each ControlNet, with peer
//! access between their GPUs.
//!
//! ```text
//! Pipeline::load(bundle, opts) ─▶ text encoders, UNet encoder/decoder (+ CUDA graphs), VAE, weights
//! Pipeline::place(&Placement, ControlNet bundles) ─▶ HalfUnet on cond_half (split guidance)
//!                                                 ─▶ ControlNet j on placement.controlnet(j)
//!                                                 ─▶ peer access: placement.peer_pairs
//! ```

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::bundle::{check_compute, check_io, BaseBundle, ControlNetBundle};
use crate::controlnet::{lock, ControlNet};
use crate::device::{current, peer};
use crate::placement::{ControlNetPlace, Placement};
use crate::request::ModelId;
use crate::runtime::{self, Device, SessionOptions};
use crate::shapes::{skip_names, unet_dims};
use crate::text::TextEncoders;
use crate::unet::{half_inputs, GraphedUnet};
use crate::weights::Weights;
use crate::{Error, Result};

use super::split_loop::HalfUnet;
use super::Pipeline;

impl Pipeline {
    /// Opens a base bundle on `opts.device`: sessions for every graph, checked against the
    /// manifest; with `opts.cuda_graph`, the UNet captured now.
    pub fn load(dir: impl AsRef<Path>, opts: SessionOptions) -> Result<Self> {
        Self::load_sharing(dir, opts, None)
    }

    /// Like [`Pipeline::load`], reusing the pristine weights of another pipeline of the same
    /// bundle (the worker's pipeline threads and its LoRA merges share one copy).
    pub fn load_sharing(
        dir: impl AsRef<Path>,
        opts: SessionOptions,
        shared: Option<Arc<Weights>>,
    ) -> Result<Self> {
        let bundle = BaseBundle::open(dir)?;
        check_compute(&bundle.dir, &bundle.manifest.compute, opts.device)?;
        runtime::init()?;
        let m = &bundle.manifest;
        let text = TextEncoders::load(&bundle, &opts)?;
        let weight_inputs = |graph: &str| -> Vec<String> {
            m.weights
                .map
                .iter()
                .filter(|(_, e)| e.graph == graph)
                .map(|(n, _)| n.clone())
                .collect()
        };
        let skips = skip_names(m.unet.skips);

        if opts.cuda_graph && (opts.fixed.is_none() || !matches!(opts.device, Device::Cuda(_))) {
            return Err(Error::InvalidRequest(format!(
                "CUDA graphs need fixed shapes (--static-shapes) and the CUDA provider (cuda:N), got {}{}",
                opts.device,
                if opts.fixed.is_none() {
                    " without fixed shapes"
                } else {
                    ""
                }
            )));
        }
        let fixed_dims = opts.fixed.map(|f| unet_dims(&bundle, f)).transpose()?;
        let [enc_dims, dec_dims] = fixed_dims.clone().unwrap_or_default();
        let enc_path = bundle.path(&m.unet.encoder);
        let unet_encoder = runtime::unet_session(&enc_path, &opts, &enc_dims)?;
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
        check_io(&enc_path, &unet_encoder, &enc_in, &enc_out)?;

        let dec_path = bundle.path(&m.unet.decoder);
        let unet_decoder = runtime::unet_session(&dec_path, &opts, &dec_dims)?;
        let mut dec_in: Vec<String> = vec!["emb".into(), "encoder_hidden_states".into(), "mid".into()];
        dec_in.extend(skips.iter().cloned());
        dec_in.extend(weight_inputs("unet_decoder"));
        check_io(&dec_path, &unet_decoder, &dec_in, &["noise_pred".into()])?;

        // weights are bound as the graphs take them: f32, or f16 in fp16 GPU bundles
        let half = half_inputs([&unet_encoder, &unet_decoder], &m.weights.map);
        let weights = match shared {
            Some(w) if w.map() == &m.weights.map => w,
            Some(_) => {
                return Err(Error::bundle(
                    &bundle.dir,
                    "shared weights belong to another bundle",
                ))
            }
            None => {
                let mut w = Weights::load(&bundle, half)?;
                if let Some(id) = opts.device.gpu() {
                    // uploaded once: every job binds them in place, merges run on the device
                    w.to_device(id)?;
                }
                Arc::new(w)
            }
        };

        let vae_path = bundle.path(&m.vae_decoder);
        let vae = runtime::session(&vae_path, &opts)?;
        check_io(&vae_path, &vae, &["latent".into()], &["image".into()])?;

        let mut pipe = Pipeline {
            bundle,
            opts,
            text,
            unet_encoder,
            unet_decoder,
            vae,
            weights,
            controlnets: Vec::new(),
            step_kernels: None,
            graph: None,
            half: None,
            split_on: false,
            cn_threads: Arc::new(crate::threads::LastingThreads::new("controlnet")),
            cn_halves: HashMap::new(),
        };
        if let (true, Some(id), Some([enc_dims, dec_dims])) =
            (pipe.opts.cuda_graph, pipe.opts.device.gpu(), fixed_dims)
        {
            // bound and captured now, before any job or other thread uses the GPU (crate::unet::graphed)
            let k = pipe.step_kernels(id)?;
            current(&k)?;
            let mut g = GraphedUnet::new(
                &pipe.unet_encoder,
                &pipe.unet_decoder,
                &pipe.weights,
                k,
                skips.len(),
                &enc_dims,
                &dec_dims,
            )?;
            g.capture(&mut pipe.unet_encoder, &mut pipe.unet_decoder)?;
            pipe.graph = Some(g);
        }
        Ok(pipe)
    }

    /// Places the pipeline's other parts as `placement` says and loads `controlnets` (in order;
    /// ControlNet j where [`Placement::controlnet`] puts it): the conditional guidance half on
    /// its GPU, each ControlNet on its device (or once per guidance half), and peer access
    /// between every pair of their GPUs. Returns the ControlNets' ids, in order. `placement.base`
    /// must be the device the pipeline loaded on.
    pub fn place<P: AsRef<Path>>(
        &mut self,
        placement: &Placement,
        controlnets: &[P],
    ) -> Result<Vec<ModelId>> {
        if placement.base != self.opts.device {
            return Err(Error::InvalidRequest(format!(
                "the placement puts the base on {}, the pipeline loaded on {}",
                placement.base, self.opts.device
            )));
        }
        placement.check()?;
        if let Some(d) = placement.cond_half {
            if self.half.is_some() {
                return Err(Error::InvalidRequest(
                    "the guidance halves are split already".into(),
                ));
            }
            self.half = Some(HalfUnet::load(&self.bundle, &self.opts, d)?);
            self.split_on = true;
        }
        let mut ids = Vec::with_capacity(controlnets.len());
        for (j, dir) in controlnets.iter().enumerate() {
            let dir = dir.as_ref();
            let id = match placement.controlnet(j) {
                ControlNetPlace::One(d) if d == self.opts.device => self.controlnet(dir)?,
                ControlNetPlace::One(d) => self.load_controlnet(dir, d, 2)?,
                ControlNetPlace::Halves(u, c) => {
                    let u = self.load_controlnet(dir, u, 1)?;
                    let c = self.load_controlnet(dir, c, 1)?;
                    self.cn_halves.insert(u, c);
                    u
                }
            };
            ids.push(id);
        }
        // residuals go to the pipeline's GPU and, with split guidance, to the second half's
        // (without peer access the driver stages such a copy through host memory)
        for (a, b) in placement.peer_pairs(controlnets.len()) {
            peer(a, b)?;
        }
        Ok(ids)
    }

    /// Loads a ControlNet bundle on the pipeline's own device (once per directory) and returns
    /// its id for [`crate::request::ControlRequest`].
    pub fn controlnet(&mut self, dir: impl AsRef<Path>) -> Result<ModelId> {
        let dir = dir.as_ref();
        let own = self.opts.device;
        if let Some(i) = self.controlnets.iter().position(|c| {
            let c = lock(c);
            c.bundle.dir == dir && c.gpu().map(|g| g as i32) == own.gpu()
        }) {
            return Ok(ModelId::new(i));
        }
        self.load_controlnet(dir, own, 2)
    }

    /// A new ControlNet instance on `device` for a batch of `batch`; its id.
    fn load_controlnet(&mut self, dir: &Path, device: Device, batch: usize) -> Result<ModelId> {
        let opts = SessionOptions {
            device,
            ..self.opts.clone()
        };
        let cn = ControlNet::load_batch(ControlNetBundle::open(dir)?, &self.bundle, &opts, batch)?;
        self.controlnets.push(Arc::new(Mutex::new(cn)));
        Ok(ModelId::new(self.controlnets.len() - 1))
    }
}
