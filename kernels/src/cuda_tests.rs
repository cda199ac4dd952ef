use super::*;
use crate::lora::{merge_into, Factor};
use crate::{guidance, rel_err, residual, testutil::random};

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
