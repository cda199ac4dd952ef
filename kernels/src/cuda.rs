//! CUDA twins of the CPU kernels, compiled at run time with NVRTC and launched through cudarc.
//!
//! ```text
//! GpuKernels::new(ordinal) ── probe libcuda + a device ── NVRTC compile (once) ── module
//!   combine    pred[2n] (uncond; cond), g        ─▶ out[n]        (guidance)
//!   axpy       dst += s · src                                      (ControlNet residual sums)
//!   scale      out = s · src (twice for [x; x])                    (scheduler input scale, CFG batch)
//!   euler      sample ← sample + (sample − (sample − σ·ε))/σ · (σ' − σ)   (diffusers' Euler, ε-prediction)
//!   lora_merge every layer of a LoRA set in ONE launch:  out = W + Σ cᵢ · Bᵢ·Aᵢ
//!              W/out f32 ([`GpuKernels::lora_merge`]) or fp16 ([`GpuKernels::lora_merge_f16`],
//!              bit patterns in u16); factors f32; f32 accumulation; tiled (default), naive, or
//!              mma (tensor cores, 3×TF32, sm_80+)
//! ```
//!
//! cudarc loads libcuda and libnvrtc at run time, so this module builds everywhere; where no
//! driver or device is present, [`GpuKernels::new`] returns [`GpuError::NoCuda`] — it never
//! panics and never falls back to the CPU. Tests marked `#[ignore]` need a GPU:
//! `tools/device/gpu-tests.sh` runs them on the GPU machine.

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no CUDA here: {0}")]
    NoCuda(String),
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("NVRTC: {0}")]
    Compile(#[from] cudarc::nvrtc::CompileError),
    #[error("{0}")]
    Shape(String),
    #[error("{0}")]
    Unsupported(String),
}

const SOURCE: &str = r#"
extern "C" __global__ void combine(const float* pred, float g, float* out, unsigned int n) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float u = pred[i], c = pred[n + i];
        out[i] = u + g * (c - u);
    }
}

extern "C" __global__ void axpy(float* dst, const float* src, float s, unsigned int n) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        dst[i] += s * src[i];
    }
}

// out[k*n + i] = s * src[i] for k < copies: the scaled latent, once per guidance half
extern "C" __global__ void scale(const float* src, float s, float* out, unsigned int n, unsigned int copies) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float v = s * src[i];
        for (unsigned int k = 0; k < copies; k++) out[k * n + i] = v;
    }
}

extern "C" __global__ void euler(float* sample, const float* eps, float sigma, float sigma_next, unsigned int n) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float x = sample[i];
        float pred_original = x - sigma * eps[i];
        float derivative = (x - pred_original) / sigma;
        sample[i] = x + derivative * (sigma_next - sigma);
    }
}

// ── LoRA merge: out = W + Σ cᵢ·Bᵢ·Aᵢ over every layer of a LoRA set, in ONE launch ──────────
// Layer l: W = layer_ptrs[2l], out = layer_ptrs[2l+1] (f32, or fp16 bit patterns), dims[4l..] =
// rows, cols, first factor, number of factors; offsets[l] = its first element (naive kernel) or
// its first tile (tiled kernel). Factor f: B = factor_ptrs[2f] ([rows, rank] f32), A =
// factor_ptrs[2f+1] ([rank, cols] f32), rank ranks[f], coefficient coeffs[f]. Accumulation is f32.

// fp16 <-> f32 through PTX (no cuda_fp16.h: NVRTC is given no include path)
__device__ __forceinline__ float h2f(unsigned short h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ unsigned short f2h(float f) {
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
__device__ __forceinline__ float load1(const float* p, unsigned long long i) { return p[i]; }
__device__ __forceinline__ float load1(const unsigned short* p, unsigned long long i) { return h2f(p[i]); }
__device__ __forceinline__ void store1(float* p, unsigned long long i, float v) { p[i] = v; }
__device__ __forceinline__ void store1(unsigned short* p, unsigned long long i, float v) { p[i] = f2h(v); }
// four consecutive elements from i (a multiple of 4; the pointer aligned to 4 elements)
__device__ __forceinline__ float4 load4(const float* p, unsigned long long i) { return *(const float4*)(p + i); }
__device__ __forceinline__ float4 load4(const unsigned short* p, unsigned long long i) {
    uint2 u = *(const uint2*)(p + i);
    return make_float4(h2f((unsigned short)(u.x & 0xffffu)), h2f((unsigned short)(u.x >> 16)),
                       h2f((unsigned short)(u.y & 0xffffu)), h2f((unsigned short)(u.y >> 16)));
}
__device__ __forceinline__ void store4(float* p, unsigned long long i, float4 v) { *(float4*)(p + i) = v; }
// two floats → packed fp16 pair, `lo` at the lower address (one instruction on sm_80+)
__device__ __forceinline__ unsigned int f2h2(float lo, float hi) {
#if __CUDA_ARCH__ >= 800
    unsigned int u; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(u) : "f"(hi), "f"(lo)); return u;
#else
    return (unsigned int)f2h(lo) | ((unsigned int)f2h(hi) << 16);
#endif
}
__device__ __forceinline__ void store4(unsigned short* p, unsigned long long i, float4 v) {
    uint2 u;
    u.x = f2h2(v.x, v.y);
    u.y = f2h2(v.z, v.w);
    *(uint2*)(p + i) = u;
}

// the layer whose range [offsets[l], offsets[l+1]) holds idx
__device__ __forceinline__ int find_layer(const unsigned long long* offsets, int n_layers, unsigned long long idx) {
    int lo = 0, hi = n_layers - 1;
    while (lo < hi) { int mid = (lo + hi + 1) / 2; if (offsets[mid] <= idx) lo = mid; else hi = mid - 1; }
    return lo;
}

// Naive: one thread per element, a rank-long dot product each (A read with a stride of cols).
template <typename T>
__device__ __forceinline__ void merge_naive(const unsigned long long* layer_ptrs, const unsigned int* dims,
                                            const unsigned long long* offsets, int n_layers,
                                            const unsigned long long* factor_ptrs, const unsigned int* ranks,
                                            const float* coeffs, unsigned long long total) {
    for (unsigned long long idx = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (unsigned long long)gridDim.x * blockDim.x) {
        int l = find_layer(offsets, n_layers, idx);
        unsigned long long e = idx - offsets[l];
        unsigned int cols = dims[4 * l + 1], f0 = dims[4 * l + 2], nf = dims[4 * l + 3];
        unsigned int r = (unsigned int)(e / cols), c = (unsigned int)(e % cols);
        const T* W = (const T*)layer_ptrs[2 * l];
        T* O = (T*)layer_ptrs[2 * l + 1];
        float acc = load1(W, e);
        for (unsigned int f = f0; f < f0 + nf; f++) {
            const float* B = (const float*)factor_ptrs[2 * f];
            const float* A = (const float*)factor_ptrs[2 * f + 1];
            unsigned int rank = ranks[f];
            float s = 0.0f;
            for (unsigned int k = 0; k < rank; k++) s += B[(unsigned long long)r * rank + k] * A[(unsigned long long)k * cols + c];
            acc += coeffs[f] * s;
        }
        store1(O, e, acc);
    }
}

// Tiled: a block of 256 threads computes a TM×TN tile of one layer. Chunks of KC ranks of B
// (tile rows) and A (tile columns) are staged in shared memory, double-buffered: on sm_80+ the
// next chunk arrives by cp.async while the current one is multiplied, so the factor loads' latency
// hides behind arithmetic. Each thread accumulates an 8×8 register tile (rows ty·4+{0..3},
// 64+ty·4+{0..3}; columns tx·4+{0..3}, 64+tx·4+{0..3}) over all factors of the layer (scaled by
// their coefficients as B is read), then reads W once and writes out once (4-wide where aligned).
// 128 registers, no spills at two blocks per SM (sm_90): one block's W/out traffic overlaps the
// other's arithmetic.
#define TM 128
#define TN 128
#define KC 8
#define SLD (TM + 4)

// 4-byte copy global → shared, zero-filled where !ok: asynchronous (cp.async) on sm_80+
__device__ __forceinline__ void stage4(float* dst, const float* src, bool ok) {
#if __CUDA_ARCH__ >= 800
    unsigned int d;
    asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(d) : "l"(dst));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" :: "r"(d), "l"(src), "r"(ok ? 4 : 0) : "memory");
#else
    *dst = ok ? *src : 0.0f;
#endif
}
__device__ __forceinline__ void stage_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
// waits for this thread's copies, all of them (all = true) or all but the last committed group
__device__ __forceinline__ void stage_wait(bool all) {
#if __CUDA_ARCH__ >= 800
    if (all) asm volatile("cp.async.wait_group 0;" ::: "memory");
    else asm volatile("cp.async.wait_group 1;" ::: "memory");
#endif
}

// Bs[kk][i] = B[r0+i, k0+kk], As[kk][j] = A[k0+kk, c0+j] of factor f (zeros outside)
__device__ __forceinline__ void stage_chunk(float (*Bs)[SLD], float (*As)[SLD], const unsigned long long* factor_ptrs,
                                            const unsigned int* ranks, unsigned int f, unsigned int k0,
                                            unsigned int r0, unsigned int c0, unsigned int rows,
                                            unsigned int cols, int tid) {
    const float* B = (const float*)factor_ptrs[2 * f];
    const float* A = (const float*)factor_ptrs[2 * f + 1];
    const unsigned int rank = ranks[f];
#pragma unroll
    for (int u = 0; u < (TM * KC) / 256; u++) {
        const int e = tid + 256 * u;
        const unsigned int r = r0 + e / KC, k = k0 + e % KC;
        const bool ok = r < rows && k < rank;
        stage4(&Bs[e % KC][e / KC], ok ? B + (unsigned long long)r * rank + k : B, ok);
    }
#pragma unroll
    for (int u = 0; u < (TN * KC) / 256; u++) {
        const int e = tid + 256 * u;
        const unsigned int k = k0 + e / TN, c = c0 + e % TN;
        const bool ok = c < cols && k < rank;
        stage4(&As[e / TN][e % TN], ok ? A + (unsigned long long)k * cols + c : A, ok);
    }
    stage_commit();
}

template <typename T>
__device__ __forceinline__ void merge_tiled(const unsigned long long* layer_ptrs, const unsigned int* dims,
                                            const unsigned long long* offsets, int n_layers,
                                            const unsigned long long* factor_ptrs, const unsigned int* ranks,
                                            const float* coeffs) {
    __shared__ __align__(16) float Bs[2][KC][SLD];
    __shared__ __align__(16) float As[2][KC][SLD];
    const unsigned long long tile = blockIdx.x;
    const int l = find_layer(offsets, n_layers, tile);
    const unsigned int rows = dims[4 * l], cols = dims[4 * l + 1], f0 = dims[4 * l + 2], nf = dims[4 * l + 3];
    const unsigned int t = (unsigned int)(tile - offsets[l]);
    const unsigned int tiles_c = (cols + TN - 1) / TN;
    const unsigned int r0 = (t / tiles_c) * TM, c0 = (t % tiles_c) * TN;
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;

    float acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; i++)
#pragma unroll
        for (int j = 0; j < 8; j++) acc[i][j] = 0.0f;

    // chunks in order: factor f, ranks k0..k0+KC; buffer `cur` holds the current one
    unsigned int f = f0, k0 = 0;
    int cur = 0;
    if (nf > 0) stage_chunk(Bs[0], As[0], factor_ptrs, ranks, f, k0, r0, c0, rows, cols, tid);
    while (f < f0 + nf) {
        const float coeff = coeffs[f];
        unsigned int nf_next = f, k_next = k0 + KC;
        if (k_next >= ranks[f]) { nf_next = f + 1; k_next = 0; }
        const bool more = nf_next < f0 + nf;
        if (more)
            stage_chunk(Bs[cur ^ 1], As[cur ^ 1], factor_ptrs, ranks, nf_next, k_next, r0, c0, rows, cols, tid);
        stage_wait(!more);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < KC; kk++) {
            const float4 b0 = *(const float4*)&Bs[cur][kk][ty * 4], b1 = *(const float4*)&Bs[cur][kk][64 + ty * 4];
            const float4 a0 = *(const float4*)&As[cur][kk][tx * 4], a1 = *(const float4*)&As[cur][kk][64 + tx * 4];
            const float b[8] = {coeff * b0.x, coeff * b0.y, coeff * b0.z, coeff * b0.w,
                                coeff * b1.x, coeff * b1.y, coeff * b1.z, coeff * b1.w};
            const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
#pragma unroll
            for (int i = 0; i < 8; i++)
#pragma unroll
                for (int j = 0; j < 8; j++) acc[i][j] = fmaf(b[i], a[j], acc[i][j]);
        }
        __syncthreads();  // everyone is done with `cur` before it is staged into again
        cur ^= 1;
        f = nf_next;
        k0 = k_next;
    }

    const T* W = (const T*)layer_ptrs[2 * l];
    T* O = (T*)layer_ptrs[2 * l + 1];
    const bool vec = (cols % 4 == 0) &&
                     (((layer_ptrs[2 * l] | layer_ptrs[2 * l + 1]) % (4 * sizeof(T))) == 0);
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const unsigned int r = r0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + (i - 4));
        if (r >= rows) continue;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const unsigned int c = c0 + h * 64 + tx * 4;
            if (c >= cols) continue;
            const unsigned long long e = (unsigned long long)r * cols + c;
            if (vec) {
                float4 w = load4(W, e);
                w.x += acc[i][4 * h]; w.y += acc[i][4 * h + 1]; w.z += acc[i][4 * h + 2]; w.w += acc[i][4 * h + 3];
                store4(O, e, w);
            } else {
#pragma unroll
                for (int j = 0; j < 4; j++)
                    if (c + j < cols) store1(O, e + j, load1(W, e + j) + acc[i][4 * h + j]);
            }
        }
    }
}

// Tensor cores (sm_80+): the same tiles, multiplied with mma.sync m16n8k8 TF32 in the 3×TF32 split
// (x = hi + lo, both TF32; hi·hi + hi·lo + lo·hi keeps about f32 accuracy), f32 accumulation.
// 8 warps as 2×4, each a 64×32 sub-tile of 4×4 mma tiles. The staged chunks are split once into
// hi/lo parts in shared memory; row strides are padded so that fragment reads are conflict-free.
// MK = 8 keeps it at 128 registers without spills (sm_90), two blocks per SM.
#define MK 8
#define MBS (MK + 4)
#define MAS (TN + 8)
#if __CUDA_ARCH__ >= 800
__device__ __forceinline__ void split_tf32(float x, unsigned int& hi, unsigned int& lo) {
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(hi) : "f"(x));
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(lo) : "f"(x - __uint_as_float(hi)));
}
__device__ __forceinline__ void mma_tf32(float* d, const unsigned int* a, unsigned int b0, unsigned int b1) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// two consecutive elements from i (even; the pointer aligned to 2 elements)
__device__ __forceinline__ float2 load2(const float* p, unsigned long long i) { return *(const float2*)(p + i); }
__device__ __forceinline__ float2 load2(const unsigned short* p, unsigned long long i) {
    unsigned int u = *(const unsigned int*)(p + i);
    return make_float2(h2f((unsigned short)(u & 0xffffu)), h2f((unsigned short)(u >> 16)));
}
__device__ __forceinline__ void store2(float* p, unsigned long long i, float2 v) { *(float2*)(p + i) = v; }
__device__ __forceinline__ void store2(unsigned short* p, unsigned long long i, float2 v) {
    *(unsigned int*)(p + i) = f2h2(v.x, v.y);
}
#endif

// Lb[i][kk] = B[r0+i, k0+kk], La[kk][j] = A[k0+kk, c0+j] of factor f (zeros outside)
__device__ __forceinline__ void stage_mma_chunk(float (*Lb)[MK], float (*La)[TN], const unsigned long long* factor_ptrs,
                                                const unsigned int* ranks, unsigned int f, unsigned int k0,
                                                unsigned int r0, unsigned int c0, unsigned int rows,
                                                unsigned int cols, int tid) {
    const float* B = (const float*)factor_ptrs[2 * f];
    const float* A = (const float*)factor_ptrs[2 * f + 1];
    const unsigned int rank = ranks[f];
#pragma unroll
    for (int u = 0; u < (TM * MK) / 256; u++) {
        const int e = tid + 256 * u;
        const unsigned int r = r0 + e / MK, k = k0 + e % MK;
        const bool ok = r < rows && k < rank;
        stage4(&Lb[e / MK][e % MK], ok ? B + (unsigned long long)r * rank + k : B, ok);
    }
#pragma unroll
    for (int u = 0; u < (TN * MK) / 256; u++) {
        const int e = tid + 256 * u;
        const unsigned int k = k0 + e / TN, c = c0 + e % TN;
        const bool ok = c < cols && k < rank;
        stage4(&La[e / TN][e % TN], ok ? A + (unsigned long long)k * cols + c : A, ok);
    }
    stage_commit();
}

template <typename T>
__device__ __forceinline__ void merge_mma(const unsigned long long* layer_ptrs, const unsigned int* dims,
                                          const unsigned long long* offsets, int n_layers,
                                          const unsigned long long* factor_ptrs, const unsigned int* ranks,
                                          const float* coeffs) {
#if __CUDA_ARCH__ >= 800
    __shared__ unsigned int Bh[TM][MBS], Bl[TM][MBS];
    __shared__ unsigned int Ah[MK][MAS], Al[MK][MAS];
    __shared__ float Lb[TM][MK], La[MK][TN];
    const unsigned long long tile = blockIdx.x;
    const int l = find_layer(offsets, n_layers, tile);
    const unsigned int rows = dims[4 * l], cols = dims[4 * l + 1], f0 = dims[4 * l + 2], nf = dims[4 * l + 3];
    const unsigned int t = (unsigned int)(tile - offsets[l]);
    const unsigned int tiles_c = (cols + TN - 1) / TN;
    const unsigned int r0 = (t / tiles_c) * TM, c0 = (t % tiles_c) * TN;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 2, wn = warp & 3, g = lane >> 2, t4 = lane & 3;

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int q = 0; q < 4; q++) acc[i][j][q] = 0.0f;

    // the next chunk lands (raw, by cp.async on sm_80+) in Lb/La while the current one is
    // multiplied; each thread splits the elements it staged into the hi/lo buffers
    unsigned int f = f0, k0 = 0;
    if (nf > 0) stage_mma_chunk(Lb, La, factor_ptrs, ranks, f, k0, r0, c0, rows, cols, tid);
    while (f < f0 + nf) {
        const float coeff = coeffs[f];
        stage_wait(true);
        __syncthreads();  // every warp is done with the hi/lo buffers of the previous chunk
#pragma unroll
        for (int u = 0; u < (TM * MK) / 256; u++) {
            const int e = tid + 256 * u;
            split_tf32(coeff * Lb[e / MK][e % MK], Bh[e / MK][e % MK], Bl[e / MK][e % MK]);
        }
#pragma unroll
        for (int u = 0; u < (TN * MK) / 256; u++) {
            const int e = tid + 256 * u;
            split_tf32(La[e / TN][e % TN], Ah[e / TN][e % TN], Al[e / TN][e % TN]);
        }
        __syncthreads();  // hi/lo complete, the landing buffers free
        k0 += MK;
        if (k0 >= ranks[f]) { f++; k0 = 0; }
        if (f < f0 + nf) stage_mma_chunk(Lb, La, factor_ptrs, ranks, f, k0, r0, c0, rows, cols, tid);
#pragma unroll
        for (int kb = 0; kb < MK; kb += 8) {
            unsigned int bh[4][2], bl[4][2];
#pragma unroll
            for (int nt = 0; nt < 4; nt++) {
                const int col = wn * 32 + nt * 8 + g;
                bh[nt][0] = Ah[kb + t4][col]; bh[nt][1] = Ah[kb + t4 + 4][col];
                bl[nt][0] = Al[kb + t4][col]; bl[nt][1] = Al[kb + t4 + 4][col];
            }
#pragma unroll
            for (int mt = 0; mt < 4; mt++) {
                const int row = wm * 64 + mt * 16 + g;
                const unsigned int ah[4] = {Bh[row][kb + t4], Bh[row + 8][kb + t4], Bh[row][kb + t4 + 4],
                                            Bh[row + 8][kb + t4 + 4]};
                const unsigned int al[4] = {Bl[row][kb + t4], Bl[row + 8][kb + t4], Bl[row][kb + t4 + 4],
                                            Bl[row + 8][kb + t4 + 4]};
#pragma unroll
                for (int nt = 0; nt < 4; nt++) {
                    mma_tf32(acc[mt][nt], al, bh[nt][0], bh[nt][1]);
                    mma_tf32(acc[mt][nt], ah, bl[nt][0], bl[nt][1]);
                    mma_tf32(acc[mt][nt], ah, bh[nt][0], bh[nt][1]);
                }
            }
        }
    }

    const T* W = (const T*)layer_ptrs[2 * l];
    T* O = (T*)layer_ptrs[2 * l + 1];
    const bool vec = (cols % 2 == 0) &&
                     (((layer_ptrs[2 * l] | layer_ptrs[2 * l + 1]) % (2 * sizeof(T))) == 0);
#pragma unroll
    for (int mt = 0; mt < 4; mt++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const unsigned int r = r0 + wm * 64 + mt * 16 + g + 8 * h;
            if (r >= rows) continue;
#pragma unroll
            for (int nt = 0; nt < 4; nt++) {
                const unsigned int c = c0 + wn * 32 + nt * 8 + 2 * t4;
                if (c >= cols) continue;
                const unsigned long long e = (unsigned long long)r * cols + c;
                const float d0 = acc[mt][nt][2 * h], d1 = acc[mt][nt][2 * h + 1];
                if (vec) {
                    float2 w = load2(W, e);
                    w.x += d0; w.y += d1;
                    store2(O, e, w);
                } else {
                    store1(O, e, load1(W, e) + d0);
                    if (c + 1 < cols) store1(O, e + 1, load1(W, e + 1) + d1);
                }
            }
        }
    }
#else
    __trap();  // the host launches this kernel only on sm_80 and newer
#endif
}

#define MERGE_ARGS const unsigned long long* layer_ptrs, const unsigned int* dims, \
    const unsigned long long* offsets, int n_layers, const unsigned long long* factor_ptrs, \
    const unsigned int* ranks, const float* coeffs, unsigned long long total
extern "C" __global__ void lora_merge_naive_f32(MERGE_ARGS) {
    merge_naive<float>(layer_ptrs, dims, offsets, n_layers, factor_ptrs, ranks, coeffs, total);
}
extern "C" __global__ void lora_merge_naive_f16(MERGE_ARGS) {
    merge_naive<unsigned short>(layer_ptrs, dims, offsets, n_layers, factor_ptrs, ranks, coeffs, total);
}
extern "C" __global__ void __launch_bounds__(256, 2) lora_merge_tiled_f32(MERGE_ARGS) {
    merge_tiled<float>(layer_ptrs, dims, offsets, n_layers, factor_ptrs, ranks, coeffs);
}
extern "C" __global__ void __launch_bounds__(256, 2) lora_merge_tiled_f16(MERGE_ARGS) {
    merge_tiled<unsigned short>(layer_ptrs, dims, offsets, n_layers, factor_ptrs, ranks, coeffs);
}
extern "C" __global__ void __launch_bounds__(256, 2) lora_merge_mma_f32(MERGE_ARGS) {
    merge_mma<float>(layer_ptrs, dims, offsets, n_layers, factor_ptrs, ranks, coeffs);
}
extern "C" __global__ void __launch_bounds__(256, 2) lora_merge_mma_f16(MERGE_ARGS) {
    merge_mma<unsigned short>(layer_ptrs, dims, offsets, n_layers, factor_ptrs, ranks, coeffs);
}
"#;

/// Lets GPUs `a` and `b` of this process read each other's memory (both directions): peer
/// access between their primary contexts (direct NVLink/PCIe copies of ONNX Runtime's buffers)
/// and access to each other's default memory pool (cudarc allocates from it with
/// `cuMemAllocAsync`; pool memory ignores context peer access, and a copy between devices
/// touching a pool it may not access fails with `CUDA_ERROR_INVALID_VALUE`). Idempotent.
pub fn enable_peer_access(a: usize, b: usize) -> Result<(), GpuError> {
    use cudarc::driver::sys;
    if a == b {
        return Ok(());
    }
    static DONE: std::sync::Mutex<Vec<(usize, usize)>> = std::sync::Mutex::new(Vec::new());
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if done.contains(&(a.min(b), a.max(b))) {
        return Ok(());
    }
    let (ca, cb) = (CudaContext::new(a)?, CudaContext::new(b)?);
    for (from, to, to_ord, from_ord) in [(&ca, &cb, b, a), (&cb, &ca, a, b)] {
        from.bind_to_thread()?;
        // SAFETY: both contexts are live primary contexts of this process
        let r = unsafe { sys::cuCtxEnablePeerAccess(to.cu_ctx(), 0) };
        if r != sys::CUresult::CUDA_SUCCESS && r != sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED {
            r.result()?;
        }
        // `to_ord`'s default pool becomes readable and writable by `from_ord`
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, to_ord as sys::CUdevice) }.result()?;
        let desc = sys::CUmemAccessDesc {
            location: sys::CUmemLocation {
                type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
                id: from_ord as i32,
            },
            flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        unsafe { sys::cuMemPoolSetAccess(pool, &desc, 1) }.result()?;
    }
    done.push((a.min(b), a.max(b)));
    Ok(())
}

/// How many GPUs the driver sees (0 where no driver is present; no panic).
pub fn device_count() -> usize {
    if !cuda_available() {
        return 0;
    }
    cudarc::driver::result::device::get_count().unwrap_or(0).max(0) as usize
}

/// Whether a CUDA driver library and at least one device are present (no panic where absent).
pub fn cuda_available() -> bool {
    // SAFETY: only probes whether the shared libraries can be opened.
    let libs = unsafe { cudarc::driver::sys::is_culib_present() && cudarc::nvrtc::sys::is_culib_present() };
    libs && cudarc::driver::result::init().is_ok()
        && cudarc::driver::result::device::get_count().unwrap_or(0) > 0
}

/// One LoRA factor of a layer on the device: `coeff · B · A`.
pub struct GpuFactor<'a> {
    /// `[rows, rank]` row-major.
    pub b: &'a CudaSlice<f32>,
    /// `[rank, cols]` row-major.
    pub a: &'a CudaSlice<f32>,
    pub rank: usize,
    /// `scale · alpha / rank`.
    pub coeff: f32,
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

/// Which merge kernel runs (both give the same result up to f32 summation order).
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
}

/// A merge kernel name other than `tiled` / `naive` / `mma`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}`: expected tiled, naive or mma")]
pub struct UnknownMergeKernel(pub String);

impl std::str::FromStr for MergeKernel {
    type Err = UnknownMergeKernel;
    fn from_str(s: &str) -> Result<Self, UnknownMergeKernel> {
        match s {
            "tiled" => Ok(MergeKernel::Tiled),
            "naive" => Ok(MergeKernel::Naive),
            "mma" => Ok(MergeKernel::Mma),
            _ => Err(UnknownMergeKernel(s.to_string())),
        }
    }
}

impl std::fmt::Display for MergeKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MergeKernel::Tiled => "tiled",
            MergeKernel::Naive => "naive",
            MergeKernel::Mma => "mma",
        })
    }
}

/// Output tile of the tiled merge kernel (`TM`×`TN` in the CUDA source).
const MERGE_TILE: usize = 128;

pub struct GpuKernels {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    combine: CudaFunction,
    axpy: CudaFunction,
    scale: CudaFunction,
    euler: CudaFunction,
    /// `[naive f32, naive f16, tiled f32, tiled f16, mma f32, mma f16]`
    lora_merge: [CudaFunction; 6],
    /// Compute capability 8.0 or newer: the tensor-core merge runs.
    has_mma: bool,
}

fn cfg(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535 * 4) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl GpuKernels {
    /// Compiles the kernels for GPU `ordinal` on a stream of their own.
    pub fn new(ordinal: usize) -> Result<Self, GpuError> {
        if !cuda_available() {
            return Err(GpuError::NoCuda(
                "libcuda/libnvrtc not loadable or no device".into(),
            ));
        }
        let ctx = CudaContext::new(ordinal)?;
        let stream = ctx.new_stream()?;
        let (major, _) = ctx.compute_capability()?;
        let has_mma = major >= 8;
        // compute_80 PTX (JIT-compiled by the driver for the device) enables the mma kernels
        let opts = cudarc::nvrtc::CompileOptions {
            arch: has_mma.then_some("compute_80"),
            ..Default::default()
        };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(SOURCE, opts)?;
        let m = ctx.load_module(ptx)?;
        Ok(GpuKernels {
            combine: m.load_function("combine")?,
            axpy: m.load_function("axpy")?,
            scale: m.load_function("scale")?,
            euler: m.load_function("euler")?,
            lora_merge: [
                m.load_function("lora_merge_naive_f32")?,
                m.load_function("lora_merge_naive_f16")?,
                m.load_function("lora_merge_tiled_f32")?,
                m.load_function("lora_merge_tiled_f16")?,
                m.load_function("lora_merge_mma_f32")?,
                m.load_function("lora_merge_mma_f16")?,
            ],
            has_mma,
            ctx,
            stream,
        })
    }

    /// `out = uncond + g·(cond − uncond)` of a `[uncond; cond]` prediction.
    pub fn combine(&self, pred: &CudaSlice<f32>, g: f32, out: &mut CudaSlice<f32>) -> Result<(), GpuError> {
        let n = out.len();
        if pred.len() != 2 * n {
            return Err(GpuError::Shape(format!(
                "combine: prediction {} is not 2 × {n}",
                pred.len()
            )));
        }
        let n32 = n as u32;
        let mut b = self.stream.launch_builder(&self.combine);
        b.arg(pred).arg(&g).arg(out).arg(&n32);
        unsafe { b.launch(cfg(n)) }?;
        Ok(())
    }

    /// `dst += s · src`.
    pub fn axpy(&self, dst: &mut CudaSlice<f32>, src: &CudaSlice<f32>, s: f32) -> Result<(), GpuError> {
        if dst.len() != src.len() {
            return Err(GpuError::Shape(format!("axpy: {} vs {}", dst.len(), src.len())));
        }
        let n = dst.len() as u32;
        let mut b = self.stream.launch_builder(&self.axpy);
        b.arg(dst).arg(src).arg(&s).arg(&n);
        unsafe { b.launch(cfg(n as usize)) }?;
        Ok(())
    }

    /// `out = [s·src; …]` (`copies` times).
    pub fn scale(
        &self,
        src: &CudaSlice<f32>,
        s: f32,
        out: &mut CudaSlice<f32>,
        copies: usize,
    ) -> Result<(), GpuError> {
        if out.len() != src.len() * copies {
            return Err(GpuError::Shape(format!(
                "scale: out {} is not {copies} × {}",
                out.len(),
                src.len()
            )));
        }
        let (n, k) = (src.len() as u32, copies as u32);
        let mut b = self.stream.launch_builder(&self.scale);
        b.arg(src).arg(&s).arg(out).arg(&n).arg(&k);
        unsafe { b.launch(cfg(n as usize)) }?;
        Ok(())
    }

    /// One Euler step (ε-prediction, no churn) in place, diffusers' arithmetic.
    pub fn euler(
        &self,
        sample: &mut CudaSlice<f32>,
        eps: &CudaSlice<f32>,
        sigma: f32,
        sigma_next: f32,
    ) -> Result<(), GpuError> {
        if sample.len() != eps.len() {
            return Err(GpuError::Shape(format!(
                "euler: {} vs {}",
                sample.len(),
                eps.len()
            )));
        }
        let n = sample.len() as u32;
        let mut b = self.stream.launch_builder(&self.euler);
        b.arg(sample).arg(eps).arg(&sigma).arg(&sigma_next).arg(&n);
        unsafe { b.launch(cfg(n as usize)) }?;
        Ok(())
    }

    /// Merges every layer of a LoRA set (f32 weights) in one launch on this object's stream.
    pub fn lora_merge(&self, layers: &[GpuMergeLayer<'_, f32>]) -> Result<(), GpuError> {
        self.lora_merge_with(layers, MergeKernel::Tiled)
    }

    /// Merges every layer of a LoRA set (fp16 weights as u16 bit patterns) in one launch.
    pub fn lora_merge_f16(&self, layers: &[GpuMergeLayer<'_, u16>]) -> Result<(), GpuError> {
        self.lora_merge_with(layers, MergeKernel::Tiled)
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
        if kernel == MergeKernel::Mma && !self.has_mma {
            return Err(GpuError::Unsupported(
                "lora_merge: the mma kernel needs compute capability 8.0 or newer".into(),
            ));
        }
        let s = &self.stream;
        let shape = |m: String| GpuError::Shape(format!("lora_merge: {m}"));
        let mut guards = Vec::new();
        let (mut layer_ptrs, mut dims, mut offsets) = (Vec::new(), Vec::new(), Vec::new());
        let (mut factor_ptrs, mut ranks, mut coeffs) = (Vec::new(), Vec::new(), Vec::new());
        // elements (naive) or tiles (tiled) before each layer
        let mut total: u64 = 0;
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
            guards.push(gw);
            guards.push(go);
            layer_ptrs.extend([wp, op]);
            let first = ranks.len() as u32;
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
                guards.push(gb);
                guards.push(ga);
                factor_ptrs.extend([bp, ap]);
                ranks.push(f.rank as u32);
                coeffs.push(f.coeff);
            }
            dims.extend([l.rows as u32, l.cols as u32, first, ranks.len() as u32 - first]);
            offsets.push(total);
            total += match kernel {
                MergeKernel::Naive => n as u64,
                MergeKernel::Tiled | MergeKernel::Mma => {
                    (l.rows.div_ceil(MERGE_TILE) * l.cols.div_ceil(MERGE_TILE)) as u64
                }
            };
        }
        if total == 0 {
            return Ok(());
        }
        if factor_ptrs.is_empty() {
            // keep the arrays non-empty for the launch
            factor_ptrs.extend([0u64, 0]);
            ranks.push(0);
            coeffs.push(0.0);
        }
        let (blocks, func) = match kernel {
            MergeKernel::Naive => (
                (total.div_ceil(256)).min(65_535 * 8),
                &self.lora_merge[T::F16 as usize],
            ),
            MergeKernel::Tiled | MergeKernel::Mma => {
                if total > i32::MAX as u64 {
                    return Err(shape(format!("{total} tiles are more than one launch takes")));
                }
                let first = if kernel == MergeKernel::Tiled { 2 } else { 4 };
                (total, &self.lora_merge[first + T::F16 as usize])
            }
        };
        let d_layer_ptrs = s.clone_htod(&layer_ptrs)?;
        let d_dims = s.clone_htod(&dims)?;
        let d_offsets = s.clone_htod(&offsets)?;
        let d_factor_ptrs = s.clone_htod(&factor_ptrs)?;
        let d_ranks = s.clone_htod(&ranks)?;
        let d_coeffs = s.clone_htod(&coeffs)?;
        let n_layers = layers.len() as i32;
        let mut b = s.launch_builder(func);
        b.arg(&d_layer_ptrs)
            .arg(&d_dims)
            .arg(&d_offsets)
            .arg(&n_layers)
            .arg(&d_factor_ptrs)
            .arg(&d_ranks)
            .arg(&d_coeffs)
            .arg(&total);
        let launch = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(launch) }?;
        drop(guards);
        Ok(())
    }

    pub fn synchronize(&self) -> Result<(), GpuError> {
        Ok(self.stream.synchronize()?)
    }

    /// The same compiled kernels on a new stream of the same device (a pipeline's step kernels
    /// must not queue behind a LoRA merge running on the merge stream).
    pub fn fork(&self) -> Result<GpuKernels, GpuError> {
        Ok(GpuKernels {
            ctx: self.ctx.clone(),
            stream: self.ctx.new_stream()?,
            combine: self.combine.clone(),
            axpy: self.axpy.clone(),
            scale: self.scale.clone(),
            euler: self.euler.clone(),
            lora_merge: self.lora_merge.clone(),
            has_mma: self.has_mma,
        })
    }

    /// The GPU these kernels run on.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// `dst += s · src` over `n` f32 at raw device addresses (buffers ONNX Runtime owns).
    ///
    /// # Safety
    /// `dst` and `src` must address `n` live f32 on this object's device, and nothing else may
    /// write them until this stream is synchronised.
    pub unsafe fn axpy_raw(&self, dst: u64, src: u64, s: f32, n: usize) -> Result<(), GpuError> {
        let n32 = n as u32;
        let mut b = self.stream.launch_builder(&self.axpy);
        b.arg(&dst).arg(&src).arg(&s).arg(&n32);
        unsafe { b.launch(cfg(n)) }?;
        Ok(())
    }

    /// `out = uncond + g·(cond − uncond)` of a `[uncond; cond]` prediction at a raw address.
    ///
    /// # Safety
    /// `pred` must address `2 · out.len()` live f32 on this object's device.
    pub unsafe fn combine_raw(&self, pred: u64, g: f32, out: &mut CudaSlice<f32>) -> Result<(), GpuError> {
        let n32 = out.len() as u32;
        let mut b = self.stream.launch_builder(&self.combine);
        b.arg(&pred).arg(&g).arg(out).arg(&n32);
        unsafe { b.launch(cfg(n32 as usize)) }?;
        Ok(())
    }

    /// Copies `bytes` from `src` to `dst` on this stream; either address may be on another GPU
    /// of this process (unified addressing: the driver picks the peer path).
    ///
    /// # Safety
    /// Both must address `bytes` live device bytes; `src` must not change until the copy is done.
    pub unsafe fn copy_raw(&self, dst: u64, src: u64, bytes: usize) -> Result<(), GpuError> {
        self.ctx.bind_to_thread()?;
        unsafe {
            cudarc::driver::sys::cuMemcpyAsync(dst, src, bytes, self.stream.cu_stream()).result()?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "cuda_tests.rs"]
mod tests;
