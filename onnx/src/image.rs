//! Images in and out: conditioning images in (PNG, JPEG, WebP), generated PNGs out.
//!
//! PNGs are read by the png crate (8 and 16 bit, grey/RGB, alpha dropped), JPEG and WebP by the
//! `image` crate; [`decode_image`] tells them apart by their signature. Images are `[1, 3, H, W]` tensors in [0, 1]. Writing quantises as diffusers' `numpy_to_pil`
//! does (`round(x · 255)`), so the same latents give byte-identical files.

use std::io::Cursor;
use std::path::Path;

use crate::tensor::Tensor;
use crate::{Error, Result};

fn err(path: &Path, message: impl Into<String>) -> Error {
    Error::Image {
        path: path.into(),
        message: message.into(),
    }
}

/// Decodes a PNG (grey, grey+alpha, RGB or RGBA; 8 or 16 bit) into `[1,3,H,W]` in [0,1].
pub fn decode_png(bytes: &[u8], path: &Path) -> Result<Tensor> {
    let mut dec = png::Decoder::new(Cursor::new(bytes));
    dec.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = dec
        .read_info()
        .map_err(|e| err(path, format!("not a readable PNG: {e}")))?;
    let mut buf = vec![
        0u8;
        reader
            .output_buffer_size()
            .ok_or_else(|| err(path, "a PNG too large to decode"))?
    ];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| err(path, format!("a corrupt PNG: {e}")))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let channels = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => return Err(err(path, "an indexed PNG that was not expanded")),
    };
    let mut data = vec![0f32; 3 * h * w];
    for y in 0..h {
        let row = &buf[y * info.line_size..];
        for x in 0..w {
            let px = &row[x * channels..x * channels + channels];
            let rgb = if channels < 3 {
                [px[0]; 3]
            } else {
                [px[0], px[1], px[2]]
            };
            for c in 0..3 {
                data[c * h * w + y * w + x] = rgb[c] as f32 / 255.0;
            }
        }
    }
    Ok(Tensor::new(vec![1, 3, h, w], data))
}

/// Decodes a PNG, JPEG or WebP image of any size into `[1,3,H,W]` in [0,1] (alpha dropped,
/// grey spread to three channels).
pub fn decode_image(bytes: &[u8], path: &Path) -> Result<Tensor> {
    use image::ImageFormat;
    match image::guess_format(bytes) {
        Ok(ImageFormat::Png) => decode_png(bytes, path),
        Ok(f @ (ImageFormat::Jpeg | ImageFormat::WebP)) => {
            let name = if f == ImageFormat::Jpeg { "JPEG" } else { "WebP" };
            let img = image::load_from_memory_with_format(bytes, f)
                .map_err(|e| err(path, format!("not a readable {name}: {e}")))?
                .into_rgb8();
            let (w, h) = (img.width() as usize, img.height() as usize);
            let mut data = vec![0f32; 3 * h * w];
            for (x, y, p) in img.enumerate_pixels() {
                for c in 0..3 {
                    data[c * h * w + y as usize * w + x as usize] = p[c] as f32 / 255.0;
                }
            }
            Ok(Tensor::new(vec![1, 3, h, w], data))
        }
        Ok(f) => Err(err(path, format!("in {f:?} format, not PNG, JPEG or WebP"))),
        Err(_) => Err(err(path, "not a PNG, JPEG or WebP image")),
    }
}

/// Reads a PNG, JPEG or WebP file of any size (the request's validation brings it to its size).
pub fn read_image(path: &Path) -> Result<Tensor> {
    let bytes = std::fs::read(path).map_err(|e| err(path, format!("cannot read: {e}")))?;
    decode_image(&bytes, path)
}

/// Reads a conditioning image that must be exactly `width × height` (benches and tests that
/// feed the pipeline directly).
pub fn read_conditioning(path: &Path, (width, height): (usize, usize)) -> Result<Tensor> {
    let t = read_image(path)?;
    let (h, w) = (t.shape[2], t.shape[3]);
    if (w, h) != (width, height) {
        return Err(err(
            path,
            format!("is {w}×{h}; the request's size is {width}×{height}"),
        ));
    }
    Ok(t)
}

/// Encodes a `[1,3,H,W]` image in [0,1] as an 8-bit RGB PNG.
pub fn encode_png(image: &Tensor) -> Result<Vec<u8>> {
    let [_, c, h, w] = image.shape[..] else {
        return Err(Error::InvalidRequest(format!(
            "image tensor has shape {:?}",
            image.shape
        )));
    };
    assert_eq!(c, 3, "encode_png: 3 channels");
    let mut px = vec![0u8; h * w * 3];
    for y in 0..h {
        for x in 0..w {
            for ch in 0..3 {
                let v = image.data[ch * h * w + y * w + x].clamp(0.0, 1.0);
                px[(y * w + x) * 3 + ch] = (v * 255.0).round() as u8;
            }
        }
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w as u32, h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        // fdeflate's fast mode: a 1024² image in tens of ms instead of ~190 (balanced), for a
        // file a few percent larger; the bytes depend only on the pixels (same image, same file)
        enc.set_compression(png::Compression::Fast);
        let mut wr = enc
            .write_header()
            .map_err(|e| Error::InvalidRequest(format!("PNG encoder: {e}")))?;
        wr.write_image_data(&px)
            .map_err(|e| Error::InvalidRequest(format!("PNG encoder: {e}")))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_round_trip_is_exact_on_8_bit_values() {
        let (h, w) = (5, 7);
        let data: Vec<f32> = (0..3 * h * w).map(|i| ((i * 37) % 256) as f32 / 255.0).collect();
        let t = Tensor::new(vec![1, 3, h, w], data);
        let bytes = encode_png(&t).unwrap();
        let back = decode_png(&bytes, Path::new("mem")).unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let e = decode_png(b"not a png at all", Path::new("x.png")).unwrap_err();
        assert!(e.to_string().contains("not a readable PNG"), "{e}");
        let e = decode_image(b"not an image at all", Path::new("x")).unwrap_err();
        assert!(e.to_string().contains("not a PNG, JPEG or WebP"), "{e}");
        // a JPEG signature with nothing behind it
        let e = decode_image(b"\xff\xd8\xff\xe0 truncated", Path::new("x")).unwrap_err();
        assert!(e.to_string().contains("not a readable JPEG"), "{e}");
    }

    #[test]
    fn jpeg_and_webp_decode_to_the_same_layout_as_png() {
        use image::{ImageEncoder, RgbImage};
        let img = RgbImage::from_fn(12, 6, |x, _| {
            if x < 6 {
                image::Rgb([250, 10, 10])
            } else {
                image::Rgb([10, 10, 250])
            }
        });
        let mut webp = Vec::new();
        image::codecs::webp::WebPEncoder::new_lossless(&mut webp)
            .write_image(img.as_raw(), 12, 6, image::ExtendedColorType::Rgb8)
            .unwrap();
        let t = decode_image(&webp, Path::new("w.webp")).unwrap();
        assert_eq!(t.shape, [1, 3, 6, 12]);
        // lossless: exact; red on the left, blue on the right
        assert_eq!(t.data[0], 250.0 / 255.0);
        assert_eq!(t.data[2 * 72 + 11], 250.0 / 255.0);
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95)
            .write_image(img.as_raw(), 12, 6, image::ExtendedColorType::Rgb8)
            .unwrap();
        let t = decode_image(&jpeg, Path::new("j.jpg")).unwrap();
        assert_eq!(t.shape, [1, 3, 6, 12]);
        assert!(
            t.data[0] > 0.8 && t.data[2 * 72 + 11] > 0.8,
            "lossy, but red | blue"
        );
    }
}

#[cfg(test)]
mod encode_timing {
    /// Not a test of speed: prints what a 1024² encode costs (`--ignored --nocapture`).
    #[test]
    #[ignore]
    fn time_png_encode_1024() {
        use crate::tensor::Tensor;
        let (h, w) = (1024, 1024);
        let mut s = 1u64;
        let data: Vec<f32> = (0..3 * h * w)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let smooth = ((i % w) as f32 / w as f32 + (i / w % h) as f32 / h as f32) / 2.0;
                (smooth + ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2).clamp(0.0, 1.0)
            })
            .collect();
        let t = Tensor::new(vec![1, 3, h, w], data);
        for _ in 0..2 {
            let t0 = std::time::Instant::now();
            let png = super::encode_png(&t).unwrap();
            println!(
                "encode_png 1024²: {:.1} ms, {} bytes",
                t0.elapsed().as_secs_f64() * 1e3,
                png.len()
            );
        }
    }
}
