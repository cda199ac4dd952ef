//! The CUDA kernels against their CPU twins and f64 references, on fresh random inputs (relative
//! error). Without a GPU only the first test runs (no CUDA is an error, not a panic); the
//! `#[ignore]`d ones need one: `tools/device/gpu-tests.sh`.

use super::*;
use crate::lora::{merge_into, Factor};
use crate::{guidance, rel_err, residual, testutil::random};
use cudarc::driver::DevicePtr;

#[test]
fn without_cuda_new_is_an_error_not_a_panic() {
    match GpuKernels::new(0) {
        Ok(_) => assert!(cuda_available()),
        Err(e) => {
            assert!(!cuda_available(), "{e}");
            assert!(e.to_string().contains("no CUDA"), "{e}");
        }
    }
}

fn gpu() -> GpuKernels {
    GpuKernels::new(0).expect("this test needs a GPU (tools/device/gpu-tests.sh)")
}

#[test]
#[ignore = "needs a GPU: tools/device/gpu-tests.sh"]
fn combine_axpy_scale_match_the_cpu() {
    let k = gpu();
    let s = &k.stream;
    let n = 4 * 128 * 128;
    let pred = random(2 * n, 1);
    let mut want = vec![0f32; n];
    guidance::combine(&pred, 7.5, &mut want);
    let d_pred = s.clone_htod(&pred).unwrap();
    let mut d_out = s.alloc_zeros::<f32>(n).unwrap();
    k.combine(&d_pred, 7.5, &mut d_out).unwrap();
    assert!(rel_err(&s.clone_dtoh(&d_out).unwrap(), &want) < 1e-6);

    let (mut dst, src) = (random(n, 2), random(n, 3));
    let mut d_dst = s.clone_htod(&dst).unwrap();
    let d_src = s.clone_htod(&src).unwrap();
    k.axpy(&mut d_dst, &d_src, 0.8).unwrap();
    residual::axpy(&mut dst, &src, 0.8);
    assert!(rel_err(&s.clone_dtoh(&d_dst).unwrap(), &dst) < 1e-6);

    let mut d_two = s.alloc_zeros::<f32>(2 * n).unwrap();
    k.scale(&d_src, 0.25, &mut d_two, 2).unwrap();
    let want: Vec<f32> = src.iter().chain(&src).map(|v| v * 0.25).collect();
    assert!(rel_err(&s.clone_dtoh(&d_two).unwrap(), &want) < 1e-7);
}

#[test]
#[ignore = "needs a GPU: tools/device/gpu-tests.sh"]
fn fp16_conversions_match_the_half_crate() {
    let k = gpu();
    let s = &k.stream;
    let n = 3 * 64 * 64 + 7;
    let x: Vec<f32> = random(n, 11).iter().map(|v| v * 300.0).collect();
    let d_x = s.clone_htod(&x).unwrap();
    let d_h = s.alloc_zeros::<u16>(n).unwrap();
    let d_back = s.alloc_zeros::<f32>(n).unwrap();
    let (px, ph, pb) = (d_x.device_ptr(s).0, d_h.device_ptr(s).0, d_back.device_ptr(s).0);
    unsafe {
        k.to_f16_raw(px, ph, n).unwrap();
        k.from_f16_raw(ph, pb, n).unwrap();
    }
    let want: Vec<u16> = x.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
    assert_eq!(s.clone_dtoh(&d_h).unwrap(), want);
    let back: Vec<f32> = want.iter().map(|&b| half::f16::from_bits(b).to_f32()).collect();
    assert_eq!(s.clone_dtoh(&d_back).unwrap(), back);
}

#[test]
#[ignore = "needs a GPU: tools/device/gpu-tests.sh"]
fn euler_step_matches_the_f64_reference() {
    let k = gpu();
    let s = &k.stream;
    let n = 4 * 64 * 64;
    let (x, eps) = (random(n, 4), random(n, 5));
    let (sigma, next) = (14.6f32, 9.7f32);
    let mut d_x = s.clone_htod(&x).unwrap();
    k.euler(&mut d_x, &s.clone_htod(&eps).unwrap(), sigma, next)
        .unwrap();
    let want: Vec<f32> = x
        .iter()
        .zip(&eps)
        .map(|(&x, &e)| (x as f64 + e as f64 * (next as f64 - sigma as f64)) as f32)
        .collect();
    assert!(rel_err(&s.clone_dtoh(&d_x).unwrap(), &want) < 1e-6);
}

#[test]
#[ignore = "needs a GPU: tools/device/gpu-tests.sh"]
fn one_launch_merges_many_layers_like_the_cpu() {
    let k = gpu();
    let s = &k.stream;
    // layers of different shapes, one with two LoRAs, one with none
    let shapes = [
        (64usize, 48usize, vec![(4usize, 0.8f32), (8, -0.5)]),
        (33, 70, vec![(4, 1.25)]),
        (17, 9, vec![]),
    ];
    let mut host = Vec::new();
    for (i, (rows, cols, fs)) in shapes.iter().enumerate() {
        let base = random(rows * cols, 10 + i as u64);
        let factors: Vec<(Vec<f32>, Vec<f32>, usize, f32)> = fs
            .iter()
            .enumerate()
            .map(|(j, &(r, c))| {
                (
                    random(rows * r, 100 + j as u64),
                    random(r * cols, 200 + j as u64),
                    r,
                    c,
                )
            })
            .collect();
        host.push((base, factors));
    }
    type DevLayer = (
        CudaSlice<f32>,
        CudaSlice<f32>,
        Vec<(CudaSlice<f32>, CudaSlice<f32>)>,
    );
    let dev: Vec<DevLayer> = host
        .iter()
        .map(|(base, fs)| {
            let d_base = s.clone_htod(base).unwrap();
            let d_out = s.alloc_zeros::<f32>(base.len()).unwrap();
            let d_fs = fs
                .iter()
                .map(|(b, a, _, _)| (s.clone_htod(b).unwrap(), s.clone_htod(a).unwrap()))
                .collect();
            (d_base, d_out, d_fs)
        })
        .collect();
    let layers: Vec<GpuMergeLayer<'_>> = shapes
        .iter()
        .zip(&dev)
        .zip(&host)
        .map(
            |(((rows, cols, _), (d_base, d_out, d_fs)), (_, fs))| GpuMergeLayer {
                base: d_base,
                out: d_out,
                rows: *rows,
                cols: *cols,
                factors: d_fs
                    .iter()
                    .zip(fs)
                    .map(|((b, a), (_, _, r, c))| GpuFactor {
                        b,
                        a,
                        rank: *r,
                        coeff: *c,
                        packed: None,
                    })
                    .collect(),
            },
        )
        .collect();
    k.lora_merge(&layers).unwrap();
    k.synchronize().unwrap();
    for (((rows, cols, _), (_, d_out, _)), (base, fs)) in shapes.iter().zip(&dev).zip(&host) {
        let factors: Vec<Factor<'_>> = fs
            .iter()
            .map(|(b, a, r, c)| Factor {
                b,
                a,
                rank: *r,
                coeff: *c,
            })
            .collect();
        let mut want = vec![0f32; base.len()];
        merge_into(base, *rows, *cols, &factors, &mut want);
        let err = rel_err(&s.clone_dtoh(d_out).unwrap(), &want);
        assert!(err < 1e-6, "{rows}×{cols}: relative error {err:.2e}");
    }
}

/// The CUDA source compiles (NVRTC only, no driver or device needed): runs wherever libnvrtc
/// loads, and says so and passes where it does not (CI has no CUDA).
#[test]
fn the_kernels_compile_where_nvrtc_is_present() {
    // SAFETY: only probes whether the shared library can be opened.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        eprintln!("skipped: libnvrtc is not loadable here");
        return;
    }
    // the default target (no tensor cores: the mma kernels trap) and compute_80 (GpuKernels::new
    // on sm_80 and newer)
    let _ = cudarc::nvrtc::compile_ptx(SOURCE).unwrap_or_else(|e| panic!("NVRTC: {e}"));
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some("compute_80"),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(SOURCE, opts).unwrap_or_else(|e| panic!("NVRTC: {e}"));
    let text = ptx.to_src();
    for name in [
        "lora_merge_naive_f32",
        "lora_merge_naive_f16",
        "lora_merge_tiled_f32",
        "lora_merge_tiled_f16",
        "lora_merge_mma_f32",
        "lora_merge_mma_f16",
        "lora_merge_h16_f32",
        "lora_merge_h16_f16",
        "pack_factors_f16",
        "lora_merge_packed_f32",
        "lora_merge_packed_f16",
    ] {
        assert!(text.contains(name), "{name} missing from the PTX");
    }
    for mma in ["mma.sync.aligned.m16n8k8", "mma.sync.aligned.m16n8k16"] {
        assert!(text.contains(mma), "no {mma}");
    }
    if let Some(path) = std::env::var_os("KATZ_DUMP_PTX") {
        std::fs::write(path, text).unwrap();
    }
}

/// One layer of a merge test: shape and `(rank, coeff)` of each factor.
struct Case {
    rows: usize,
    cols: usize,
    factors: Vec<(usize, f32)>,
}

/// Layers of odd sizes (partial tiles, columns not a multiple of 4, ranks not a multiple of the
/// chunk) and one of SDXL's shapes, two factors each.
fn merge_cases() -> Vec<Case> {
    let case = |rows, cols, f: [(usize, f32); 2]| Case {
        rows,
        cols,
        factors: f.to_vec(),
    };
    vec![
        case(300, 260, [(16, 0.8), (7, -0.5)]),
        case(129, 7, [(4, 1.25), (33, 0.3)]),
        case(5, 1000, [(3, -1.0), (64, 0.125)]),
        case(70, 333, [(1, 2.0), (17, 0.7)]),
        case(17, 9, [(2, 0.5), (5, -0.25)]),
        case(640, 2048, [(64, 0.9), (128, -0.6)]),
    ]
}

/// Host data of one layer: base, and (B, A) per factor, fresh random values.
type HostLayer = (Vec<f32>, Vec<(Vec<f32>, Vec<f32>)>);

fn host_layers(cases: &[Case], seed: u64) -> Vec<HostLayer> {
    cases
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let s = seed + 100 * i as u64;
            let base = random(c.rows * c.cols, s);
            let fs = c
                .factors
                .iter()
                .enumerate()
                .map(|(j, &(r, _))| {
                    let s = s + 10 * (j as u64 + 1);
                    (random(c.rows * r, s), random(r * c.cols, s + 1))
                })
                .collect();
            (base, fs)
        })
        .collect()
}

/// `base + Σ coeff·B·A` in f64, and beside it each element's magnitude `|base| + Σ |coeff·b·a|`
/// (what the f32 rounding errors of a GPU sum scale with).
fn reference(c: &Case, base: &[f32], fs: &[(Vec<f32>, Vec<f32>)]) -> (Vec<f64>, Vec<f64>) {
    let mut out: Vec<f64> = base.iter().map(|&x| x as f64).collect();
    let mut mag: Vec<f64> = base.iter().map(|&x| (x as f64).abs()).collect();
    for ((b, a), &(rank, coeff)) in fs.iter().zip(&c.factors) {
        for r in 0..c.rows {
            for k in 0..rank {
                let bk = coeff as f64 * b[r * rank + k] as f64;
                let a_row = &a[k * c.cols..(k + 1) * c.cols];
                let row = r * c.cols..(r + 1) * c.cols;
                for ((o, m), &x) in out[row.clone()].iter_mut().zip(&mut mag[row]).zip(a_row) {
                    *o += bk * x as f64;
                    *m += (bk * x as f64).abs();
                }
            }
        }
    }
    (out, mag)
}

/// Uploads the cases with the weights as `T` (`to_t` converts), merges with `kernel`, and
/// returns each layer's output converted back to f32.
fn gpu_merge<T: MergeElem + Copy>(
    k: &GpuKernels,
    cases: &[Case],
    host: &[HostLayer],
    kernel: MergeKernel,
    to_t: impl Fn(f32) -> T,
    from_t: impl Fn(T) -> f32,
) -> Vec<Vec<f32>> {
    gpu_merge_with(k, cases, host, kernel, false, to_t, from_t)
}

/// [`gpu_merge`], the factors packed first (`pack_factors_f16`) where `prepack` is set.
fn gpu_merge_with<T: MergeElem + Copy>(
    k: &GpuKernels,
    cases: &[Case],
    host: &[HostLayer],
    kernel: MergeKernel,
    prepack: bool,
    to_t: impl Fn(f32) -> T,
    from_t: impl Fn(T) -> f32,
) -> Vec<Vec<f32>> {
    let s = &k.stream;
    type Dev<T> = (CudaSlice<T>, CudaSlice<T>, Vec<(CudaSlice<f32>, CudaSlice<f32>)>);
    let dev: Vec<Dev<T>> = host
        .iter()
        .map(|(base, fs)| {
            let b: Vec<T> = base.iter().map(|&x| to_t(x)).collect();
            (
                s.clone_htod(&b).unwrap(),
                s.alloc_zeros::<T>(base.len()).unwrap(),
                fs.iter()
                    .map(|(b, a)| (s.clone_htod(b).unwrap(), s.clone_htod(a).unwrap()))
                    .collect(),
            )
        })
        .collect();
    let packed: Vec<Vec<PackedFactor>> = cases
        .iter()
        .zip(&dev)
        .map(|(c, (_, _, fs))| {
            if !prepack {
                return Vec::new();
            }
            let items: Vec<_> = fs
                .iter()
                .zip(&c.factors)
                .map(|((b, a), &(rank, _))| (b, a, c.rows, c.cols, rank))
                .collect();
            k.pack_factors_f16(&items).unwrap()
        })
        .collect();
    let layers: Vec<GpuMergeLayer<'_, T>> = cases
        .iter()
        .zip(&dev)
        .zip(&packed)
        .map(|((c, (base, out, fs)), p)| GpuMergeLayer {
            base,
            out,
            rows: c.rows,
            cols: c.cols,
            factors: fs
                .iter()
                .zip(&c.factors)
                .enumerate()
                .map(|(j, ((b, a), &(rank, coeff)))| GpuFactor {
                    b,
                    a,
                    rank,
                    coeff,
                    packed: p.get(j),
                })
                .collect(),
        })
        .collect();
    k.lora_merge_with(&layers, kernel).unwrap();
    k.synchronize().unwrap();
    dev.iter()
        .map(|(_, out, _)| s.clone_dtoh(out).unwrap().into_iter().map(&from_t).collect())
        .collect()
}

fn rel_err64(a: &[f32], reference: &[f64]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &r) in a.iter().zip(reference) {
        num += (x as f64 - r).powi(2);
        den += r * r;
    }
    (num / den).sqrt()
}

#[test]
#[ignore = "needs a GPU: tools/device/gpu-tests.sh"]
fn f32_merge_kernels_match_the_f64_reference() {
    let k = gpu();
    let cases = merge_cases();
    let host = host_layers(&cases, 7);
    // 3×TF32 drops the lo·lo products: about f32 accuracy, not quite
    for (kernel, tol) in [
        (MergeKernel::Tiled, 1e-6),
        (MergeKernel::Naive, 1e-6),
        (MergeKernel::Mma, 1e-5),
    ] {
        let got = gpu_merge::<f32>(&k, &cases, &host, kernel, |x| x, |x| x);
        for ((c, (base, fs)), out) in cases.iter().zip(&host).zip(&got) {
            let (want, _) = reference(c, base, fs);
            let err = rel_err64(out, &want);
            eprintln!("{kernel} f32 {}×{}: relative error {err:.2e}", c.rows, c.cols);
            assert!(
                err < tol,
                "{kernel} f32 {}×{}: relative error {err:.2e}",
                c.rows,
                c.cols
            );
            // the merge changed W
            assert!(
                rel_err(out, base) > 1e-2,
                "{kernel} {}×{}: output is the base",
                c.rows,
                c.cols
            );
        }
    }
}

#[test]
#[ignore = "needs a GPU: tools/device/gpu-tests.sh"]
fn f16_merge_kernels_match_the_f64_reference() {
    use half::f16;
    let k = gpu();
    let cases = merge_cases();
    let mut host = host_layers(&cases, 8);
    // the reference starts from the fp16 weights the GPU sees
    for (base, _) in &mut host {
        for x in base.iter_mut() {
            *x = f16::from_f32(*x).to_f32();
        }
    }
    for kernel in [MergeKernel::Tiled, MergeKernel::Naive, MergeKernel::Mma] {
        let got = gpu_merge::<u16>(
            &k,
            &cases,
            &host,
            kernel,
            |x| f16::from_f32(x).to_bits(),
            |h| f16::from_bits(h).to_f32(),
        );
        for ((c, (base, fs)), out) in cases.iter().zip(&host).zip(&got) {
            let (want, mag) = reference(c, base, fs);
            let err = rel_err64(out, &want);
            eprintln!("{kernel} f16 {}×{}: relative error {err:.2e}", c.rows, c.cols);
            assert!(
                err < 1e-3,
                "{kernel} f16 {}×{}: relative error {err:.2e}",
                c.rows,
                c.cols
            );
            assert_within_an_fp16_step(&format!("{kernel} f16"), c, out, &want, &mag);
            assert!(
                rel_err(out, base) > 1e-2,
                "{kernel} {}×{}: output is the base",
                c.rows,
                c.cols
            );
        }
    }
}

/// Every element is the reference rounded to fp16, give or take one fp16 step, plus the f32
/// summation error (it matters where W and ΔW nearly cancel and the fp16 step is tiny).
fn assert_within_an_fp16_step(what: &str, c: &Case, out: &[f32], want: &[f64], mag: &[f64]) {
    use half::f16;
    for (i, ((&o, &w), &m)) in out.iter().zip(want).zip(mag).enumerate() {
        let rounded = f16::from_f64(w);
        let step = (f16::from_bits(rounded.to_bits() + 1).to_f64() - rounded.to_f64()).abs();
        assert!(
            (o as f64 - w).abs() <= step + 1e-5 * m,
            "{what} {}×{} element {i}: {o} vs {w} (magnitude {m})",
            c.rows,
            c.cols
        );
    }
}

/// Each layer's output within `tol` (relative) of its f64 reference; the errors are printed.
fn assert_near_reference(what: &str, cases: &[Case], host: &[HostLayer], got: &[Vec<f32>], tol: f64) {
    for ((c, (base, fs)), out) in cases.iter().zip(host).zip(got) {
        let (want, _) = reference(c, base, fs);
        let err = rel_err64(out, &want);
        eprintln!("{what} {}×{}: relative error {err:.2e}", c.rows, c.cols);
        assert!(
            err < tol,
            "{what} {}×{}: relative error {err:.2e}",
            c.rows,
            c.cols
        );
    }
}

/// The fp16 tensor-core kernels on factors that are fp16 values (as an fp16 LoRA file's are): the
/// products are exact and the sums f32, so they meet the other kernels' bounds; a zero coefficient
/// before or after another factor adds nothing. On f32 factors they round them to fp16 (stated).
#[test]
#[ignore = "needs a GPU: tools/device/gpu-tests.sh"]
fn the_fp16_tensor_core_merge_matches_the_f64_reference() {
    use half::f16;
    let k = gpu();
    let mut cases = merge_cases();
    cases.push(Case {
        rows: 200,
        cols: 130,
        factors: vec![(16, 0.0), (8, 0.7)],
    });
    cases.push(Case {
        rows: 130,
        cols: 200,
        factors: vec![(8, -0.7), (16, 0.0)],
    });
    // more tiles than two per SM (288 with the rest): the persistent kernel's blocks walk several
    // tiles each, the next one's weights and first chunk loading while one multiplies
    cases.push(Case {
        rows: 2048,
        cols: 2304,
        factors: vec![(64, 0.8), (64, -0.6)],
    });
    let h = |x: f32| f16::from_f32(x).to_f32();
    let round = |v: &[f32]| v.iter().map(|&x| h(x)).collect::<Vec<f32>>();
    let exact: Vec<HostLayer> = host_layers(&cases, 9)
        .into_iter()
        .map(|(base, fs)| (base, fs.iter().map(|(b, a)| (round(b), round(a))).collect()))
        .collect();
    // fp16 weights too: the reference starts from the weights the GPU sees
    let exact16: Vec<HostLayer> = exact.iter().map(|(base, fs)| (round(base), fs.clone())).collect();
    let host = host_layers(&cases, 10);
    // the packed kernel twice: packing in the merge, and on factors packed beforehand
    for (kernel, pre) in [
        (MergeKernel::MmaF16, false),
        (MergeKernel::MmaF16Packed, false),
        (MergeKernel::MmaF16Packed, true),
        (MergeKernel::MmaF16Persistent, false),
        (MergeKernel::MmaF16Persistent, true),
    ] {
        let tag = if pre { " (packed before)" } else { "" };
        let got = gpu_merge_with::<f32>(&k, &cases, &exact, kernel, pre, |x| x, |x| x);
        assert_near_reference(
            &format!("{kernel}{tag} f32 (fp16 factors)"),
            &cases,
            &exact,
            &got,
            1e-5,
        );
        let got = gpu_merge_with::<u16>(
            &k,
            &cases,
            &exact16,
            kernel,
            pre,
            |x| f16::from_f32(x).to_bits(),
            |b| f16::from_bits(b).to_f32(),
        );
        for ((c, (base, fs)), out) in cases.iter().zip(&exact16).zip(&got) {
            let (want, mag) = reference(c, base, fs);
            assert_within_an_fp16_step(&format!("{kernel}{tag} f16"), c, out, &want, &mag);
            if c.factors.iter().any(|f| f.1 != 0.0) {
                assert!(
                    rel_err(out, base) > 1e-2,
                    "{kernel} {}×{}: output is the base",
                    c.rows,
                    c.cols
                );
            }
        }
        // f32 factors: rounded to fp16 on the way in, the result within fp16's precision of ΔW
        let got = gpu_merge_with::<f32>(&k, &cases, &host, kernel, pre, |x| x, |x| x);
        assert_near_reference(
            &format!("{kernel}{tag} f32 (f32 factors)"),
            &cases,
            &host,
            &got,
            1e-3,
        );
    }
}
