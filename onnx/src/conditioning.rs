//! ControlNet conditioning images as users send them: any size, resized to the request's size by
//! a stated mode, and optionally turned into an edge map (canny) first.
//!
//! ```text
//! bytes (PNG | JPEG | WebP) ─image::decode_image─▶ [1,3,h,w] ∈ [0,1]   (catalogue, katz generate)
//!   ─ValidRequest::new─▶ prepare(image, W×H, Preprocess):
//!        size ≠ W×H:  resize | crop | pad (diffusers' resize_mode default | crop | fill), Lanczos3
//!        canny:       luma (PIL's "L") ─imageproc::edges::canny(low, high)─▶ 0/255 ─▶ 3 channels
//!   ─▶ [1,3,H,W] ∈ [0,1]   (the only image a ValidRequest holds)
//! ```
//!
//! The modes follow diffusers' `VaeImageProcessor.resize` (the processor its ControlNet
//! pipelines use, resample `lanczos`):
//!
//! | katz | diffusers `resize_mode` | what |
//! |---|---|---|
//! | `resize` (default, as diffusers' ControlNet pipelines) | `default` | plain resize to W×H, aspect ignored |
//! | `crop` | `crop` | resize to cover W×H keeping the aspect, then center-crop |
//! | `pad` | `fill` | resize to fit inside W×H keeping the aspect, centered; the rest filled with the image's border pixels (diffusers stretches the edge row/column) |
//!
//! An image already W×H is not resampled (every mode keeps it as it is). Canny runs after the
//! resize, on the image the ControlNet sees, so the edges are one pixel wide at the request's size.

use image::imageops::FilterType;
use image::{GrayImage, RgbImage};
use serde::{Deserialize, Serialize};

use crate::tensor::Tensor;
use crate::{Error, Result};

/// How a conditioning image of another size than the request's is brought to it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// Plain resize, aspect ignored (diffusers' `default`).
    #[default]
    Resize,
    /// Resize to cover, then center-crop (diffusers' `crop`).
    Crop,
    /// Resize to fit, then pad with the border pixels (diffusers' `fill`).
    Pad,
}

impl std::str::FromStr for ResizeMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "resize" => Ok(ResizeMode::Resize),
            "crop" => Ok(ResizeMode::Crop),
            "pad" => Ok(ResizeMode::Pad),
            _ => Err(format!("`{s}`: the resize modes are resize, crop and pad")),
        }
    }
}

/// The largest edge strength imageproc's canny can see (√5 · 2 · 255): higher thresholds find
/// nothing, so they are refused.
pub const CANNY_MAX: f32 = 1140.0;

/// The canny preprocessor's hysteresis thresholds (cv2.Canny's `threshold1`, `threshold2`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Canny {
    pub low: f32,
    pub high: f32,
}

impl Canny {
    /// Whether the thresholds can be used: finite, `0 ≤ low ≤ high ≤ CANNY_MAX`.
    pub fn check(&self) -> std::result::Result<(), String> {
        let ok = |v: f32| v.is_finite() && (0.0..=CANNY_MAX).contains(&v);
        if !ok(self.low) || !ok(self.high) || self.low > self.high {
            return Err(format!(
                "canny thresholds must be 0 ≤ low ≤ high ≤ {CANNY_MAX}, got low {} high {}",
                self.low, self.high
            ));
        }
        Ok(())
    }
}

/// What becomes of one conditioning image before the ControlNet sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Preprocess {
    pub resize: ResizeMode,
    pub canny: Option<Canny>,
}

/// `[1,3,h,w]` in [0,1] as 8-bit RGB (exact for decoded images: their values are k/255).
fn to_rgb(t: &Tensor) -> RgbImage {
    let (h, w) = (t.shape[2], t.shape[3]);
    let plane = h * w;
    RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let i = y as usize * w + x as usize;
        let q = |c: usize| (t.data[c * plane + i].clamp(0.0, 1.0) * 255.0).round() as u8;
        image::Rgb([q(0), q(1), q(2)])
    })
}

fn from_rgb(img: &RgbImage) -> Tensor {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut data = vec![0f32; 3 * h * w];
    for (x, y, p) in img.enumerate_pixels() {
        let i = y as usize * w + x as usize;
        for c in 0..3 {
            data[c * h * w + i] = p[c] as f32 / 255.0;
        }
    }
    Tensor::new(vec![1, 3, h, w], data)
}

/// The resized image's size and its offset in the `width × height` frame, as diffusers'
/// `_resize_and_crop` / `_resize_and_fill` compute them (integer arithmetic, centered).
fn placed(mode: ResizeMode, (iw, ih): (u32, u32), (w, h): (u32, u32)) -> ((u32, u32), (i64, i64)) {
    let (iw64, ih64, w64, h64) = (iw as u64, ih as u64, w as u64, h as u64);
    // target ratio vs source ratio, compared exactly: w/h > iw/ih ⇔ w·ih > iw·h
    let (wider, narrower) = (w64 * ih64 > iw64 * h64, w64 * ih64 < iw64 * h64);
    let (sw, sh) = match mode {
        ResizeMode::Resize => (w64, h64),
        ResizeMode::Crop => (
            if wider { w64 } else { iw64 * h64 / ih64 },
            if !wider { h64 } else { ih64 * w64 / iw64 },
        ),
        ResizeMode::Pad => (
            if narrower { w64 } else { iw64 * h64 / ih64 },
            if !narrower { h64 } else { ih64 * w64 / iw64 },
        ),
    };
    let (sw, sh) = (sw.max(1) as u32, sh.max(1) as u32);
    let off = |full: u32, part: u32| (full / 2) as i64 - (part / 2) as i64;
    ((sw, sh), (off(w, sw), off(h, sh)))
}

/// Brings `img` to `width × height` by `mode` (see the module doc).
pub fn resize(img: &RgbImage, (width, height): (u32, u32), mode: ResizeMode) -> RgbImage {
    if img.dimensions() == (width, height) {
        return img.clone();
    }
    let ((sw, sh), (ox, oy)) = placed(mode, img.dimensions(), (width, height));
    let scaled = image::imageops::resize(img, sw, sh, FilterType::Lanczos3);
    if (sw, sh) == (width, height) {
        return scaled;
    }
    // crop: the frame lies inside the scaled image; pad: outside pixels take the nearest border
    RgbImage::from_fn(width, height, |x, y| {
        let sx = (x as i64 - ox).clamp(0, sw as i64 - 1) as u32;
        let sy = (y as i64 - oy).clamp(0, sh as i64 - 1) as u32;
        *scaled.get_pixel(sx, sy)
    })
}

/// Canny edges of `img` (grey as PIL's `convert("L")`: 299·R + 587·G + 114·B per mille) as the
/// 3-channel 0/255 edge map ControlNets take.
pub fn canny(img: &RgbImage, c: Canny) -> RgbImage {
    let grey = GrayImage::from_fn(img.width(), img.height(), |x, y| {
        let p = img.get_pixel(x, y);
        let l = (p[0] as u32 * 299 + p[1] as u32 * 587 + p[2] as u32 * 114 + 500) / 1000;
        image::Luma([l as u8])
    });
    let edges = imageproc::edges::canny(&grey, c.low, c.high);
    RgbImage::from_fn(img.width(), img.height(), |x, y| {
        let v = edges.get_pixel(x, y)[0];
        image::Rgb([v, v, v])
    })
}

/// The conditioning image of a request of `width × height`: `image` (`[1,3,h,w]` in [0,1], any
/// size) resized and preprocessed as `p` says. An image of the request's size with no canny is
/// returned as it is, bit for bit.
pub fn prepare(image: &Tensor, (width, height): (usize, usize), p: &Preprocess) -> Result<Tensor> {
    let [1, 3, h, w] = image.shape[..] else {
        return Err(Error::InvalidRequest(format!(
            "conditioning image has shape {:?}, not [1, 3, H, W]",
            image.shape
        )));
    };
    if h == 0 || w == 0 {
        return Err(Error::InvalidRequest("conditioning image is empty".into()));
    }
    if (w, h) == (width, height) && p.canny.is_none() {
        return Ok(image.clone());
    }
    let mut rgb = resize(&to_rgb(image), (width as u32, height as u32), p.resize);
    if let Some(c) = p.canny {
        c.check().map_err(Error::InvalidRequest)?;
        rgb = canny(&rgb, c);
    }
    Ok(from_rgb(&rgb))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `w × h` image: left half red, right half blue, one green top row.
    fn halves(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            if y == 0 {
                image::Rgb([0, 255, 0])
            } else if x < w / 2 {
                image::Rgb([255, 0, 0])
            } else {
                image::Rgb([0, 0, 255])
            }
        })
    }

    #[test]
    fn placement_follows_diffusers_arithmetic() {
        // a 200×100 source into 64×64: crop covers (128×64, centered: offset -32), pad fits (64×32)
        assert_eq!(
            placed(ResizeMode::Crop, (200, 100), (64, 64)),
            ((128, 64), (-32, 0))
        );
        assert_eq!(placed(ResizeMode::Pad, (200, 100), (64, 64)), ((64, 32), (0, 16)));
        assert_eq!(
            placed(ResizeMode::Resize, (200, 100), (64, 64)),
            ((64, 64), (0, 0))
        );
        // a tall source into a wide frame
        assert_eq!(
            placed(ResizeMode::Crop, (100, 200), (64, 32)),
            ((64, 128), (0, -48))
        );
        assert_eq!(placed(ResizeMode::Pad, (100, 200), (64, 32)), ((16, 32), (24, 0)));
    }

    #[test]
    fn modes_keep_or_drop_the_aspect_as_stated() {
        let src = halves(200, 100);
        let r = resize(&src, (64, 64), ResizeMode::Resize);
        assert_eq!(r.dimensions(), (64, 64));
        // crop: the center 100×100 of the source, still red | blue, the green row kept on top
        let c = resize(&src, (64, 64), ResizeMode::Crop);
        assert_eq!(c.dimensions(), (64, 64));
        assert!(c.get_pixel(5, 32)[0] > 200 && c.get_pixel(58, 32)[2] > 200);
        // pad: the image in rows 16..48, the border rows replicated above and below it
        let p = resize(&src, (64, 64), ResizeMode::Pad);
        assert_eq!(
            p.get_pixel(5, 0),
            p.get_pixel(5, 16),
            "top filled with the first row"
        );
        assert_eq!(
            p.get_pixel(5, 63),
            p.get_pixel(5, 47),
            "bottom filled with the last row"
        );
        assert!(p.get_pixel(5, 40)[0] > 200);
        // an image of the frame's size is kept as it is
        let same = halves(64, 64);
        for m in [ResizeMode::Resize, ResizeMode::Crop, ResizeMode::Pad] {
            assert_eq!(resize(&same, (64, 64), m), same);
        }
    }

    #[test]
    fn canny_gives_a_three_channel_binary_edge_map_on_the_boundary() {
        let src = RgbImage::from_fn(64, 64, |x, _| image::Rgb([if x < 32 { 0 } else { 255 }; 3]));
        let e = canny(
            &src,
            Canny {
                low: 100.0,
                high: 200.0,
            },
        );
        let mut on = 0;
        for p in e.pixels() {
            assert!(p[0] == p[1] && p[1] == p[2] && (p[0] == 0 || p[0] == 255));
            on += (p[0] == 255) as usize;
        }
        // the black | white boundary at x = 32 is an edge along (almost) every row
        let boundary = (2..62)
            .filter(|&y| (29..=34).any(|x| e.get_pixel(x, y)[0] == 255))
            .count();
        assert!(boundary >= 55, "{boundary} rows with an edge at the boundary");
        assert!(on < 64 * 64 / 4, "{on} edge pixels: edges are thin");
        // a flat image has none
        let flat = RgbImage::from_pixel(32, 32, image::Rgb([90, 90, 90]));
        let e = canny(
            &flat,
            Canny {
                low: 100.0,
                high: 200.0,
            },
        );
        assert!(e.pixels().all(|p| p[0] == 0));
    }

    #[test]
    fn thresholds_out_of_range_are_refused() {
        let bad = [(-1.0, 10.0), (200.0, 100.0), (0.0, 5000.0), (f32::NAN, 1.0)];
        for (low, high) in bad {
            let e = Canny { low, high }.check().unwrap_err();
            assert!(e.contains("0 ≤ low ≤ high ≤ 1140"), "{e}");
        }
        assert!(Canny {
            low: 100.0,
            high: 200.0
        }
        .check()
        .is_ok());
    }

    #[test]
    fn prepare_keeps_exact_images_bit_for_bit_and_resizes_others() {
        let t = Tensor::new(vec![1, 3, 2, 2], vec![0.123; 12]);
        assert_eq!(prepare(&t, (2, 2), &Preprocess::default()).unwrap(), t);
        let big = from_rgb(&halves(100, 50));
        let out = prepare(&big, (64, 32), &Preprocess::default()).unwrap();
        assert_eq!(out.shape, [1, 3, 32, 64]);
        let edges = prepare(
            &big,
            (64, 32),
            &Preprocess {
                resize: ResizeMode::Crop,
                canny: Some(Canny {
                    low: 50.0,
                    high: 100.0,
                }),
            },
        )
        .unwrap();
        assert!(edges.data.iter().all(|&v| v == 0.0 || v == 1.0));
        assert!(edges.data.contains(&1.0));
    }
}
