//! Previews of a running generation: the latent a step leaves, projected to RGB at latent
//! resolution (128×128 for a 1024² SDXL image) by a linear map per latent pixel, as ComfyUI's
//! latent-to-RGB previews do — no VAE, microseconds per preview.
//!
//! ```text
//! bundle.json preview_rgb ─Projection::new─┐   (else SDXL's published factors for 4 channels,
//!                                          │    else no previews: Projection::for_bundle → None)
//! latents [1,C,h,w] ──Projection::project──▶ PreviewImage (RGB8, h×w)    model thread
//!                       rgb = factors·z + bias ∈ [-1,1] → round((rgb+1)/2·255)
//! PreviewImage ──png()──▶ PNG bytes                                       off the model thread
//! ```

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::tensor::Tensor;
use crate::{Error, Result};

/// `preview_rgb` in bundle.json: `rgb = factors · latent + bias` per latent pixel, on the latents
/// as the scheduler holds them (multiplied by the VAE's scaling factor), giving RGB in about
/// [-1, 1]. `factors` has 3 rows (R, G, B) of `latent_channels` values, `bias` 3 values.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PreviewRgb {
    pub factors: Vec<Vec<f32>>,
    pub bias: Vec<f32>,
}

/// SDXL's latent-to-RGB factors, as ComfyUI publishes them for its previews:
/// `comfy/latent_formats.py`, class `SDXL`, `latent_rgb_factors` (one row per latent channel,
/// columns R, G, B; transposed here) and `latent_rgb_factors_bias`
/// (github.com/Comfy-Org/ComfyUI). They fit the real SDXL VAE.
pub const SDXL_FACTORS: [[f32; 4]; 3] = [
    [0.3651, -0.2533, 0.1076, -0.3165],
    [0.4232, -0.0042, 0.1111, -0.2492],
    [0.4341, 0.1068, -0.0362, -0.2188],
];
/// See [`SDXL_FACTORS`].
pub const SDXL_BIAS: [f32; 3] = [0.1084, -0.0175, -0.0011];

/// Where a bundle's projection comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The bundle's own `preview_rgb` (fitted to its VAE).
    Bundle,
    /// SDXL's published factors: a 4-channel bundle without `preview_rgb`.
    Sdxl,
}

/// A checked latent → RGB projection for latents of `channels` channels.
#[derive(Debug, Clone, PartialEq)]
pub struct Projection {
    channels: usize,
    /// 3 rows of `channels`, row-major.
    factors: Vec<f32>,
    bias: [f32; 3],
    pub source: Source,
}

/// One preview: 8-bit RGB, row-major, `width × height × 3` bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct PreviewImage {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

impl Projection {
    /// Checks `p` against the bundle's latent channels: 3 rows of `channels` finite factors, 3
    /// finite biases.
    pub fn new(p: &PreviewRgb, channels: usize) -> std::result::Result<Self, String> {
        if p.factors.len() != 3 || p.factors.iter().any(|r| r.len() != channels) {
            let rows: Vec<usize> = p.factors.iter().map(Vec::len).collect();
            return Err(format!(
                "preview_rgb.factors must be 3 rows of {channels} values (the latent channels), got rows of {rows:?}"
            ));
        }
        let [r, g, b] = p.bias[..] else {
            return Err(format!("preview_rgb.bias must be 3 values, got {}", p.bias.len()));
        };
        let factors: Vec<f32> = p.factors.concat();
        if factors.iter().chain(&p.bias).any(|v| !v.is_finite()) {
            return Err("preview_rgb holds a value that is not finite".into());
        }
        Ok(Projection {
            channels,
            factors,
            bias: [r, g, b],
            source: Source::Bundle,
        })
    }

    /// SDXL's published factors ([`SDXL_FACTORS`]).
    pub fn sdxl() -> Self {
        Projection {
            channels: 4,
            factors: SDXL_FACTORS.concat(),
            bias: SDXL_BIAS,
            source: Source::Sdxl,
        }
    }

    /// The projection of a bundle: its `preview_rgb`, else SDXL's factors when it has 4 latent
    /// channels, else `None` (no previews for this bundle). A `preview_rgb` of the wrong shape
    /// is refused when the bundle opens ([`crate::bundle::BaseBundle::open`]).
    pub fn for_bundle(m: &crate::bundle::BaseManifest) -> Option<Self> {
        match &m.preview_rgb {
            Some(p) => Projection::new(p, m.latent_channels).ok(),
            None if m.latent_channels == 4 => Some(Projection::sdxl()),
            None => None,
        }
    }

    /// Projects `[1, C, h, w]` latents to an `h×w` RGB preview.
    pub fn project(&self, latents: &Tensor) -> Result<PreviewImage> {
        let (c, h, w) = match latents.shape[..] {
            [_, c, h, w] => (c, h, w),
            _ => (0, 0, 0),
        };
        if c != self.channels || latents.data.len() < c * h * w {
            return Err(Error::InvalidRequest(format!(
                "a preview needs [1, {}, h, w] latents, got {:?}",
                self.channels, latents.shape
            )));
        }
        let plane = h * w;
        let mut acc = [
            vec![self.bias[0]; plane],
            vec![self.bias[1]; plane],
            vec![self.bias[2]; plane],
        ];
        // channel planes outer, pixels inner: contiguous reads and writes
        for (k, out) in acc.iter_mut().enumerate() {
            for ch in 0..c {
                let f = self.factors[k * c + ch];
                let z = &latents.data[ch * plane..(ch + 1) * plane];
                for (o, &v) in out.iter_mut().zip(z) {
                    *o += f * v;
                }
            }
        }
        let mut rgb = vec![0u8; plane * 3];
        for (i, px) in rgb.chunks_exact_mut(3).enumerate() {
            for k in 0..3 {
                px[k] = (((acc[k][i] + 1.0) * 0.5).clamp(0.0, 1.0) * 255.0).round() as u8;
            }
        }
        Ok(PreviewImage {
            width: w,
            height: h,
            rgb,
        })
    }
}

impl PreviewImage {
    /// The preview as a PNG (8-bit RGB, fast compression).
    pub fn png(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let e = |e: png::EncodingError| Error::InvalidRequest(format!("PNG encoder: {e}"));
        let mut enc = png::Encoder::new(Cursor::new(&mut out), self.width as u32, self.height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::Fast);
        enc.write_header()
            .map_err(e)?
            .write_image_data(&self.rgb)
            .map_err(e)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn latents(c: usize, h: usize, w: usize) -> Tensor {
        // varied values, never all zeros
        let data = (0..c * h * w)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();
        Tensor::new(vec![1, c, h, w], data)
    }

    /// Each pixel is `factors · z + bias` mapped from [-1, 1] to 8 bits, checked against the
    /// same sum in f64 for every pixel.
    #[test]
    fn projects_every_pixel_by_the_factors() {
        let p = Projection::sdxl();
        let (h, w) = (5, 7);
        let z = latents(4, h, w);
        let img = p.project(&z).expect("projects");
        assert_eq!((img.width, img.height, img.rgb.len()), (w, h, w * h * 3));
        for y in 0..h {
            for x in 0..w {
                for k in 0..3 {
                    let mut v = SDXL_BIAS[k] as f64;
                    for ch in 0..4 {
                        v += SDXL_FACTORS[k][ch] as f64 * z.data[ch * h * w + y * w + x] as f64;
                    }
                    let want = (((v + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).round();
                    let got = img.rgb[(y * w + x) * 3 + k] as f64;
                    assert!(
                        (got - want).abs() <= 1.0,
                        "pixel {x},{y} channel {k}: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// A bundle's own factors with another channel count; the PNG decodes to the same pixels.
    #[test]
    fn bundle_factors_and_png_round_trip() {
        let rgb = PreviewRgb {
            factors: vec![vec![1.0, 0.0, 0.0], vec![0.0, 1.0, 0.0], vec![0.0, 0.0, -1.0]],
            bias: vec![0.0, 0.5, 0.0],
        };
        let p = Projection::new(&rgb, 3).expect("3 channels");
        let img = p.project(&latents(3, 4, 6)).expect("projects");
        let png = img.png().expect("encodes");
        let back = crate::image::decode_png(&png, std::path::Path::new("preview.png")).expect("decodes");
        assert_eq!(back.shape, vec![1, 3, 4, 6]);
        for (i, px) in img.rgb.chunks_exact(3).enumerate() {
            for k in 0..3 {
                assert_eq!((back.data[k * 24 + i] * 255.0).round() as u8, px[k]);
            }
        }
    }

    #[test]
    fn refuses_factors_that_do_not_fit() {
        let bad = PreviewRgb {
            factors: vec![vec![0.1; 4]; 3],
            bias: vec![0.0; 3],
        };
        assert!(Projection::new(&bad, 16).unwrap_err().contains("3 rows of 16"));
        let short_bias = PreviewRgb {
            bias: vec![0.0; 2],
            ..bad.clone()
        };
        assert!(Projection::new(&short_bias, 4).unwrap_err().contains("bias"));
        let nan = PreviewRgb {
            bias: vec![f32::NAN, 0.0, 0.0],
            ..bad
        };
        assert!(Projection::new(&nan, 4).is_err());
        assert!(Projection::sdxl().project(&latents(16, 2, 2)).is_err());
    }

    /// What one preview costs on this CPU, at the trained family's latent size (16×16, a 128²
    /// image) and at SDXL's (128×128, a 1024² image): the projection (model thread) and the PNG
    /// encoding (off it). Printed (`-- --nocapture`); the bound only catches a preview that got
    /// expensive by orders of magnitude.
    #[test]
    fn a_preview_costs_microseconds_to_a_millisecond() {
        let p = Projection::sdxl();
        for side in [16, 128] {
            let z = latents(4, side, side);
            let n = 200;
            let t0 = std::time::Instant::now();
            let mut img = None;
            for _ in 0..n {
                img = Some(std::hint::black_box(p.project(&z).expect("projects")));
            }
            let project = t0.elapsed() / n;
            let img = img.expect("one preview");
            let t0 = std::time::Instant::now();
            let mut bytes = 0;
            for _ in 0..n {
                bytes = std::hint::black_box(img.png().expect("encodes")).len();
            }
            let png = t0.elapsed() / n;
            eprintln!(
                "preview {side}x{side}: projection {:.1} µs, PNG encode {:.1} µs ({bytes} bytes)",
                project.as_secs_f64() * 1e6,
                png.as_secs_f64() * 1e6
            );
            assert!(
                project + png < std::time::Duration::from_millis(50),
                "{project:?} + {png:?}"
            );
        }
    }

    /// The committed trained family carries its fitted factors; the seeded tiny bundle (4
    /// channels, none of its own) falls back to SDXL's.
    #[test]
    fn committed_bundles_have_a_projection() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let shapes = crate::bundle::BaseBundle::open(root.join("bundles/shapes/shapes-sdxl")).expect("opens");
        let p = Projection::for_bundle(&shapes.manifest).expect("fitted");
        assert_eq!(p.source, Source::Bundle);
        let tiny = crate::bundle::BaseBundle::open(root.join("bundles/tiny-sdxl")).expect("opens");
        assert_eq!(Projection::for_bundle(&tiny.manifest), Some(Projection::sdxl()));
        let mut m = tiny.manifest.clone();
        m.latent_channels = 16;
        assert_eq!(Projection::for_bundle(&m), None);
    }
}
