//! Where a pipeline's parts run: the one placement rule.
//!
//! ```text
//! Placement { base: cuda:0, cond_half: Some(cuda:1), controlnets: [cuda:2, cuda:3/cuda:4] }
//!   base UNet (unconditional half, or both halves) ── cuda:0
//!   conditional guidance half (latent parallelism) ── cuda:1
//!   ControlNet j ── controlnets[j mod len]: one device for both halves, or one per half
//!                   (empty list, or the base's own device: runs where the base runs)
//!   peer access ── between every pair of distinct GPUs above
//! ```
//!
//! The worker, `katz generate`, `katz demo` and every bench build a `Placement` from their
//! options and hand it to [`crate::pipeline::Pipeline::place`]; nothing else decides where a
//! model runs.

use crate::runtime::Device;
use crate::{Error, Result};

/// Where one ControlNet model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlNetPlace {
    /// One instance on this device, running both guidance halves.
    One(Device),
    /// One instance per guidance half (the Katz paper's placement): the unconditional half's
    /// device, then the conditional half's.
    Halves(Device, Device),
}

impl std::str::FromStr for ControlNetPlace {
    type Err = crate::error::ParseError;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let dev = |d: &str| {
            d.trim()
                .parse::<Device>()
                .map_err(|e| crate::error::ParseError(format!("`{d}`: {e}")))
        };
        match s.split_once('/') {
            Some((u, c)) => Ok(ControlNetPlace::Halves(dev(u)?, dev(c)?)),
            None => Ok(ControlNetPlace::One(dev(s)?)),
        }
    }
}

impl std::fmt::Display for ControlNetPlace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlNetPlace::One(d) => write!(f, "{d}"),
            ControlNetPlace::Halves(u, c) => write!(f, "{u}/{c}"),
        }
    }
}

/// Where the base, the second guidance half and each ControlNet run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The base model: text encoders, UNet (both halves, or the unconditional one), VAE.
    pub base: Device,
    /// Latent parallelism: the conditional guidance half's UNet on this second GPU.
    pub cond_half: Option<Device>,
    /// ControlNet j runs where entry `j mod len` says; empty: where the base runs.
    pub controlnets: Vec<ControlNetPlace>,
}

impl Placement {
    /// Everything on one device.
    pub fn on(base: Device) -> Self {
        Placement {
            base,
            cond_half: None,
            controlnets: Vec::new(),
        }
    }

    /// The base on `base`, the conditional half on `cond_half`, ControlNet j on
    /// `controlnet_devices[j mod len]` (one device for both halves; none: the base's).
    pub fn with_devices(base: Device, cond_half: Option<Device>, controlnet_devices: &[Device]) -> Self {
        Placement {
            base,
            cond_half,
            controlnets: controlnet_devices
                .iter()
                .map(|d| ControlNetPlace::One(*d))
                .collect(),
        }
    }

    /// Where ControlNet `j` (in load order) runs.
    pub fn controlnet(&self, j: usize) -> ControlNetPlace {
        match self.controlnets.len() {
            0 => ControlNetPlace::One(self.base),
            n => self.controlnets[j % n],
        }
    }

    /// The UNet batch a fixed-shape graph takes: both guidance halves on one GPU, one half per
    /// GPU with split guidance, one without guidance.
    pub fn unet_batch(&self, guided: bool) -> usize {
        if guided && self.cond_half.is_none() {
            2
        } else {
            1
        }
    }

    /// Checks that the placement can be honoured: split guidance needs two distinct GPUs, and
    /// every ControlNet on a GPU needs the base on a GPU too (residuals move by peer copy).
    pub fn check(&self) -> Result<()> {
        if let Some(c) = self.cond_half {
            match (self.base.gpu(), c.gpu()) {
                (Some(a), Some(b)) if a != b => {}
                (Some(_), Some(_)) => {
                    return Err(Error::InvalidRequest(format!(
                        "split guidance needs a second GPU, got {c} twice"
                    )))
                }
                _ => {
                    return Err(Error::InvalidRequest(format!(
                        "split guidance needs two GPUs, got {} and {c}",
                        self.base
                    )))
                }
            }
        }
        Ok(())
    }

    /// The GPUs ControlNet `j` runs on (none on the CPU).
    pub fn controlnet_gpus(&self, j: usize) -> Vec<i32> {
        match self.controlnet(j) {
            ControlNetPlace::One(d) => d.gpu().into_iter().collect(),
            ControlNetPlace::Halves(u, c) => u.gpu().into_iter().chain(c.gpu()).collect(),
        }
    }

    /// The pairs of distinct GPUs that read each other's memory for `controlnets` ControlNets:
    /// the two guidance halves, and each ControlNet's GPU with both halves' GPUs.
    pub fn peer_pairs(&self, controlnets: usize) -> Vec<(i32, i32)> {
        let unet: Vec<i32> = self
            .base
            .gpu()
            .into_iter()
            .chain(self.cond_half.and_then(|d| d.gpu()))
            .collect();
        let mut pairs: Vec<(i32, i32)> = Vec::new();
        let mut add = |a: i32, b: i32| {
            let p = (a.min(b), a.max(b));
            if a != b && !pairs.contains(&p) {
                pairs.push(p);
            }
        };
        if let [a, b] = unet[..] {
            add(a, b);
        }
        for j in 0..controlnets {
            for g in self.controlnet_gpus(j) {
                for &u in &unet {
                    add(u, g);
                }
            }
        }
        pairs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_parse_one_device_or_one_per_half() {
        assert_eq!(
            "cuda:1".parse::<ControlNetPlace>().unwrap(),
            ControlNetPlace::One(Device::Cuda(1))
        );
        assert_eq!(
            "cuda:2/cuda:3".parse::<ControlNetPlace>().unwrap(),
            ControlNetPlace::Halves(Device::Cuda(2), Device::Cuda(3))
        );
        assert_eq!(
            ControlNetPlace::Halves(Device::Cuda(2), Device::Cuda(3)).to_string(),
            "cuda:2/cuda:3"
        );
        assert!("cuda:2/gpu".parse::<ControlNetPlace>().is_err());
    }

    #[test]
    fn controlnets_cycle_over_their_places_and_default_to_the_base() {
        let mut p = Placement::on(Device::Cuda(0));
        assert_eq!(p.controlnet(3), ControlNetPlace::One(Device::Cuda(0)));
        p.controlnets = vec![
            ControlNetPlace::One(Device::Cuda(1)),
            ControlNetPlace::One(Device::Cuda(2)),
        ];
        assert_eq!(p.controlnet(0), ControlNetPlace::One(Device::Cuda(1)));
        assert_eq!(p.controlnet(3), ControlNetPlace::One(Device::Cuda(2)));
    }

    #[test]
    fn peer_access_joins_both_halves_and_every_controlnet_gpu() {
        let p = Placement {
            base: Device::Cuda(0),
            cond_half: Some(Device::Cuda(1)),
            controlnets: vec![
                ControlNetPlace::One(Device::Cuda(2)),
                ControlNetPlace::Halves(Device::Cuda(2), Device::Cuda(3)),
            ],
        };
        assert_eq!(p.peer_pairs(2), vec![(0, 1), (0, 2), (1, 2), (0, 3), (1, 3)]);
        assert_eq!(p.unet_batch(true), 1);
        assert_eq!(Placement::on(Device::Cuda(0)).unet_batch(true), 2);
        assert!(Placement::on(Device::Cpu).peer_pairs(3).is_empty());
        p.check().unwrap();
    }

    #[test]
    fn split_guidance_needs_two_gpus() {
        let mut p = Placement::on(Device::Cpu);
        p.cond_half = Some(Device::Cuda(1));
        assert!(p.check().unwrap_err().to_string().contains("two GPUs"));
        p.base = Device::Cuda(1);
        assert!(p.check().unwrap_err().to_string().contains("second GPU"));
    }
}
