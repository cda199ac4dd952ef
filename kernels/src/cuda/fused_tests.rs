//! The fused fp16 kernels (fused.rs) against their ONNX Runtime twins computed here (`#[ignore]`d:
//! they need a GPU, `tools/device/gpu-tests.sh`).
use super::*;
use crate::testutil::{layer_norm_ref, norm_inputs, random};
use cudarc::driver::{CudaSlice, DevicePtr};

#[test]
#[ignore = "needs a GPU: tools/device/gpu-tests.sh"]
fn geglu_is_bias_split_gelu() {
    let fk = FusedKernels::new(0).expect("a GPU");
    let s = fk.ctx.default_stream();
    let stream = s.cu_stream();
    let at = |b: &CudaSlice<u16>| b.device_ptr(&s).0;
    let h16 = |x: f64| half::f16::from_f64(x);
    let f = |b: u16| half::f16::from_bits(b).to_f64();
    // SDXL's two feed-forward widths (h = 5120 and 2560) over an odd row count
    for (rows, h) in [(37usize, 5120usize), (19, 2560)] {
        let xs: Vec<u16> = random(rows * 2 * h, 41)
            .iter()
            .map(|v| h16(*v as f64 * 4.0).to_bits())
            .collect();
        let bs: Vec<u16> = random(2 * h, 42)
            .iter()
            .map(|v| h16(*v as f64).to_bits())
            .collect();
        // BiasSplitGelu's formula, in f32 as it computes it, erf correctly rounded; and the
        // tolerance of each value: one fp16 step of the result, plus what an erf off by a few f32
        // ulps moves it by (where 1 + erf cancels, for negative x, that is many fp16 steps of a
        // tiny result: erff's own error, the same in ONNX Runtime's kernel)
        let mut want = vec![(0f64, 0f64); rows * h];
        for r in 0..rows {
            for c in 0..h {
                let l = h16(f(xs[r * 2 * h + c]) + f(bs[c])).to_f64() as f32;
                let x = h16(f(xs[r * 2 * h + h + c]) + f(bs[h + c])).to_f64() as f32;
                let erf = libm::erf((x / std::f32::consts::SQRT_2) as f64) as f32;
                let y = half::f16::from_f32(l * (x * 0.5 * (erf + 1.0))).to_f64();
                let tol = y.abs().max(6.1e-5) * (2f64).powi(-10) + 1e-6 * (l as f64 * x as f64).abs();
                want[r * h + c] = (y, tol);
            }
        }
        let (dx, db) = (s.clone_htod(&xs).unwrap(), s.clone_htod(&bs).unwrap());
        let dy = s.alloc_zeros::<u16>(rows * h).unwrap();
        unsafe { fk.geglu(stream, at(&dx), at(&db), rows, h, at(&dy)) }.unwrap();
        s.synchronize().unwrap();
        let got = s.clone_dtoh(&dy).unwrap();
        let mut differ = 0;
        for (i, (&g, &(y, tol))) in got.iter().zip(&want).enumerate() {
            if f(g) != y {
                differ += 1;
                assert!(
                    (f(g) - y).abs() <= tol,
                    "value {i}: {} against {y} (± {tol})",
                    f(g)
                );
            }
        }
        eprintln!(
            "GEGLU {rows}×{h}: {differ} of {} values differ from the f32 formula, each within its tolerance",
            got.len()
        );
    }
    let d = s.alloc_zeros::<u16>(64).unwrap();
    let bad = unsafe { fk.geglu(stream, at(&d), at(&d), 2, 12, at(&d)) };
    assert!(bad.is_err(), "a width not a multiple of 8 is refused");
}

#[test]
#[ignore = "needs a GPU: tools/device/gpu-tests.sh"]
fn layer_norm_is_the_bias_add_then_layer_norm() {
    let fk = FusedKernels::new(0).expect("a GPU");
    let s = fk.ctx.default_stream();
    let stream = s.cu_stream();
    let at = |b: &CudaSlice<u16>| b.device_ptr(&s).0;
    let f = |b: u16| half::f16::from_bits(b).to_f64();
    // SDXL's two widths (and one not a multiple of 32 threads), with and without skip and bias
    for (rows, w, skip, bias) in [
        (33usize, 1280usize, false, true),
        (17, 640, true, true),
        (9, 200, false, false),
    ] {
        let (x, sk, bi, ga, be) = norm_inputs(rows, w, 51);
        let (sum, want) = layer_norm_ref(&x, skip.then_some(&sk[..]), bias.then_some(&bi[..]), &ga, &be, w);
        let up = |v: &[u16]| s.clone_htod(v).unwrap();
        let (dx, dsk, dbi, dga, dbe) = (up(&x), up(&sk), up(&bi), up(&ga), up(&be));
        let (dy, dsum) = (
            s.alloc_zeros::<u16>(rows * w).unwrap(),
            s.alloc_zeros::<u16>(rows * w).unwrap(),
        );
        let args = NormArgs {
            x: at(&dx),
            skip: if skip { at(&dsk) } else { 0 },
            bias: if bias { at(&dbi) } else { 0 },
            gamma: at(&dga),
            beta: at(&dbe),
            rows,
            width: w,
            epsilon: 1e-5,
            y: at(&dy),
            sum: at(&dsum),
        };
        unsafe { fk.layer_norm(stream, &args) }.unwrap();
        s.synchronize().unwrap();
        assert_eq!(s.clone_dtoh(&dsum).unwrap(), sum, "the sum output ({w} wide)");
        let got = s.clone_dtoh(&dy).unwrap();
        // f32 statistics against f64 move an fp16 output by an ulp now and then
        let differ = got
            .iter()
            .zip(&want)
            .filter(|(a, b)| a != b)
            .inspect(|(a, b)| {
                let (ga, wb) = (f(**a), f(**b));
                // one fp16 step at the value's magnitude
                let ulp = wb.abs().max(6.1e-5) * (2f64).powi(-10);
                assert!((ga - wb).abs() <= 1.01 * ulp, "{ga} vs {wb}");
            })
            .count();
        eprintln!(
            "layer norm {rows}×{w}: {differ} of {} values an ulp off",
            got.len()
        );
        assert!(differ * 100 <= got.len(), "{differ} values differ");
    }
    let bad = NormArgs {
        width: 12,
        rows: 1,
        ..Default::default()
    };
    assert!(
        unsafe { fk.layer_norm(stream, &bad) }.is_err(),
        "a width not a multiple of 8 is refused"
    );
}

#[test]
fn the_fused_and_fp8_kernels_compile_where_nvrtc_is_present() {
    // SAFETY: only probes whether the shared library can be opened.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        eprintln!("skipped: libnvrtc is not loadable here");
        return;
    }
    // half.cu in front of each: the default target (FusedKernels::new), compute_89 (Fp8Kernels::new)
    let fused = cudarc::nvrtc::compile_ptx(SOURCE).unwrap_or_else(|e| panic!("NVRTC, fused.cu: {e}"));
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some("compute_89"),
        ..Default::default()
    };
    let fp8 = cudarc::nvrtc::compile_ptx_with_opts(super::super::fp8::SOURCE, opts)
        .unwrap_or_else(|e| panic!("NVRTC, fp8.cu: {e}"));
    let (fused, fp8) = (fused.to_src(), fp8.to_src());
    for name in ["geglu_f16", "layer_norm_f16"] {
        assert!(fused.contains(&format!(".entry {name}")), "{name}");
    }
    for name in [
        "fp8_amax_f16",
        "fp8_quantize_w",
        "fp8_quantize_x",
        "fp8_geglu",
        "fp8_layer_norm",
    ] {
        assert!(fp8.contains(&format!(".entry {name}")), "{name}");
    }
}
