//! The shapes of the SDXL graphs: the UNet encoder's outputs and the free dimensions that
//! static shapes fix.
//!
//! ```text
//! latent [B, C, H/8, W/8] ─▶ unet_encoder ─▶ emb, mid (H/32), skip_0..8 (H/8 ×3, H/16 ×3, H/32 ×3)
//! FixedShape { width, height, unet_batch } ─▶ unet_dims ─▶ [encoder dims, decoder dims]
//!                                          └▶ controlnet_dims ─▶ a ControlNet's dims
//! ```

use crate::bundle::{BaseBundle, BaseManifest};
use crate::runtime::FixedShape;
use crate::{Error, Result};

/// SDXL's usual resolutions (its training buckets at about one megapixel), `(width, height)`:
/// the default shape buckets of a full-size SDXL bundle on a GPU.
pub const SDXL_BUCKETS: [(usize, usize); 9] = [
    (1024, 1024),
    (1152, 896),
    (896, 1152),
    (1216, 832),
    (832, 1216),
    (1344, 768),
    (768, 1344),
    (1536, 640),
    (640, 1536),
];

/// The names of the UNet encoder's skip outputs (and the decoder's skip inputs).
pub fn skip_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("skip_{i}")).collect()
}

/// The spatial strides of the UNet encoder's outputs (mid, then each skip) relative to the
/// latent: SDXL's structure (three levels of two blocks, conv_in first, downsamplers after the
/// first two levels), which the exporter's tiny and full-size configs share.
fn unet_strides(m: &BaseManifest) -> Option<(usize, Vec<usize>)> {
    (m.architecture == "sdxl" && m.unet.skips == 9).then(|| (4, vec![1, 1, 1, 2, 2, 2, 4, 4, 4]))
}

/// The fixed free dimensions of the UNet encoder and decoder for the shape bucket `f`.
pub fn unet_dims(bundle: &BaseBundle, f: FixedShape) -> Result<[Vec<(String, i64)>; 2]> {
    let m = &bundle.manifest;
    let (mid, strides) = unet_strides(m).ok_or_else(|| {
        Error::bundle(
            &bundle.dir,
            "shape buckets need the SDXL UNet structure (nine skips); this bundle has another",
        )
    })?;
    let s = m.vae_scale_factor;
    let largest = mid.max(strides.iter().copied().max().unwrap_or(1));
    if !f.width.is_multiple_of(s * largest) || !f.height.is_multiple_of(s * largest) || f.unet_batch == 0 {
        return Err(Error::InvalidRequest(format!(
            "shape bucket {}x{}: width and height must be multiples of {} (and the batch not 0)",
            f.width,
            f.height,
            s * largest
        )));
    }
    let (h, w) = ((f.height / s) as i64, (f.width / s) as i64);
    let d = |n: &str, v: i64| (n.to_string(), v);
    let b = f.unet_batch as i64;
    let enc = vec![d("batch", b), d("height", h), d("width", w)];
    let mut dec = vec![
        d("batch", b),
        d("mid_h", h / mid as i64),
        d("mid_w", w / mid as i64),
    ];
    for (i, st) in strides.iter().enumerate() {
        dec.push(d(&format!("skip_{i}_h"), h / *st as i64));
        dec.push(d(&format!("skip_{i}_w"), w / *st as i64));
    }
    Ok([enc, dec])
}

/// The spatial sizes of a ControlNet's outputs for shape bucket `f` (`down_i_h`/`_w` as skip
/// `i`, `mid_h`/`_w`), as the exporter names them: the residuals have the UNet encoder's shapes.
pub fn controlnet_out_dims(m: &BaseManifest, f: FixedShape) -> Option<Vec<(String, i64)>> {
    let (mid, strides) = unet_strides(m)?;
    let s = m.vae_scale_factor;
    let (h, w) = ((f.height / s) as i64, (f.width / s) as i64);
    let mut out = vec![
        ("mid_h".to_string(), h / mid as i64),
        ("mid_w".to_string(), w / mid as i64),
    ];
    for (i, st) in strides.iter().enumerate() {
        out.push((format!("down_{i}_h"), h / *st as i64));
        out.push((format!("down_{i}_w"), w / *st as i64));
    }
    Some(out)
}

/// The fixed free dimensions of a ControlNet graph for `f` and a batch of `batch`.
pub fn controlnet_dims(vae_scale: usize, f: FixedShape, batch: usize) -> Vec<(String, i64)> {
    let (h, w) = ((f.height / vae_scale) as i64, (f.width / vae_scale) as i64);
    [
        ("batch", batch as i64),
        ("height", h),
        ("width", w),
        ("image_height", f.height as i64),
        ("image_width", f.width as i64),
    ]
    .into_iter()
    .map(|(n, v)| (n.to_string(), v))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controlnet_dims_follow_the_latent() {
        let f = FixedShape {
            width: 1024,
            height: 768,
            unet_batch: 2,
        };
        let d = controlnet_dims(8, f, 1);
        assert!(d.contains(&("height".to_string(), 96)) && d.contains(&("width".to_string(), 128)));
        assert!(d.contains(&("batch".to_string(), 1)) && d.contains(&("image_width".to_string(), 1024)));
        assert_eq!(skip_names(2), vec!["skip_0", "skip_1"]);
    }
}
