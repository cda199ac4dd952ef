//! The VAE decode: one run of the decoder graph, or diffusers' tiled decode for large images
//! (`AutoencoderKL.tiled_decode` with `enable_tiling()`, diffusers 0.42), over a closure that
//! decodes one latent tile.
//!
//! ```text
//! latent [B, C, h, w]  (already divided by the scaling factor)
//!   │  h·w ≤ tile_latent² ─────────────────────────────────▶ decode(latent) ─▶ image
//!   │  else: tiles of tile_latent², a stride of tile_latent·(1 − overlap)
//!   ▼
//! tile (i, j) ─▶ decode ─▶ [B, 3, ≤ tile_sample, ≤ tile_sample]
//!   │  blend_v with tile (i−1, j), then blend_h with tile (i, j−1) (both already blended): a
//!   │  linear ramp over blend = tile_sample · overlap rows / columns, in place
//!   ▼
//! crop each tile to its top-left row_limit² (row_limit = tile_sample − blend) ─▶ concat ─▶ image
//! ```
//!
//! The tiles are blended in diffusers' order, on the already-blended neighbours, so the result is
//! diffusers' tiled decode value for value (tests/vae.rs compares with its reference). The VAE's
//! `post_quant_conv` is a 1×1 convolution, so running it per tile (inside the graph) is what
//! diffusers does too.

use ort::session::Session;

use crate::tensor::Tensor;
use crate::{Error, Result};

/// diffusers' `tile_overlap_factor`.
pub const OVERLAP: f32 = 0.25;

/// Tile sizes of a tiled decode.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tiling {
    /// diffusers' `tile_sample_min_size`: a tile's image side (the VAE's `sample_size`).
    pub tile_sample: usize,
    /// diffusers' `tile_latent_min_size`: a tile's latent side (`tile_sample / vae_scale_factor`);
    /// latents of more than one tile's area are decoded tiled.
    pub tile_latent: usize,
    /// diffusers' `tile_overlap_factor`.
    pub overlap: f32,
}

impl Tiling {
    /// diffusers' sizes for a VAE of `sample_size` and `scale_factor` (`2^(levels − 1)`).
    pub fn new(sample_size: usize, scale_factor: usize) -> Self {
        Tiling {
            tile_sample: sample_size,
            tile_latent: sample_size / scale_factor.max(1),
            overlap: OVERLAP,
        }
    }

    /// Whether a latent of `h × w` is decoded tiled: when it has more than one tile's area.
    /// (diffusers' `enable_tiling()` tiles when either side is longer than a tile; katz decodes
    /// whole every image of at most the VAE's native pixel count — SDXL's 1152×896 or 1536×640
    /// as diffusers' untiled default does — and tiles only what is larger, where the memory goes.)
    pub fn applies(&self, h: usize, w: usize) -> bool {
        h * w > self.tile_latent * self.tile_latent
    }

    fn stride(&self) -> usize {
        ((self.tile_latent as f32 * (1.0 - self.overlap)) as usize).max(1)
    }

    fn blend(&self) -> usize {
        (self.tile_sample as f32 * self.overlap) as usize
    }
}

/// One run of a VAE decoder session: `latent` `[B, 4, h, w]` f32 ─▶ `image` `[B, 3, H, W]` f32.
pub fn run(vae: &mut Session, latent: &Tensor) -> Result<Tensor> {
    let out = vae.run(ort::inputs!["latent" => latent.view()?])?;
    Tensor::from_output(&out, "image")
}

/// Decodes `latent` `[B, C, h, w]`: tiled when `tiling` applies to it, else one `decode` call.
pub fn decode(
    latent: &Tensor,
    tiling: Option<&Tiling>,
    decode: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let [_, _, h, w] = dims4(latent)?;
    match tiling {
        Some(t) if t.applies(h, w) => tiled_decode(latent, t, decode),
        _ => {
            let mut decode = decode;
            decode(latent)
        }
    }
}

/// diffusers' `AutoencoderKL.tiled_decode`.
pub fn tiled_decode(
    latent: &Tensor,
    t: &Tiling,
    mut decode: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let [_, _, h, w] = dims4(latent)?;
    if t.tile_latent == 0 || t.tile_sample == 0 {
        return Err(Error::InvalidRequest(format!(
            "VAE tiling with an empty tile: {t:?}"
        )));
    }
    let (stride, blend) = (t.stride(), t.blend());
    let row_limit = t.tile_sample.saturating_sub(blend);
    let mut rows: Vec<Vec<Tensor>> = Vec::new();
    for i in (0..h).step_by(stride) {
        let mut row = Vec::new();
        for j in (0..w).step_by(stride) {
            let tile = crop(latent, i, j, t.tile_latent, t.tile_latent)?;
            let out = decode(&tile)?;
            dims4(&out)?;
            row.push(out);
        }
        rows.push(row);
    }
    let mut out_rows: Vec<Vec<Tensor>> = Vec::new();
    for i in 0..rows.len() {
        for j in 0..rows[i].len() {
            if i > 0 {
                let (above, this) = rows.split_at_mut(i);
                blend_v(&above[i - 1][j], &mut this[0][j], blend)?;
            }
            if j > 0 {
                let (left, this) = rows[i].split_at_mut(j);
                blend_h(&left[j - 1], &mut this[0], blend)?;
            }
        }
        out_rows.push(
            rows[i]
                .iter()
                .map(|tile| crop(tile, 0, 0, row_limit, row_limit))
                .collect::<Result<_>>()?,
        );
    }
    let rows: Vec<Tensor> = out_rows.iter().map(|r| concat(r, 3)).collect::<Result<_>>()?;
    concat(&rows, 2)
}

fn dims4(x: &Tensor) -> Result<[usize; 4]> {
    <[usize; 4]>::try_from(x.shape.as_slice())
        .map_err(|_| Error::InvalidRequest(format!("VAE tensor of shape {:?}, not [B, C, H, W]", x.shape)))
}

/// `x[:, :, y0 : y0 + hh, x0 : x0 + ww]` (clipped at the edges, as Python slices are).
fn crop(x: &Tensor, y0: usize, x0: usize, hh: usize, ww: usize) -> Result<Tensor> {
    let [b, c, h, w] = dims4(x)?;
    let (y1, x1) = ((y0 + hh).min(h), (x0 + ww).min(w));
    let (oh, ow) = (y1.saturating_sub(y0), x1.saturating_sub(x0));
    let mut data = Vec::with_capacity(b * c * oh * ow);
    for plane in 0..b * c {
        for y in y0..y1 {
            let at = (plane * h + y) * w;
            data.extend_from_slice(&x.data[at + x0..at + x1]);
        }
    }
    Ok(Tensor::new(vec![b, c, oh, ow], data))
}

/// diffusers' `blend_v`: the first rows of `b` ramp from `a`'s last rows to `b`'s own.
fn blend_v(a: &Tensor, b: &mut Tensor, extent: usize) -> Result<()> {
    let [_, _, ah, aw] = dims4(a)?;
    let [nb, c, bh, bw] = dims4(b)?;
    let extent = extent.min(ah).min(bh);
    let w = aw.min(bw);
    for plane in 0..nb * c {
        for y in 0..extent {
            let r = y as f32 / extent as f32;
            let (ra, rb) = ((plane * ah + ah - extent + y) * aw, (plane * bh + y) * bw);
            for x in 0..w {
                b.data[rb + x] = a.data[ra + x] * (1.0 - r) + b.data[rb + x] * r;
            }
        }
    }
    Ok(())
}

/// diffusers' `blend_h`: the first columns of `b` ramp from `a`'s last columns to `b`'s own.
fn blend_h(a: &Tensor, b: &mut Tensor, extent: usize) -> Result<()> {
    let [_, _, ah, aw] = dims4(a)?;
    let [nb, c, bh, bw] = dims4(b)?;
    let extent = extent.min(aw).min(bw);
    let h = ah.min(bh);
    for plane in 0..nb * c {
        for y in 0..h {
            let (ra, rb) = ((plane * ah + y) * aw, (plane * bh + y) * bw);
            for x in 0..extent {
                let r = x as f32 / extent as f32;
                b.data[rb + x] = a.data[ra + aw - extent + x] * (1.0 - r) + b.data[rb + x] * r;
            }
        }
    }
    Ok(())
}

/// `torch.cat(parts, dim)` for dims 2 (rows) and 3 (columns) of 4-D tensors.
fn concat(parts: &[Tensor], dim: usize) -> Result<Tensor> {
    let first = parts
        .first()
        .ok_or_else(|| Error::InvalidRequest("VAE tiling made no tiles".into()))?;
    let [b, c, h, w] = dims4(first)?;
    for p in parts {
        let [pb, pc, ph, pw] = dims4(p)?;
        if pb != b || pc != c || (dim == 3 && ph != h) || (dim == 2 && pw != w) {
            return Err(Error::InvalidRequest(format!(
                "VAE tiles do not line up: {:?} beside {:?}",
                p.shape, first.shape
            )));
        }
    }
    let (oh, ow) = match dim {
        2 => (parts.iter().map(|p| p.shape[2]).sum(), w),
        _ => (h, parts.iter().map(|p| p.shape[3]).sum()),
    };
    let mut data = Vec::with_capacity(b * c * oh * ow);
    for plane in 0..b * c {
        match dim {
            2 => {
                for p in parts {
                    let ph = p.shape[2];
                    data.extend_from_slice(&p.data[plane * ph * w..(plane + 1) * ph * w]);
                }
            }
            _ => {
                for y in 0..h {
                    for p in parts {
                        let pw = p.shape[3];
                        let at = (plane * h + y) * pw;
                        data.extend_from_slice(&p.data[at..at + pw]);
                    }
                }
            }
        }
    }
    Ok(Tensor::new(vec![b, c, oh, ow], data))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in VAE: nearest-neighbour ×f upsampling of channel 0 to 3 channels (a constant
    /// latent decodes to a constant image, whatever the tiling).
    fn upsample(f: usize) -> impl FnMut(&Tensor) -> Result<Tensor> {
        move |x: &Tensor| {
            let [b, _, h, w] = dims4(x)?;
            let c = x.shape[1];
            let mut data = Vec::with_capacity(b * 3 * h * f * w * f);
            for n in 0..b {
                for _ in 0..3 {
                    for y in 0..h * f {
                        for xx in 0..w * f {
                            data.push(x.data[((n * c) * h + y / f) * w + xx / f]);
                        }
                    }
                }
            }
            Ok(Tensor::new(vec![b, 3, h * f, w * f], data))
        }
    }

    #[test]
    fn diffusers_sizes() {
        let t = Tiling::new(1024, 8);
        assert_eq!((t.tile_latent, t.stride(), t.blend()), (128, 96, 256));
        assert!(!t.applies(128, 128), "1024² is decoded whole");
        // SDXL's other buckets have no more pixels than 1024²: whole, as diffusers decodes them
        for (w, h) in [
            (1152, 896),
            (896, 1152),
            (1216, 832),
            (1344, 768),
            (1536, 640),
            (640, 1536),
        ] {
            assert!(!t.applies(h / 8, w / 8), "{w}×{h} is decoded whole");
        }
        assert!(t.applies(256, 256) && t.applies(128, 136) && t.applies(144, 144));
    }

    #[test]
    fn untiled_below_the_threshold() {
        let x = Tensor::new(vec![1, 4, 2, 2], (0..16).map(|v| v as f32).collect());
        let t = Tiling::new(64, 8);
        let mut calls = 0;
        let out = decode(&x, Some(&t), |x| {
            calls += 1;
            upsample(8)(x)
        })
        .unwrap();
        assert_eq!((calls, out.shape.clone()), (1, vec![1, 3, 16, 16]));
    }

    #[test]
    fn tiles_cover_the_image_and_blend_constants_to_themselves() {
        // latent 20×13 in tiles of 8 (stride 6): rows 0, 6, 12, 18; columns 0, 6, 12
        let x = Tensor::new(vec![2, 4, 20, 13], vec![0.5; 2 * 4 * 20 * 13]);
        let t = Tiling::new(64, 8);
        let mut calls = 0;
        let out = tiled_decode(&x, &t, |x| {
            calls += 1;
            upsample(8)(x)
        })
        .unwrap();
        assert_eq!(calls, 4 * 3);
        // rows: 48 + 48 + 48 + 16, columns: 48 + 48 + 8
        assert_eq!(out.shape, vec![2, 3, 160, 104]);
        assert!(out.data.iter().all(|v| (v - 0.5).abs() < 1e-6));
    }

    #[test]
    fn blend_is_diffusers_ramp() {
        // a: all 1, b: all 0, extent 4 → b's first rows are 1 − y/4
        let a = Tensor::new(vec![1, 1, 6, 2], vec![1.0; 12]);
        let mut b = Tensor::new(vec![1, 1, 6, 2], vec![0.0; 12]);
        blend_v(&a, &mut b, 4).unwrap();
        let col0: Vec<f32> = (0..6).map(|y| b.data[y * 2]).collect();
        assert_eq!(col0, vec![1.0, 0.75, 0.5, 0.25, 0.0, 0.0]);
        let mut c = Tensor::new(vec![1, 1, 2, 6], vec![0.0; 12]);
        let a = Tensor::new(vec![1, 1, 2, 6], (0..12).map(|v| v as f32).collect());
        blend_h(&a, &mut c, 2).unwrap();
        // row 0: a's last two columns 4, 5 weighted 1 and 0.5
        assert_eq!(&c.data[..6], &[4.0, 2.5, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn crop_and_concat_invert() {
        let x = Tensor::new(vec![1, 2, 4, 5], (0..40).map(|v| v as f32).collect());
        let l = crop(&x, 0, 0, 4, 3).unwrap();
        let r = crop(&x, 0, 3, 4, 3).unwrap();
        assert_eq!(r.shape, vec![1, 2, 4, 2]);
        assert_eq!(concat(&[l, r], 3).unwrap().data, x.data);
        let top = crop(&x, 0, 0, 1, 5).unwrap();
        let bottom = crop(&x, 1, 0, 9, 5).unwrap();
        assert_eq!(concat(&[top, bottom], 2).unwrap().data, x.data);
    }
}
