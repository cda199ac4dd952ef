//! `katz bench vae`: the VAE decoder alone, as `Pipeline::decode` runs it (whole, or tiled above
//! the VAE's tile size: katz_onnx::vae), on one device; optionally the decoded image as .npy for
//! tools/vae_check.py to compare with the fp32 VAE and diffusers.
//!
//! ```text
//! --latent F.npy | seeded N(0,1) [1, 4, size/8, size/8]   (the graph's `latent`: already / scaling_factor)
//!   ─▶ session (--bundle's vae_decoder, or --graph) on --device
//!   ─▶ warm-up + R timed decodes ─▶ median / min ms ─▶ table, --out JSON, --dump F.npy (`image`, raw)
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use katz_onnx::bundle::BaseBundle;
use katz_onnx::noise::SeededNoise;
use katz_onnx::scheduler::NoiseSource;
use katz_onnx::tensor::Tensor;
use katz_onnx::vae::{self, Tiling};
use serde_json::json;

use super::stats::{median_min, round3};
use crate::cmd::{gpu_names, write_json, DeviceArgs};

#[derive(Args, Debug, Clone)]
pub struct VaeBenchArgs {
    /// Base bundle whose `vae_decoder` is timed (its manifest gives the tile size and precision).
    #[arg(long, required_unless_present = "graph")]
    pub bundle: Option<PathBuf>,
    /// A VAE decoder graph to time instead (input `latent`, output `image`; e.g. an fp32 export).
    #[arg(long, conflicts_with = "bundle")]
    pub graph: Option<PathBuf>,
    /// Image side; the latent is size/8 square (ignored with --latent).
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// The `latent` input as .npy (f32, [B, 4, h, w]) instead of seeded noise.
    #[arg(long)]
    pub latent: Option<PathBuf>,
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    /// auto: tiled when the latent exceeds one tile (as the pipeline decodes); on; off.
    #[arg(long, default_value = "auto", value_parser = ["auto", "on", "off"])]
    pub tiling: String,
    /// A tile's image side [default: the bundle's VAE sample size; 1024 with --graph].
    #[arg(long)]
    pub tile_sample: Option<usize>,
    /// Timed decodes (after --warmup untimed ones).
    #[arg(long, default_value_t = 10)]
    pub repeat: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Writes the last decoded `image` (the graph's raw output, f32) as .npy.
    #[arg(long)]
    pub dump: Option<PathBuf>,
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(a: VaeBenchArgs) -> anyhow::Result<()> {
    let opts = a.device.session_options();
    let (path, mut tiling, precision) = match (&a.bundle, &a.graph) {
        (Some(dir), _) => {
            let b = BaseBundle::open(dir)?;
            let m = &b.manifest;
            if m.vae_precision != "fp32" && !opts.device.is_gpu() {
                bail!(
                    "{}: the VAE decoder is `{}` (fused CUDA ops): it runs on --device cuda:N only",
                    dir.display(),
                    m.vae_precision
                );
            }
            (b.path(&m.vae_decoder), m.vae_tiling(), m.vae_precision.clone())
        }
        (None, Some(g)) => (g.clone(), Tiling::new(1024, 8), "graph".to_string()),
        (None, None) => bail!("give --bundle or --graph"),
    };
    if let Some(s) = a.tile_sample {
        tiling = Tiling::new(s, (tiling.tile_sample / tiling.tile_latent.max(1)).max(1));
    }
    katz_onnx::runtime::init()?;
    let mut session = katz_onnx::runtime::session(&path, &opts).with_context(|| {
        format!(
            "opening {} on {}{}",
            path.display(),
            opts.device,
            if opts.device.is_gpu() {
                ""
            } else {
                " (fused fp16 VAE graphs run on cuda:N only)"
            }
        )
    })?;
    let latent = match &a.latent {
        Some(f) => read_npy(f)?,
        None => {
            let h = a.size / 8;
            let mut t = Tensor::zeros(vec![1, 4, h, h]);
            SeededNoise::new(a.seed).fill(&mut t.data);
            t
        }
    };
    let [_, _, h, w] = <[usize; 4]>::try_from(latent.shape.as_slice())
        .map_err(|_| anyhow::anyhow!("latent of shape {:?}, not [B, 4, h, w]", latent.shape))?;
    let tiled = match a.tiling.as_str() {
        "on" => true,
        "off" => false,
        _ => tiling.applies(h, w),
    };
    let mut decode = |x: &Tensor| -> anyhow::Result<Tensor> {
        Ok(if tiled {
            vae::tiled_decode(x, &tiling, |t| vae::run(&mut session, t))?
        } else {
            vae::run(&mut session, x)?
        })
    };
    let mut image = Tensor::zeros(vec![0]);
    for _ in 0..a.warmup {
        image = decode(&latent).context("VAE decode")?;
    }
    let mut times = Vec::with_capacity(a.repeat);
    for _ in 0..a.repeat.max(1) {
        let t0 = Instant::now();
        image = decode(&latent).context("VAE decode")?;
        times.push(t0.elapsed());
    }
    let (med, min) = median_min(&times);
    println!(
        "VAE decode {}: latent {:?} → image {:?} on {}, {} ({} runs): median {:.2} ms, min {:.2} ms",
        precision,
        latent.shape,
        image.shape,
        opts.device,
        if tiled {
            format!("tiled ({} px tiles)", tiling.tile_sample)
        } else {
            "whole".into()
        },
        times.len(),
        med,
        min
    );
    if let Some(f) = &a.dump {
        write_npy(f, &image)?;
        println!("wrote {}", f.display());
    }
    if let Some(out) = &a.out {
        write_json(
            out,
            &json!({
                "bench": "vae",
                "graph": path.display().to_string(),
                "precision": precision,
                "device": opts.device.to_string(),
                "gpu": gpu_names(),
                "latent_shape": latent.shape,
                "image_shape": image.shape,
                "tiled": tiled,
                "tile_sample": tiling.tile_sample,
                "tile_latent": tiling.tile_latent,
                "repeat": times.len(),
                "median_ms": round3(med),
                "min_ms": round3(min),
            }),
        )?;
    }
    Ok(())
}

/// A little-endian f32 C-order .npy (format 1.0 or 2.0) → tensor.
fn read_npy(path: &Path) -> anyhow::Result<Tensor> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        bail!("{}: not a .npy file", path.display());
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
    };
    let header = std::str::from_utf8(&bytes[start..start + hlen])?;
    if !header.contains("'descr': '<f4'") || header.contains("'fortran_order': True") {
        bail!(
            "{}: need little-endian f32 in C order, header {header}",
            path.display()
        );
    }
    let shape_s = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .with_context(|| format!("{}: no shape in {header}", path.display()))?;
    let shape: Vec<usize> = shape_s
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let body = &bytes[start + hlen..];
    let n: usize = shape.iter().product();
    if body.len() != 4 * n {
        bail!(
            "{}: {} bytes of data for shape {shape:?}",
            path.display(),
            body.len()
        );
    }
    let data = body
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(Tensor::new(shape, data))
}

/// A tensor → .npy (format 1.0, little-endian f32, C order).
fn write_npy(path: &Path, t: &Tensor) -> anyhow::Result<()> {
    let dims: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 4 * t.data.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in &t.data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_round_trip() {
        let dir = std::env::temp_dir().join(format!("katz-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t = Tensor::new(vec![1, 2, 3], (0..6).map(|v| v as f32 * 0.5).collect());
        let f = dir.join("t.npy");
        write_npy(&f, &t).unwrap();
        let back = read_npy(&f).unwrap();
        assert_eq!((back.shape, back.data), (t.shape, t.data));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
