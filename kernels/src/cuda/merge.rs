//! LoRA merges on the GPU: `out = W + Σ coeff · B · A` over every touched layer of a LoRA set in
//! one launch (the packed kernel: a pack launch, then the merge), f32 accumulation.
//!
//! ```text
//! layers + factors ─ Plan::new: check shapes, device pointers, tile offsets per layer
//!   ─ Plan::upload: pointers, dims, offsets, ranks, coefficients to the device
//!   ─ one launch of the chosen kernel (kernels.cu: naive, tiled, mma, h16, packed)
//! ```

use cudarc::driver::{
    CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg, SyncOnDrop, ValidAsZeroBits,
};

use std::sync::Arc;

use super::{GpuError, GpuKernels};

/// One LoRA factor of a layer on the device: `coeff · B · A`.
pub struct GpuFactor<'a> {
    /// `[rows, rank]` row-major.
    pub b: &'a CudaSlice<f32>,
    /// `[rank, cols]` row-major.
    pub a: &'a CudaSlice<f32>,
    pub rank: usize,
    /// `scale · alpha / rank`.
    pub coeff: f32,
    /// The same factor packed for [`MergeKernel::MmaF16Packed`] ([`GpuKernels::pack_factors_f16`]):
    /// that kernel then reads it and packs nothing; the other kernels ignore it.
    pub packed: Option<&'a PackedFactor>,
}

/// A factor as the packed fp16 merge reads it: `B` as `[rows][seg]` and `Aᵀ` as `[cols][seg]`,
/// fp16 bit patterns, the rank padded with zeros to `seg` (a multiple of 32). Half the bytes of
/// the f32 factor; made once per LoRA where a worker keeps its factors on the GPU.
pub struct PackedFactor {
    pub b: CudaSlice<u16>,
    pub a: CudaSlice<u16>,
    pub rows: usize,
    pub cols: usize,
    pub rank: usize,
}

impl PackedFactor {
    /// The padded rank.
    pub fn seg(&self) -> usize {
        padded(self.rank)
    }

    /// Device bytes it holds.
    pub fn bytes(&self) -> usize {
        2 * (self.b.len() + self.a.len())
    }
}

/// A factor for [`GpuKernels::pack_factors_f16`]: `(B, A, rows, cols, rank)`, f32 on the device.
pub type FactorToPack<'a> = (&'a CudaSlice<f32>, &'a CudaSlice<f32>, usize, usize, usize);

/// A rank padded to the packed kernel's chunk.
fn padded(rank: usize) -> usize {
    rank.div_ceil(PACK_RANKS) * PACK_RANKS
}

/// One layer to merge: `out = base + Σ factors` (`base` and `out` may be the same buffer).
/// `T` is `f32`, or `u16` holding fp16 bit patterns (see [`MergeElem`]).
pub struct GpuMergeLayer<'a, T = f32> {
    pub base: &'a CudaSlice<T>,
    pub out: &'a CudaSlice<T>,
    pub rows: usize,
    pub cols: usize,
    pub factors: Vec<GpuFactor<'a>>,
}

/// Element types a merge reads and writes: `f32`, or `u16` for IEEE fp16 bit patterns (cudarc's
/// f16 feature is off; the kernel converts with PTX `cvt`).
pub trait MergeElem: DeviceRepr + ValidAsZeroBits {
    const F16: bool;
}

impl MergeElem for f32 {
    const F16: bool = false;
}

impl MergeElem for u16 {
    const F16: bool = true;
}

/// Which merge kernel runs (all give the same result up to f32 summation order and, for the fp16
/// tensor-core ones, f32 factors rounded to fp16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MergeKernel {
    /// 128×128 tiles per block, factors staged in shared memory, 8×8 outputs per thread.
    #[default]
    Tiled,
    /// One thread per element, each a rank-long dot product (the first version; kept to compare).
    Naive,
    /// The tiles of `Tiled` on tensor cores: TF32 `mma.sync` in the 3×TF32 split (about f32
    /// accuracy), f32 accumulation. Needs compute capability 8.0 or newer.
    Mma,
    /// Tensor cores on fp16 operands (`mma.sync` m16n8k16), f32 accumulation, 128×64 tiles: the
    /// factors are rounded to fp16 as they are read (exact for fp16 LoRA files, about 2^-12
    /// relative otherwise), the coefficients applied in f32. Needs compute capability 8.0 or newer.
    MmaF16,
    /// `MmaF16` on factors packed first: one pass writes every layer's factors as fp16 into
    /// scratch (k-contiguous, each factor's ranks padded to 32), then 128×128 tiles copy their
    /// chunks into shared memory by cp.async, double-buffered. Same numbers as `MmaF16`; scratch of
    /// (rows + cols) × padded rank fp16 values per layer for the merge's duration.
    MmaF16Packed,
    /// `MmaF16Packed` in persistent blocks (two per SM walk the tiles) with two weight buffers:
    /// the next tile's weights and first chunk load while a tile multiplies, so a tile's DRAM
    /// read overlaps the tensor-core work before it. Same numbers.
    MmaF16Persistent,
}

/// Every kernel and its name on the command line.
const KERNEL_NAMES: [(MergeKernel, &str); 6] = [
    (MergeKernel::Tiled, "tiled"),
    (MergeKernel::Naive, "naive"),
    (MergeKernel::Mma, "mma"),
    (MergeKernel::MmaF16, "mma-f16"),
    (MergeKernel::MmaF16Packed, "mma-f16-packed"),
    (MergeKernel::MmaF16Persistent, "mma-f16-persistent"),
];

/// A merge kernel name none of [`MergeKernel`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}`: expected tiled, naive, mma, mma-f16, mma-f16-packed or mma-f16-persistent")]
pub struct UnknownMergeKernel(pub String);

impl std::str::FromStr for MergeKernel {
    type Err = UnknownMergeKernel;
    fn from_str(s: &str) -> Result<Self, UnknownMergeKernel> {
        KERNEL_NAMES
            .iter()
            .find(|(_, n)| *n == s)
            .map(|(k, _)| *k)
            .ok_or_else(|| UnknownMergeKernel(s.to_string()))
    }
}

impl std::fmt::Display for MergeKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = KERNEL_NAMES
            .iter()
            .find(|(k, _)| k == self)
            .map_or("?", |(_, n)| n);
        f.write_str(name)
    }
}

impl MergeKernel {
    /// Whether it runs on tensor cores (compute capability 8.0 or newer).
    fn needs_mma(self) -> bool {
        matches!(
            self,
            MergeKernel::Mma
                | MergeKernel::MmaF16
                | MergeKernel::MmaF16Packed
                | MergeKernel::MmaF16Persistent
        )
    }

    /// What one thread block (naive: one thread) of it covers of a `rows × cols` layer.
    fn units(self, rows: usize, cols: usize) -> u64 {
        let tiles = |tc: usize| (rows.div_ceil(MERGE_TILE) * cols.div_ceil(tc)) as u64;
        match self {
            MergeKernel::Naive => (rows * cols) as u64,
            MergeKernel::Tiled
            | MergeKernel::Mma
            | MergeKernel::MmaF16Packed
            | MergeKernel::MmaF16Persistent => tiles(MERGE_TILE),
            MergeKernel::MmaF16 => tiles(MERGE_TILE_F16_COLS),
        }
    }
}

/// Output tile of the tiled merge kernels (`TM`×`TN` in the CUDA source).
const MERGE_TILE: usize = 128;
/// The column width of the fp16 tensor-core kernel's tiles (kernels.cu `HN`).
const MERGE_TILE_F16_COLS: usize = 64;
/// The packed kernel's rank chunk: each factor's ranks padded to it (kernels.cu `PK`).
const PACK_RANKS: usize = 32;
/// Dynamic shared memory of a packed merge kernel with `stages` chunk stages (kernels.cu
/// `merge_chunks`: 128 rows of B and of Aᵀ, `PK + 8` halves each, per stage), then, for fp16
/// weights, the weight tile (`TM` rows of `TN + 8` halves, kernels.cu `WS`).
pub(super) fn chunk_smem_bytes(stages: usize, f16: bool) -> u32 {
    let stage = 2 * MERGE_TILE * (PACK_RANKS + 8) * 2;
    let weights = if f16 { MERGE_TILE * (MERGE_TILE + 8) * 2 } else { 0 };
    (stages * stage + weights) as u32
}

/// Dynamic shared memory of the persistent merge: two chunk stages, then, for fp16 weights, two
/// weight tiles (kernels.cu `merge_persistent`).
pub(super) fn persistent_smem_bytes(f16: bool) -> u32 {
    chunk_smem_bytes(2, f16) + if f16 { chunk_smem_bytes(0, true) } else { 0 }
}

/// A launch of `blocks` blocks of 256 threads.
fn grid(blocks: u64) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn shape(m: String) -> GpuError {
    GpuError::Shape(format!("lora_merge: {m}"))
}

/// What every merge kernel reads, checked: the layers' device pointers and shapes, where each
/// layer's blocks start, and the factors with a rank. The guards keep the buffers' stream order
/// until the launches are queued.
struct Plan<'g> {
    layer_ptrs: Vec<u64>,
    /// rows, cols, first factor, factor count, per layer
    dims: Vec<u32>,
    offsets: Vec<u64>,
    total: u64,
    factor_ptrs: Vec<u64>,
    ranks: Vec<u32>,
    coeffs: Vec<f32>,
    guards: Vec<SyncOnDrop<'g>>,
}

/// A plan's arrays on the device.
struct Uploaded {
    layer_ptrs: CudaSlice<u64>,
    dims: CudaSlice<u32>,
    offsets: CudaSlice<u64>,
    n_layers: i32,
    ranks: CudaSlice<u32>,
    coeffs: CudaSlice<f32>,
}

impl<'g> Plan<'g> {
    fn new<T: MergeElem>(
        s: &'g Arc<CudaStream>,
        layers: &'g [GpuMergeLayer<'g, T>],
        kernel: MergeKernel,
    ) -> Result<Plan<'g>, GpuError> {
        let mut p = Plan {
            layer_ptrs: Vec::new(),
            dims: Vec::new(),
            offsets: Vec::new(),
            total: 0,
            factor_ptrs: Vec::new(),
            ranks: Vec::new(),
            coeffs: Vec::new(),
            guards: Vec::new(),
        };
        for l in layers {
            let n = l
                .rows
                .checked_mul(l.cols)
                .ok_or_else(|| shape(format!("{}×{} overflows", l.rows, l.cols)))?;
            if l.base.len() != n || l.out.len() != n {
                return Err(shape(format!(
                    "layer {}×{} has buffers {} / {}",
                    l.rows,
                    l.cols,
                    l.base.len(),
                    l.out.len()
                )));
            }
            if l.rows > u32::MAX as usize || l.cols > u32::MAX as usize {
                return Err(shape(format!("layer {}×{} is too large", l.rows, l.cols)));
            }
            let (wp, gw) = l.base.device_ptr(s);
            let (op, go) = l.out.device_ptr(s);
            p.guards.extend([gw, go]);
            p.layer_ptrs.extend([wp, op]);
            let first = p.ranks.len() as u32;
            for f in &l.factors {
                if f.b.len() != l.rows * f.rank || f.a.len() != f.rank * l.cols {
                    return Err(shape(format!(
                        "factor of rank {} does not fit {}×{} (B {}, A {})",
                        f.rank,
                        l.rows,
                        l.cols,
                        f.b.len(),
                        f.a.len()
                    )));
                }
                if f.rank == 0 {
                    continue; // adds nothing
                }
                if f.rank > u32::MAX as usize {
                    return Err(shape(format!("rank {} is too large", f.rank)));
                }
                let (bp, gb) = f.b.device_ptr(s);
                let (ap, ga) = f.a.device_ptr(s);
                p.guards.extend([gb, ga]);
                p.factor_ptrs.extend([bp, ap]);
                p.ranks.push(f.rank as u32);
                p.coeffs.push(f.coeff);
            }
            p.dims
                .extend([l.rows as u32, l.cols as u32, first, p.ranks.len() as u32 - first]);
            p.offsets.push(p.total);
            p.total += kernel.units(l.rows, l.cols);
        }
        if p.factor_ptrs.is_empty() {
            // keep the arrays non-empty for the launch
            p.factor_ptrs.extend([0u64, 0]);
            p.ranks.push(0);
            p.coeffs.push(0.0);
        }
        Ok(p)
    }

    fn upload(&self, s: &Arc<CudaStream>) -> Result<Uploaded, GpuError> {
        Ok(Uploaded {
            layer_ptrs: s.clone_htod(&self.layer_ptrs)?,
            dims: s.clone_htod(&self.dims)?,
            offsets: s.clone_htod(&self.offsets)?,
            n_layers: self.offsets.len() as i32,
            ranks: s.clone_htod(&self.ranks)?,
            coeffs: s.clone_htod(&self.coeffs)?,
        })
    }
}

impl GpuKernels {
    /// Merges every layer of a LoRA set (f32 weights) in one launch on this object's stream.
    pub fn lora_merge(&self, layers: &[GpuMergeLayer<'_, f32>]) -> Result<(), GpuError> {
        self.lora_merge_with(layers, MergeKernel::Tiled)
    }

    /// Merges every layer of a LoRA set (fp16 weights as u16 bit patterns) in one launch: on fp16
    /// tensor cores where the GPU has them (the result is fp16 anyway, and fp16 LoRA factors are
    /// exact) — [`MergeKernel::MmaF16Packed`] when every factor comes packed
    /// ([`Self::pack_factors_f16`]; 2.2× the speed over SDXL), else [`MergeKernel::MmaF16`], which
    /// packs nothing — and [`MergeKernel::Tiled`] without them.
    pub fn lora_merge_f16(&self, layers: &[GpuMergeLayer<'_, u16>]) -> Result<(), GpuError> {
        let all_packed = layers
            .iter()
            .flat_map(|l| &l.factors)
            .all(|f| f.rank == 0 || f.packed.is_some());
        let kernel = match (self.has_mma, all_packed) {
            (true, true) => MergeKernel::MmaF16Packed,
            (true, false) => MergeKernel::MmaF16,
            (false, _) => MergeKernel::Tiled,
        };
        self.lora_merge_with(layers, kernel)
    }

    /// Merges every layer of a LoRA set in one launch of `kernel` on this object's stream:
    /// `out = base + Σ coeff·B·A`, accumulated in f32. Returns once the launch is queued (the
    /// small metadata arrays are copied first); [`Self::synchronize`] waits for the result.
    pub fn lora_merge_with<T: MergeElem>(
        &self,
        layers: &[GpuMergeLayer<'_, T>],
        kernel: MergeKernel,
    ) -> Result<(), GpuError> {
        if layers.is_empty() {
            return Ok(());
        }
        if kernel.needs_mma() && !self.has_mma {
            return Err(GpuError::Unsupported(format!(
                "lora_merge: the {kernel} kernel needs compute capability 8.0 or newer"
            )));
        }
        let s = &self.stream;
        let plan = Plan::new(s, layers, kernel)?;
        let total = plan.total;
        if total == 0 {
            return Ok(());
        }
        let blocks = match kernel {
            MergeKernel::Naive => total.div_ceil(256).min(65_535 * 8),
            _ if total > i32::MAX as u64 => {
                return Err(shape(format!("{total} tiles are more than one launch takes")));
            }
            _ => total,
        };
        let func = match kernel {
            MergeKernel::Naive => &self.lora_merge[T::F16 as usize],
            MergeKernel::Tiled => &self.lora_merge[2 + T::F16 as usize],
            MergeKernel::Mma => &self.lora_merge[4 + T::F16 as usize],
            MergeKernel::MmaF16 => &self.lora_merge[6 + T::F16 as usize],
            MergeKernel::MmaF16Packed | MergeKernel::MmaF16Persistent => {
                return self.lora_merge_packed(layers, plan, kernel == MergeKernel::MmaF16Persistent)
            }
        };
        let d = plan.upload(s)?;
        let factor_ptrs = s.clone_htod(&plan.factor_ptrs)?;
        let mut b = s.launch_builder(func);
        b.arg(&d.layer_ptrs)
            .arg(&d.dims)
            .arg(&d.offsets)
            .arg(&d.n_layers)
            .arg(&factor_ptrs)
            .arg(&d.ranks)
            .arg(&d.coeffs)
            .arg(&total);
        unsafe { b.launch(grid(blocks)) }?;
        drop(plan);
        Ok(())
    }

    /// Packs factors for [`MergeKernel::MmaF16Packed`] in one launch: `(B, A, rows, cols, rank)`
    /// each, f32 on this object's device; the packed copies are ready in stream order.
    pub fn pack_factors_f16(&self, factors: &[FactorToPack<'_>]) -> Result<Vec<PackedFactor>, GpuError> {
        if !self.has_mma {
            return Err(GpuError::Unsupported(
                "pack_factors_f16: the packed merge needs compute capability 8.0 or newer".into(),
            ));
        }
        let s = &self.stream;
        let mut out = Vec::with_capacity(factors.len());
        for &(b, a, rows, cols, rank) in factors {
            if b.len() != rows * rank || a.len() != rank * cols || rank == 0 {
                return Err(shape(format!(
                    "pack: factor of rank {rank} does not fit {rows}×{cols} (B {}, A {})",
                    b.len(),
                    a.len()
                )));
            }
            let seg = padded(rank);
            // SAFETY: the pack launch below writes every element, padding included
            let (pb, pa) = unsafe { (s.alloc::<u16>(rows * seg)?, s.alloc::<u16>(cols * seg)?) };
            out.push(PackedFactor {
                b: pb,
                a: pa,
                rows,
                cols,
                rank,
            });
        }
        let mut jobs = PackJobs::default();
        let mut guards = Vec::new();
        for (&(b, a, rows, cols, rank), p) in factors.iter().zip(&out) {
            let (src_b, g1) = b.device_ptr(s);
            let (src_a, g2) = a.device_ptr(s);
            let (dst_b, g3) = p.b.device_ptr(s);
            let (dst_a, g4) = p.a.device_ptr(s);
            guards.extend([g1, g2, g3, g4]);
            jobs.add(src_b, src_a, dst_b, dst_a, rows, cols, rank);
        }
        jobs.launch(self)?;
        drop(guards);
        Ok(out)
    }

    /// [`MergeKernel::MmaF16Packed`]: the factors' packed copies where the caller has them, the
    /// others packed into scratch first (one launch), then the merge (both on this object's
    /// stream; the scratch is freed in stream order).
    fn lora_merge_packed<'g, T: MergeElem>(
        &'g self,
        layers: &'g [GpuMergeLayer<'g, T>],
        mut plan: Plan<'g>,
        persistent: bool,
    ) -> Result<(), GpuError> {
        let s = &self.stream;
        // the factors in the plan's order (rank > 0), and the scratch the unpacked ones need
        let factors: Vec<(&GpuFactor<'_>, usize, usize)> = layers
            .iter()
            .flat_map(|l| {
                l.factors
                    .iter()
                    .filter(|f| f.rank > 0)
                    .map(move |f| (f, l.rows, l.cols))
            })
            .collect();
        for (f, rows, cols) in &factors {
            if let Some(p) = f.packed {
                if p.rank != f.rank || p.rows != *rows || p.cols != *cols {
                    return Err(shape(format!(
                        "packed factor {}×{} of rank {} given for {rows}×{cols} of rank {}",
                        p.rows, p.cols, p.rank, f.rank
                    )));
                }
            }
        }
        let scratch_len: usize = factors
            .iter()
            .filter(|(f, ..)| f.packed.is_none())
            .map(|(f, rows, cols)| (rows + cols) * padded(f.rank))
            .sum();
        // SAFETY: every value a merge reads is written by the pack launch before it, in stream order
        let scratch = unsafe { s.alloc::<u16>(scratch_len.max(1)) }?;
        let (base, scratch_guard) = scratch.device_ptr(s);
        let mut jobs = PackJobs::default();
        let mut packed = Vec::with_capacity(2 * factors.len());
        let mut at = base;
        for (f, rows, cols) in &factors {
            if let Some(p) = f.packed {
                let (b, gb) = p.b.device_ptr(s);
                let (a, ga) = p.a.device_ptr(s);
                plan.guards.extend([gb, ga]);
                packed.extend([b, a]);
                continue;
            }
            let seg = padded(f.rank) as u64;
            let (bp, ap) = (at, at + 2 * *rows as u64 * seg);
            at = ap + 2 * *cols as u64 * seg;
            let (b, gb) = f.b.device_ptr(s);
            let (a, ga) = f.a.device_ptr(s);
            plan.guards.extend([gb, ga]);
            jobs.add(b, a, bp, ap, *rows, *cols, f.rank);
            packed.extend([bp, ap]);
        }
        if packed.is_empty() {
            packed.extend([0u64, 0]); // keep the array non-empty for the launch
        }
        jobs.launch(self)?;
        let d = plan.upload(s)?;
        let d_packed = s.clone_htod(&packed)?;
        // fp16 weights: each tile's weights staged in shared memory while the factors multiply
        let stage_w = T::F16 as i32;
        let (func, smem, blocks) = if persistent {
            // two blocks per SM walk every tile
            let blocks = plan.total.min(2 * self.sms as u64);
            (
                &self.lora_merge_persistent[T::F16 as usize],
                persistent_smem_bytes(T::F16),
                blocks,
            )
        } else {
            (
                &self.lora_merge_packed[T::F16 as usize],
                chunk_smem_bytes(2, T::F16),
                plan.total,
            )
        };
        let mut b = s.launch_builder(func);
        b.arg(&d.layer_ptrs)
            .arg(&d.dims)
            .arg(&d.offsets)
            .arg(&d.n_layers)
            .arg(&d_packed)
            .arg(&d.ranks)
            .arg(&d.coeffs)
            .arg(&stage_w);
        if persistent {
            b.arg(&plan.total);
        }
        let cfg = LaunchConfig {
            shared_mem_bytes: smem,
            ..grid(blocks)
        };
        unsafe { b.launch(cfg) }?;
        drop(plan);
        drop(scratch_guard);
        Ok(())
    }
}

/// Pack jobs (kernels.cu `PACK_FIELDS`: src, dst, n, rank, kpad, kseg, transposed, cols), each
/// factor's B and A into their own `[n][seg]` matrices, and where each job's tiles start.
#[derive(Default)]
struct PackJobs {
    jobs: Vec<u64>,
    tile_offsets: Vec<u64>,
    tiles: u64,
}

impl PackJobs {
    #[allow(clippy::too_many_arguments)]
    fn add(&mut self, src_b: u64, src_a: u64, dst_b: u64, dst_a: u64, rows: usize, cols: usize, rank: usize) {
        let seg = padded(rank);
        for (src, dst, n, transposed) in [(src_b, dst_b, rows, 0u64), (src_a, dst_a, cols, 1)] {
            self.jobs.extend([
                src,
                dst,
                n as u64,
                rank as u64,
                seg as u64,
                0,
                transposed,
                cols as u64,
            ]);
            self.tile_offsets.push(self.tiles);
            self.tiles += (n.div_ceil(32) * (seg / 32)) as u64;
        }
    }

    fn launch(&self, k: &GpuKernels) -> Result<(), GpuError> {
        if self.tiles == 0 {
            return Ok(());
        }
        if self.tiles > i32::MAX as u64 {
            return Err(shape(format!(
                "{} pack tiles are more than one launch takes",
                self.tiles
            )));
        }
        let s = &k.stream;
        let d_jobs = s.clone_htod(&self.jobs)?;
        let d_tile_offsets = s.clone_htod(&self.tile_offsets)?;
        let n_jobs = self.tile_offsets.len() as i32;
        let mut b = s.launch_builder(&k.pack);
        b.arg(&d_jobs).arg(&d_tile_offsets).arg(&n_jobs);
        unsafe { b.launch(grid(self.tiles)) }?;
        Ok(())
    }
}
