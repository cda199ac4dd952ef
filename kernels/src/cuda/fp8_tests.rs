//! The fp8 kernels (fp8.rs) against known encodings and an f64 GEMM (`#[ignore]`d: they need a GPU of
//! compute capability 8.9+, `tools/device/gpu-tests.sh`).
use super::*;
use crate::{
    rel_err,
    testutil::{layer_norm_ref, norm_inputs, random},
};
use cudarc::driver::{CudaStream, DevicePtr};

/// The fp8 kernels of GPU 0 and its default stream.
fn gpu() -> (Fp8Kernels, Arc<CudaStream>) {
    let fk = Fp8Kernels::new(0).expect("an fp8 GPU");
    let s = fk.ctx.default_stream();
    (fk, s)
}

/// The device address of `b`.
fn at<T>(s: &Arc<CudaStream>, b: &CudaSlice<T>) -> u64 {
    b.device_ptr(s).0
}

#[test]
#[ignore = "needs a GPU of compute capability 8.9+: tools/device/gpu-tests.sh"]
fn fp8_quantize_and_gemm_match_f64() {
    let (fk, s) = gpu();
    let stream = s.cu_stream();
    let ptr = |b: &CudaSlice<u16>| at(&s, b);
    let ptr8 = |b: &CudaSlice<u8>| at(&s, b);
    let ptrf = |b: &CudaSlice<f32>| at(&s, b);
    let h = |v: &[f32]| -> Vec<u16> { v.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect() };

    // known encodings (OCP e4m3fn): 1 → 0x38, 0.5 → 0x30, −2 → 0xC0, 448 → 0x7E, 500 saturates
    // to 448, 0 → 0x00, 1.0625 rounds to even (1.0) → 0x38
    let known = [1.0f32, 0.5, -2.0, 448.0, 500.0, 0.0, 1.0625, -448.0];
    let x = s.clone_htod(&h(&known)).unwrap();
    let x8 = s.alloc_zeros::<u8>(8).unwrap();
    unsafe { fk.quantize_x(stream, ptr(&x), 8, 1.0, ptr8(&x8)) }.unwrap();
    s.synchronize().unwrap();
    assert_eq!(
        s.clone_dtoh(&x8).unwrap(),
        vec![0x38, 0x30, 0xC0, 0x7E, 0x7E, 0x00, 0x38, 0xFE]
    );

    // Y = X·Wᵀ at SDXL's shapes, against f64 on the fp16 inputs
    let (m, n, k) = (256usize, 640usize, 1280usize);
    let xs: Vec<f32> = random(m * k, 21).iter().map(|v| v * 3.0).collect();
    let ws: Vec<f32> = random(n * k, 22).iter().map(|v| v * 0.05).collect();
    let (xh, wh) = (h(&xs), h(&ws));
    let f = |b: u16| half::f16::from_bits(b).to_f64();
    let mut want = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let acc: f64 = (0..k).map(|q| f(xh[i * k + q]) * f(wh[j * k + q])).sum();
            want[i * n + j] = acc as f32;
        }
    }
    let amax_x = xh.iter().map(|&b| f(b).abs()).fold(0.0, f64::max) as f32;
    let x_scale = amax_x / E4M3_MAX;
    let (dx, dw) = (s.clone_htod(&xh).unwrap(), s.clone_htod(&wh).unwrap());
    let (dx8, dw8) = (
        s.alloc_zeros::<u8>(m * k).unwrap(),
        s.alloc_zeros::<u8>(n * k).unwrap(),
    );
    let dxs = s.clone_htod(&[x_scale]).unwrap();
    let (dws, damax) = (s.alloc_zeros::<f32>(1).unwrap(), s.alloc_zeros::<f32>(1).unwrap());
    let dy = s.alloc_zeros::<u16>(m * n).unwrap();
    let gemm = Fp8Gemm::plan(&fk, m, n, k).unwrap();
    unsafe {
        fk.quantize_weight(stream, ptr(&dw), n * k, ptrf(&damax), ptr8(&dw8), ptrf(&dws))
            .unwrap();
        fk.quantize_x(stream, ptr(&dx), m * k, x_scale, ptr8(&dx8))
            .unwrap();
        gemm.run(
            &fk,
            stream,
            ptr8(&dx8),
            ptr8(&dw8),
            ptr(&dy),
            ptrf(&dxs),
            ptrf(&dws),
        )
        .unwrap();
    }
    s.synchronize().unwrap();
    let w_scale = s.clone_dtoh(&dws).unwrap()[0];
    let amax_w = wh.iter().map(|&b| f(b).abs()).fold(0.0, f64::max) as f32;
    assert!(
        (w_scale - amax_w / 448.0).abs() <= 1e-6 * amax_w,
        "weight scale {w_scale}"
    );
    let got: Vec<f32> = s.clone_dtoh(&dy).unwrap().iter().map(|&b| f(b) as f32).collect();
    let err = rel_err(&got, &want);
    eprintln!("fp8 GEMM {m}×{k}·{n}×{k}ᵀ: relative error {err:.4} against f64");
    assert!(err < 0.06 && err > 1e-4, "fp8 GEMM relative error {err}");
}

#[test]
#[ignore = "needs a GPU of compute capability 8.9+: tools/device/gpu-tests.sh"]
fn fp8_layer_norm_is_skip_layer_norm_then_quantize() {
    let (fk, s) = gpu();
    let stream = s.cu_stream();
    let ptr = |b: &CudaSlice<u16>| at(&s, b);
    let ptr8 = |b: &CudaSlice<u8>| at(&s, b);
    let f = |b: u16| half::f16::from_bits(b).to_f64();
    // SDXL's two widths (and one not a multiple of 32 threads), with and without skip and bias
    for (rows, w, skip, bias) in [
        (33usize, 1280usize, true, true),
        (17, 640, true, false),
        (9, 200, false, false),
    ] {
        let (x, sk, bi, ga, be) = norm_inputs(rows, w, 41);
        let (sum, normed) = layer_norm_ref(&x, skip.then_some(&sk[..]), bias.then_some(&bi[..]), &ga, &be, w);
        let amax = normed.iter().map(|&b| f(b).abs()).fold(0.0, f64::max) as f32;
        let scale = amax / E4M3_MAX;
        let up = |v: &[u16]| s.clone_htod(v).unwrap();
        let (dx, dsk, dbi, dga, dbe, dnormed) = (up(&x), up(&sk), up(&bi), up(&ga), up(&be), up(&normed));
        let dsum = s.alloc_zeros::<u16>(rows * w).unwrap();
        let (got8, want8) = (
            s.alloc_zeros::<u8>(rows * w).unwrap(),
            s.alloc_zeros::<u8>(rows * w).unwrap(),
        );
        let args = LayerNormArgs {
            x: ptr(&dx),
            skip: if skip { ptr(&dsk) } else { 0 },
            bias: if bias { ptr(&dbi) } else { 0 },
            gamma: ptr(&dga),
            beta: ptr(&dbe),
            rows,
            width: w,
            epsilon: 1e-5,
            scale,
            x8: ptr8(&got8),
            sum: ptr(&dsum),
        };
        unsafe {
            fk.layer_norm(stream, &args).unwrap();
            fk.quantize_x(stream, ptr(&dnormed), rows * w, scale, ptr8(&want8))
                .unwrap();
        }
        s.synchronize().unwrap();
        assert_eq!(s.clone_dtoh(&dsum).unwrap(), sum, "the sum output ({w} wide)");
        let (got, want) = (s.clone_dtoh(&got8).unwrap(), s.clone_dtoh(&want8).unwrap());
        // f32 statistics against f64 move an fp16 output by an ulp now and then
        assert_codes_close(&got, &want, 200, &format!("fp8 layer norm {rows}×{w}"));
    }
    let bad = LayerNormArgs {
        width: 12,
        rows: 1,
        ..Default::default()
    };
    assert!(
        unsafe { fk.layer_norm(stream, &bad) }.is_err(),
        "a width not a multiple of 8 is refused"
    );
}

/// `got` against the two-step result `want`: at most one code in `per` differs, and each that
/// does is one e4m3 step away (±0 counting as one value).
fn assert_codes_close(got: &[u8], want: &[u8], per: usize, what: &str) {
    let near = |a: u8, b: u8| {
        let (ma, mb) = (a & 0x7f, b & 0x7f);
        ma.abs_diff(mb) <= 1 && ((a ^ b) & 0x80 == 0 || ma + mb <= 1)
    };
    let differ: Vec<(u8, u8)> = got
        .iter()
        .zip(want)
        .filter(|(a, b)| a != b)
        .map(|(a, b)| (*a, *b))
        .collect();
    eprintln!(
        "{what}: {} of {} codes differ from the two-step result",
        differ.len(),
        got.len()
    );
    assert!(
        differ.len() * per <= got.len(),
        "{what}: {} codes differ",
        differ.len()
    );
    assert!(differ.iter().all(|&(a, b)| near(a, b)), "{what}: {differ:?}");
}

/// erf to about 1.5e-7 (Abramowitz & Stegun 7.1.26): far below an fp16 step
fn erf(x: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let p = t
        * (0.254_829_592
            + t * (-0.284_496_736 + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    (1.0 - p * (-x * x).exp()).copysign(x)
}

#[test]
#[ignore = "needs a GPU of compute capability 8.9+: tools/device/gpu-tests.sh"]
fn fp8_geglu_is_bias_split_gelu_then_quantize() {
    let (fk, s) = gpu();
    let stream = s.cu_stream();
    let ptr = |b: &CudaSlice<u16>| at(&s, b);
    let ptr8 = |b: &CudaSlice<u8>| at(&s, b);
    let h16 = |x: f64| half::f16::from_f64(x);
    // SDXL's widest feed-forward (h = 5120) over a few rows, and an odd row count
    let (rows, h) = (37usize, 5120usize);
    let xs: Vec<u16> = random(rows * 2 * h, 31)
        .iter()
        .map(|v| h16(*v as f64 * 4.0).to_bits())
        .collect();
    let bs: Vec<u16> = random(2 * h, 32)
        .iter()
        .map(|v| h16(*v as f64).to_bits())
        .collect();
    let f = |b: u16| half::f16::from_bits(b).to_f64();
    // BiasSplitGelu as ONNX Runtime computes it, in f64 where it computes in f32
    let mut want = vec![0u16; rows * h];
    for r in 0..rows {
        for c in 0..h {
            let l = h16(f(xs[r * 2 * h + c]) + f(bs[c])).to_f64();
            let x = h16(f(xs[r * 2 * h + h + c]) + f(bs[h + c])).to_f64();
            let gelu = x * 0.5 * (erf(x / std::f64::consts::SQRT_2) + 1.0);
            want[r * h + c] = h16(l * gelu).to_bits();
        }
    }
    let amax = want.iter().map(|&b| f(b).abs()).fold(0.0, f64::max) as f32;
    let scale = amax / E4M3_MAX;
    let (dx, db, dwant) = (
        s.clone_htod(&xs).unwrap(),
        s.clone_htod(&bs).unwrap(),
        s.clone_htod(&want).unwrap(),
    );
    let (got8, want8) = (
        s.alloc_zeros::<u8>(rows * h).unwrap(),
        s.alloc_zeros::<u8>(rows * h).unwrap(),
    );
    unsafe {
        fk.geglu(stream, ptr(&dx), ptr(&db), rows, h, scale, ptr8(&got8))
            .unwrap();
        fk.quantize_x(stream, ptr(&dwant), rows * h, scale, ptr8(&want8))
            .unwrap();
    }
    s.synchronize().unwrap();
    let (got, want) = (s.clone_dtoh(&got8).unwrap(), s.clone_dtoh(&want8).unwrap());
    // erff on the GPU and erf here may differ in the last bit of the fp16 product, which
    // moves an fp8 code by at most one
    assert_codes_close(&got, &want, 1000, &format!("fp8 GEGLU {rows}×{h}"));
    let bad = unsafe { fk.geglu(stream, ptr(&dx), ptr(&db), rows, 12, scale, ptr8(&got8)) };
    assert!(bad.is_err(), "a width not a multiple of 8 is refused");
}
