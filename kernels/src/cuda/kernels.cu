// The CUDA kernels of katz-kernels, compiled at run time with NVRTC (no include path: no
// headers, fp16 through PTX) and launched through cudarc by `GpuKernels` in mod.rs, which loads
// every `extern "C"` function below by name.
//
//   combine   pred[2n] (uncond; cond), g ─▶ out[n]                (classifier-free guidance)
//   axpy      dst += s · src                                       (ControlNet residual sums)
//   scale     out[k·n + i] = s · src[i], k < copies                (scheduler input scale, CFG batch)
//   euler     one Euler step, ε-prediction                         (diffusers' arithmetic)
//   to_f16 / from_f16   f32 ⇄ IEEE fp16 bit patterns               (half-precision residual transport)
//   lora_merge_{naive,tiled,mma}_{f32,f16}: out = W + Σ cᵢ·Bᵢ·Aᵢ over every layer of a LoRA set
//             in one launch (the argument layout is described at "LoRA merge" below)
//
// cuda/tests.rs checks each against its CPU twin in katz-kernels (guidance.rs, residual.rs,
// lora.rs) or, for scale and euler, the same arithmetic on the host in f64.

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
// fp16 <-> f32 of whole buffers: ControlNet residuals in half precision across processes
// (CUDA IPC), half the bytes; rounding to nearest, as the half crate on the host
extern "C" __global__ void to_f16(const float* src, unsigned short* dst, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) dst[i] = f2h(src[i]);
}
extern "C" __global__ void from_f16(const unsigned short* src, float* dst, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) dst[i] = h2f(src[i]);
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

// where merge tile `tile` lies: its layer, the layer's dims (rows, cols, first factor, factor
// count) and the tile's first row and column, for tiles TM rows by TW columns
struct TileAt {
    int l;
    unsigned int rows, cols, f0, nf, r0, c0;
};

template <unsigned int TW>
__device__ __forceinline__ TileAt tile_at(const unsigned int* dims, const unsigned long long* offsets, int n_layers,
                                          unsigned long long tile) {
    TileAt p;
    p.l = find_layer(offsets, n_layers, tile);
    p.rows = dims[4 * p.l];
    p.cols = dims[4 * p.l + 1];
    p.f0 = dims[4 * p.l + 2];
    p.nf = dims[4 * p.l + 3];
    const unsigned int t = (unsigned int)(tile - offsets[p.l]);
    const unsigned int tiles_c = (p.cols + TW - 1) / TW;
    p.r0 = (t / tiles_c) * TM;
    p.c0 = (t % tiles_c) * TW;
    return p;
}

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
// waits until at most n (0 to 3) of this thread's cp.async groups are pending
__device__ __forceinline__ void stage_wait_n(int n) {
#if __CUDA_ARCH__ >= 800
    if (n == 0) asm volatile("cp.async.wait_group 0;" ::: "memory");
    else if (n == 1) asm volatile("cp.async.wait_group 1;" ::: "memory");
    else if (n == 2) asm volatile("cp.async.wait_group 2;" ::: "memory");
    else asm volatile("cp.async.wait_group 3;" ::: "memory");
#endif
}
// waits for this thread's copies, all of them (all = true) or all but the last committed group
__device__ __forceinline__ void stage_wait(bool all) { stage_wait_n(all ? 0 : 1); }

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
    const TileAt at = tile_at<TN>(dims, offsets, n_layers, blockIdx.x);
    const int l = at.l;
    const unsigned int rows = at.rows, cols = at.cols, f0 = at.f0, nf = at.nf, r0 = at.r0, c0 = at.c0;
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

// out = W + scale·acc over one warp's MT×4 mma tiles of 16×8 (m16n8 accumulator layout): rows
// row0 + mt·16 + g (+8), columns col0 + nt·8 + 2·t4 (+1) of layer l, clipped to the layer. The
// weights of G row tiles are all loaded before any is stored (W and out may be one buffer, so the
// compiler could not reorder them): one memory latency per group of two row tiles instead of one
// per pair (a group holds 32 registers).
template <typename T, int MT>
__device__ __forceinline__ void add_to_weights(const float (&acc)[MT][4][4], float scale,
                                               const unsigned long long* layer_ptrs, int l, unsigned int rows,
                                               unsigned int cols, unsigned int row0, unsigned int col0, int g,
                                               int t4) {
    const T* W = (const T*)layer_ptrs[2 * l];
    T* O = (T*)layer_ptrs[2 * l + 1];
    const bool vec = (cols % 2 == 0) &&
                     (((layer_ptrs[2 * l] | layer_ptrs[2 * l + 1]) % (2 * sizeof(T))) == 0);
    constexpr int G = MT < 2 ? MT : 2;
#pragma unroll
    for (int m0 = 0; m0 < MT; m0 += G) {
        float2 w[G][2][4];
#pragma unroll
        for (int mt = 0; mt < G; mt++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const unsigned int r = row0 + (m0 + mt) * 16 + g + 8 * h;
#pragma unroll
                for (int nt = 0; nt < 4; nt++) {
                    const unsigned int c = col0 + nt * 8 + 2 * t4;
                    const unsigned long long e = (unsigned long long)r * cols + c;
                    w[mt][h][nt] = make_float2(0.0f, 0.0f);
                    if (r >= rows || c >= cols) continue;
                    if (vec) w[mt][h][nt] = load2(W, e);
                    else w[mt][h][nt] = make_float2(load1(W, e), c + 1 < cols ? load1(W, e + 1) : 0.0f);
                }
            }
#pragma unroll
        for (int mt = 0; mt < G; mt++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const unsigned int r = row0 + (m0 + mt) * 16 + g + 8 * h;
                if (r >= rows) continue;
#pragma unroll
                for (int nt = 0; nt < 4; nt++) {
                    const unsigned int c = col0 + nt * 8 + 2 * t4;
                    if (c >= cols) continue;
                    const unsigned long long e = (unsigned long long)r * cols + c;
                    float2 v = w[mt][h][nt];
                    v.x += scale * acc[m0 + mt][nt][2 * h];
                    v.y += scale * acc[m0 + mt][nt][2 * h + 1];
                    if (vec) {
                        store2(O, e, v);
                    } else {
                        store1(O, e, v.x);
                        if (c + 1 < cols) store1(O, e + 1, v.y);
                    }
                }
            }
    }
}

// acc ·= q (the accumulator moved to another factor's coefficient)
template <int MT>
__device__ __forceinline__ void scale_acc(float (&acc)[MT][4][4], float q) {
#pragma unroll
    for (int i = 0; i < MT; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] *= q;
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
    const TileAt at = tile_at<TN>(dims, offsets, n_layers, blockIdx.x);
    const int l = at.l;
    const unsigned int rows = at.rows, cols = at.cols, f0 = at.f0, nf = at.nf, r0 = at.r0, c0 = at.c0;
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

    add_to_weights<T, 4>(acc, 1.0f, layer_ptrs, l, rows, cols, r0 + wm * 64, c0 + wn * 32, g, t4);
#else
    __trap();  // the host launches this kernel only on sm_80 and newer
#endif
}

// fp16 tensor cores (sm_80+): mma.sync m16n8k16 on fp16 operands with f32 accumulation, on tiles
// of TM×HN (8 warps as 4×2, each 32×32 of 2×4 mma tiles: few enough registers for two blocks per
// SM, so one block's W/out traffic overlaps the other's arithmetic). The f32 factors are rounded
// to fp16 as they are staged: exact where they are fp16 values (fp16 LoRA files), about 2^-12
// relative otherwise. The coefficients stay out of the fp16 operands: a layer's factors are taken
// one after the other and the accumulator holds Σ (coeff_f / coeff_cur)·B_f·A_f, rescaled in f32
// when the factor changes, times coeff_cur at the end. Chunks of HK ranks: B's [TM × HK] as
// Hb[row][k], A's [HK × HN] transposed as Ha[col][k], fp16 pairs along k with a padded stride
// (fragment reads free of bank conflicts). The next chunk is loaded (into registers, as fp16
// pairs) while this one multiplies.
#define HK 32
#define HN 64
#define HS (HK / 2 + 4)  // row stride in 32-bit words (fp16 pairs)
#if __CUDA_ARCH__ >= 800
__device__ __forceinline__ void mma_f16(float* d, const unsigned int* a, unsigned int b0, unsigned int b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// one staged chunk of KW words (fp16 pairs along k) on a warp's MT×4 tiles: the A operand from
// rows row0 + mt·16 + g (+8) of Hb, the B operand from rows (columns of the output) col0 + nt·8 + g
// of Ha, both with a row stride of SW words; k-steps of 16 (8 words)
template <int MT, int KW, int SW>
__device__ __forceinline__ void mma_chunk(float (&acc)[MT][4][4], const unsigned int* Hb, const unsigned int* Ha,
                                          int row0, int col0, int g, int t4) {
#pragma unroll
    for (int kb = 0; kb < KW; kb += 8) {
        unsigned int bf[4][2];
#pragma unroll
        for (int nt = 0; nt < 4; nt++) {
            const int col = col0 + nt * 8 + g;
            bf[nt][0] = Ha[col * SW + kb + t4];
            bf[nt][1] = Ha[col * SW + kb + t4 + 4];
        }
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            const int row = row0 + mt * 16 + g;
            const unsigned int af[4] = {Hb[row * SW + kb + t4], Hb[(row + 8) * SW + kb + t4],
                                        Hb[row * SW + kb + t4 + 4], Hb[(row + 8) * SW + kb + t4 + 4]};
#pragma unroll
            for (int nt = 0; nt < 4; nt++) mma_f16(acc[mt][nt], af, bf[nt][0], bf[nt][1]);
        }
    }
}
#endif

// this thread's 8 pairs of B and 4 pairs of A of chunk (f, k0), as fp16 pairs, zeros outside
__device__ __forceinline__ void load_h16_chunk(unsigned int (&vb)[8], unsigned int (&va)[4], const unsigned long long* factor_ptrs,
                                               const unsigned int* ranks, unsigned int f, unsigned int k0,
                                               unsigned int r0, unsigned int c0, unsigned int rows,
                                               unsigned int cols, int tid) {
    const float* B = (const float*)factor_ptrs[2 * f];
    const float* A = (const float*)factor_ptrs[2 * f + 1];
    const unsigned int rank = ranks[f];
#pragma unroll
    for (int u = 0; u < (TM * HK / 2) / 256; u++) {
        const int p = tid + 256 * u;                  // pair p of TM × HK/2, k fastest
        const unsigned int r = r0 + p / (HK / 2), k = k0 + 2 * (p % (HK / 2));
        const bool okr = r < rows;
        const unsigned long long i = (unsigned long long)r * rank + k;
        vb[u] = f2h2(okr && k < rank ? B[i] : 0.0f, okr && k + 1 < rank ? B[i + 1] : 0.0f);
    }
#pragma unroll
    for (int u = 0; u < (HN * HK / 2) / 256; u++) {
        const int p = tid + 256 * u;                  // pair p of HK/2 × HN, columns fastest
        const unsigned int c = c0 + p % HN, k = k0 + 2 * (p / HN);
        const bool okc = c < cols;
        const unsigned long long i = (unsigned long long)k * cols + c;
        va[u] = f2h2(okc && k < rank ? A[i] : 0.0f, okc && k + 1 < rank ? A[i + cols] : 0.0f);
    }
}

template <typename T>
__device__ __forceinline__ void merge_h16(const unsigned long long* layer_ptrs, const unsigned int* dims,
                                          const unsigned long long* offsets, int n_layers,
                                          const unsigned long long* factor_ptrs, const unsigned int* ranks,
                                          const float* coeffs) {
#if __CUDA_ARCH__ >= 800
    __shared__ unsigned int Hb[TM][HS], Ha[HN][HS];
    const TileAt at = tile_at<HN>(dims, offsets, n_layers, blockIdx.x);
    const int l = at.l;
    const unsigned int rows = at.rows, cols = at.cols, f0 = at.f0, nf = at.nf, r0 = at.r0, c0 = at.c0;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1, g = lane >> 2, t4 = lane & 3;

    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int q = 0; q < 4; q++) acc[i][j][q] = 0.0f;

    // the factors with a coefficient (a zero one adds nothing, and could not be divided by)
    unsigned int f = f0;
    while (f < f0 + nf && coeffs[f] == 0.0f) f++;
    float cur = f < f0 + nf ? coeffs[f] : 0.0f;
    unsigned int k0 = 0;
    unsigned int vb[(TM * HK / 2) / 256], va[(HN * HK / 2) / 256];
    if (f < f0 + nf) load_h16_chunk(vb, va, factor_ptrs, ranks, f, k0, r0, c0, rows, cols, tid);
    while (f < f0 + nf) {
        __syncthreads();  // every warp is done with the previous chunk
#pragma unroll
        for (int u = 0; u < (TM * HK / 2) / 256; u++) {
            const int p = tid + 256 * u;
            Hb[p / (HK / 2)][p % (HK / 2)] = vb[u];
        }
#pragma unroll
        for (int u = 0; u < (HN * HK / 2) / 256; u++) {
            const int p = tid + 256 * u;
            Ha[p % HN][p / HN] = va[u];
        }
        __syncthreads();
        // the next chunk: the same factor's next ranks, or the next factor with a coefficient
        unsigned int fn = f, kn = k0 + HK;
        if (kn >= ranks[f]) {
            kn = 0;
            fn = f + 1;
            while (fn < f0 + nf && coeffs[fn] == 0.0f) fn++;
        }
        if (fn < f0 + nf) load_h16_chunk(vb, va, factor_ptrs, ranks, fn, kn, r0, c0, rows, cols, tid);
        mma_chunk<2, HK / 2, HS>(acc, &Hb[0][0], &Ha[0][0], wm * 32, wn * 32, g, t4);
        if (fn != f && fn < f0 + nf) {  // the accumulator in units of the next coefficient
            scale_acc(acc, cur / coeffs[fn]);
            cur = coeffs[fn];
        }
        f = fn;
        k0 = kn;
    }

    add_to_weights<T, 2>(acc, cur, layer_ptrs, l, rows, cols, r0 + wm * 32, c0 + wn * 32, g, t4);
#else
    __trap();  // the host launches this kernel only on sm_80 and newer
#endif
}

// Packed fp16 factors: each factor's B and A as fp16, k-contiguous for both operands — Bp[row][seg]
// and Ap[col][seg] (A transposed) — with its ranks padded to seg, a multiple of PK (zeros), so the
// merge copies whole chunks into shared memory by cp.async and reads no f32 factor. A worker packs
// a LoRA once, when it is uploaded; a merge of unpacked factors packs them into scratch first. A
// pack job is one factor's B or A; blocks of 32×8 threads move 32×32 tiles (A through shared
// memory, transposed).
#define PK 32
// one job: src, dst (the packed matrix's first row), n (rows of B / cols of A), rank, kpad, kseg,
// transposed (A), cols (A's row length)
#define PACK_FIELDS 8
extern "C" __global__ void __launch_bounds__(256) pack_factors_f16(const unsigned long long* jobs,
                                                                  const unsigned long long* tile_offsets,
                                                                  int n_jobs) {
    __shared__ float T[32][33];
    const unsigned long long tile = blockIdx.x;
    const int j = find_layer(tile_offsets, n_jobs, tile);
    const unsigned long long* d = jobs + PACK_FIELDS * j;
    const float* src = (const float*)d[0];
    unsigned short* dst = (unsigned short*)d[1];
    const unsigned int n = (unsigned int)d[2], rank = (unsigned int)d[3], kpad = (unsigned int)d[4],
                       kseg = (unsigned int)d[5], cols = (unsigned int)d[7];
    const bool transposed = d[6] != 0;
    const unsigned int seg = (rank + PK - 1) / PK * PK;  // the padded segment
    const unsigned int t = (unsigned int)(tile - tile_offsets[j]);
    const unsigned int tiles_k = seg / 32;
    const unsigned int o0 = (t / tiles_k) * 32, k0 = (t % tiles_k) * 32;  // outer (row / col), k
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
    if (!transposed) {  // B [n][rank] → Bp[o][kseg + k], both along k
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const unsigned int o = o0 + ty + 8 * i, k = k0 + tx;
            if (o >= n) continue;
            const float v = k < rank ? src[(unsigned long long)o * rank + k] : 0.0f;
            dst[(unsigned long long)o * kpad + kseg + k] = f2h(v);
        }
    } else {  // A [rank][cols] → Ap[c][kseg + k]: read along c, write along k
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const unsigned int k = k0 + ty + 8 * i, c = o0 + tx;
            T[ty + 8 * i][tx] = (k < rank && c < n) ? src[(unsigned long long)k * cols + c] : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const unsigned int c = o0 + ty + 8 * i, k = k0 + tx;
            if (c < n) dst[(unsigned long long)c * kpad + kseg + k] = f2h(T[tx][ty + 8 * i]);
        }
    }
}

// The merge on packed factors: tiles of TM×TN, 8 warps as 2×4 (64×32 each, 4×4 mma m16n8k16
// tiles), chunks of PK ranks double-buffered in shared memory by cp.async (16 bytes a copy; rows
// padded to PS halves: 16-byte aligned, fragment reads free of bank conflicts). Coefficients as in
// merge_h16: the accumulator in units of the current factor's, rescaled in f32 between factors.
#define PS (PK + 8)
#if __CUDA_ARCH__ >= 800
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool ok) {
    unsigned int d;
    asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(d) : "l"(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(d), "l"(src), "r"(ok ? 16 : 0) : "memory");
}
#endif

// chunk at packed rank k of the layer into stage (Bs, As): 128 rows of Bp and 128 rows of Ap,
// 32 halves (64 bytes, 4 copies) each; rows past the layer are zero-filled
__device__ __forceinline__ void issue_chunk(unsigned short (*Bs)[PS], unsigned short (*As)[PS],
                                            const unsigned short* Bp, const unsigned short* Ap,
                                            unsigned int kpad, unsigned int k, unsigned int r0,
                                            unsigned int c0, unsigned int rows, unsigned int cols, int tid) {
#if __CUDA_ARCH__ >= 800
#pragma unroll
    for (int u = 0; u < 2; u++) {
        const int e = tid + 256 * u;  // 512 copies of B: row e / 4, quarter e % 4
        const unsigned int r = e >> 2, q = (e & 3) * 8;
        const bool ok = r0 + r < rows;
        cp_async16(&Bs[r][q], ok ? Bp + (unsigned long long)(r0 + r) * kpad + k + q : Bp, ok);
    }
#pragma unroll
    for (int u = 0; u < 2; u++) {
        const int e = tid + 256 * u;
        const unsigned int c = e >> 2, q = (e & 3) * 8;
        const bool ok = c0 + c < cols;
        cp_async16(&As[c][q], ok ? Ap + (unsigned long long)(c0 + c) * kpad + k + q : Ap, ok);
    }
#endif
}
// the same, as one cp.async group of its own
__device__ __forceinline__ void stage_packed(unsigned short (*Bs)[PS], unsigned short (*As)[PS],
                                             const unsigned short* Bp, const unsigned short* Ap,
                                             unsigned int kpad, unsigned int k, unsigned int r0,
                                             unsigned int c0, unsigned int rows, unsigned int cols, int tid) {
    issue_chunk(Bs, As, Bp, Ap, kpad, k, r0, c0, rows, cols, tid);
    stage_commit();
}

// The fp16 weight tile of a packed merge, staged in dynamic shared memory past the chunk stages
// (WS halves a row, 16-byte aligned) while the factors multiply: its DRAM read overlaps the
// tensor-core work, and the sum leaves through shared memory in whole 16-byte rows.
#define WS (TN + 8)
extern __shared__ __align__(16) unsigned short merge_dyn[];

// this block's TM×TN tile of W (fp16, cols a multiple of 8, 16-byte aligned) into Ws, zeros
// outside the layer: one cp.async group
// Rows are copied in 8 bands of 16 (band u: rows 16u … 16u + 15); [u0, u1) picks bands, no commit.
#define W_BANDS ((TM * TN / 8) / 256)
__device__ __forceinline__ void issue_weight_bands(unsigned short* Ws, const unsigned short* W, unsigned int r0,
                                                   unsigned int c0, unsigned int rows, unsigned int cols, int tid,
                                                   int u0, int u1) {
#if __CUDA_ARCH__ >= 800
#pragma unroll
    for (int u = 0; u < W_BANDS; u++) {
        if (u < u0 || u >= u1) continue;
        const int e = tid + 256 * u;  // row e / (TN/8), 8 halves at (e % (TN/8)) · 8
        const unsigned int r = e / (TN / 8), q = (e % (TN / 8)) * 8;
        const bool ok = r0 + r < rows && c0 + q < cols;
        cp_async16(Ws + r * WS + q, ok ? W + (unsigned long long)(r0 + r) * cols + c0 + q : W, ok);
    }
#endif
}
__device__ __forceinline__ void stage_weights(unsigned short* Ws, const unsigned short* W, unsigned int r0,
                                              unsigned int c0, unsigned int rows, unsigned int cols, int tid) {
    issue_weight_bands(Ws, W, r0, c0, rows, cols, tid, 0, W_BANDS);
    stage_commit();
}

// out = Ws + cur·acc (Ws: the tile's weights, complete and visible to every thread), through Ws
// in place, then out in whole 16-byte pieces of rows
__device__ __forceinline__ void epilogue_staged(const float (&acc)[4][4][4], float cur, unsigned short* O,
                                                unsigned int rows, unsigned int cols, unsigned int r0,
                                                unsigned int c0, int wm, int wn, int g, int t4, int tid,
                                                unsigned short* Ws) {
#if __CUDA_ARCH__ >= 800
#pragma unroll
    for (int mt = 0; mt < 4; mt++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int r = wm * 64 + mt * 16 + g + 8 * h;
#pragma unroll
            for (int nt = 0; nt < 4; nt++) {
                unsigned int* p = (unsigned int*)(Ws + r * WS + wn * 32 + nt * 8 + 2 * t4);
                const unsigned int u = *p;
                const float x = h2f((unsigned short)(u & 0xffffu)) + cur * acc[mt][nt][2 * h];
                const float y = h2f((unsigned short)(u >> 16)) + cur * acc[mt][nt][2 * h + 1];
                *p = f2h2(x, y);
            }
        }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < (TM * TN / 8) / 256; u++) {  // whole 16-byte pieces of rows out
        const int e = tid + 256 * u;
        const unsigned int r = e / (TN / 8), q = (e % (TN / 8)) * 8;
        if (r0 + r < rows && c0 + q < cols)
            *(uint4*)(O + (unsigned long long)(r0 + r) * cols + c0 + q) = *(const uint4*)(Ws + r * WS + q);
    }
#endif
}

// out = W + cur·acc for a packed merge's TM×TN tile (8 warps as 2×4, 64×32 each): through the
// weight tile staged in Ws (its cp.async group not yet waited for), or from global memory
template <typename T>
__device__ __forceinline__ void packed_epilogue(const float (&acc)[4][4][4], float cur,
                                                const unsigned long long* layer_ptrs, int l, unsigned int rows,
                                                unsigned int cols, unsigned int r0, unsigned int c0, int wm, int wn,
                                                int g, int t4, int tid, bool wstaged, unsigned short* Ws) {
#if __CUDA_ARCH__ >= 800
    if (!wstaged) {
        add_to_weights<T, 4>(acc, cur, layer_ptrs, l, rows, cols, r0 + wm * 64, c0 + wn * 32, g, t4);
        return;
    }
    stage_wait_n(0);
    __syncthreads();  // every thread's part of the weight tile is in shared memory
    epilogue_staged(acc, cur, (unsigned short*)layer_ptrs[2 * l + 1], rows, cols, r0, c0, wm, wn, g, t4, tid, Ws);
#endif
}

// The merge on packed factors: tiles of TM×TN, 8 warps as 2×4 (64×32 each, 4×4 mma m16n8k16
// tiles), chunks of PK ranks in a ring of NST stages in dynamic shared memory (rows padded to PS
// halves: 16-byte aligned, fragment reads free of bank conflicts), then the fp16 weight tile
// (host: chunk_smem_bytes). Chunks are issued NST - 1 ahead by cp.async, so the L2 latency of a
// chunk hides behind the tensor-core work on the ones before it: one group per chunk (empty past
// the last, to keep the count uniform), the weight tile's group after the first NST - 1 chunks.
// Coefficients as in merge_h16: the accumulator in units of the current factor's, rescaled in f32
// between factors. layer_ptrs: W, out per layer; dims: rows, cols, f0, nf; packed: Bp, Ap per
// factor; ranks and coeffs per factor. NST = 2 (mma-f16-packed): three stages measured slower
// (6.79 against 5.90 ms for two rank-64 LoRAs over SDXL on an H100, docs/measurements.md run O).
#define STAGE_HALVES (2 * TM * PS)
template <typename T, int NST>
__device__ __forceinline__ void merge_chunks(const unsigned long long* layer_ptrs, const unsigned int* dims,
                                                const unsigned long long* offsets, int n_layers,
                                                const unsigned long long* packed, const unsigned int* ranks,
                                                const float* coeffs, int stage_w) {
#if __CUDA_ARCH__ >= 800
    const TileAt at = tile_at<TN>(dims, offsets, n_layers, blockIdx.x);
    const int l = at.l;
    const unsigned int rows = at.rows, cols = at.cols, f0 = at.f0, nf = at.nf, r0 = at.r0, c0 = at.c0;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 2, wn = warp & 3, g = lane >> 2, t4 = lane & 3;
    unsigned short* Ws = merge_dyn + NST * STAGE_HALVES;

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int q = 0; q < 4; q++) acc[i][j][q] = 0.0f;

#define SEG(f) ((ranks[f] + PK - 1) / PK * PK)
#define BS(st) ((unsigned short (*)[PS])(merge_dyn + (st) * STAGE_HALVES))
#define AS(st) ((unsigned short (*)[PS])(merge_dyn + (st) * STAGE_HALVES + TM * PS))
    // the chunk after (f, k): this factor's next ranks, or the next factor with a coefficient
#define ADVANCE(f, k)                                              \
    do {                                                           \
        k += PK;                                                   \
        if (k >= SEG(f)) {                                         \
            k = 0;                                                 \
            f++;                                                   \
            while (f < f0 + nf && coeffs[f] == 0.0f) f++;          \
        }                                                          \
    } while (0)
#define ISSUE(st, f, k)                                                                                  \
    do {                                                                                                 \
        if (f < f0 + nf)                                                                                 \
            stage_packed(BS(st), AS(st), (const unsigned short*)packed[2 * (f)],                          \
                         (const unsigned short*)packed[2 * (f) + 1], SEG(f), k, r0, c0, rows, cols, tid); \
        else                                                                                             \
            stage_commit();                                                                              \
    } while (0)
    unsigned int fc = f0;  // the chunk computed next
    while (fc < f0 + nf && coeffs[fc] == 0.0f) fc++;
    unsigned int kc = 0;
    float cur = fc < f0 + nf ? coeffs[fc] : 0.0f;
    unsigned int fi = fc, ki = 0;  // the chunk issued next
#pragma unroll
    for (int st = 0; st < NST - 1; st++) {
        ISSUE(st, fi, ki);
        if (fi < f0 + nf) ADVANCE(fi, ki);
    }
    const bool wstaged = sizeof(T) == 2 && stage_w && cols % 8 == 0 &&
                         ((layer_ptrs[2 * l] | layer_ptrs[2 * l + 1]) % 16) == 0;
    if (wstaged) stage_weights(Ws, (const unsigned short*)layer_ptrs[2 * l], r0, c0, rows, cols, tid);
    int i = 0;
    while (fc < f0 + nf) {
        ISSUE((i + NST - 1) % NST, fi, ki);  // into the stage computed in the last iteration
        if (fi < f0 + nf) ADVANCE(fi, ki);
        // chunk i landed: younger groups may stay pending, NST - 1 chunks and, for the first
        // NST - 1 chunks, the weight tile
        stage_wait_n(NST - 1 + (wstaged && i < NST - 1 ? 1 : 0));
        __syncthreads();
        mma_chunk<4, PK / 2, PS / 2>(acc, (const unsigned int*)BS(i % NST), (const unsigned int*)AS(i % NST),
                                     wm * 64, wn * 32, g, t4);
        __syncthreads();  // every warp is done with stage i % NST before it is issued into again
        unsigned int fn = fc, kn = kc;
        ADVANCE(fn, kn);
        if (fn != fc && fn < f0 + nf) {  // the accumulator in units of the next coefficient
            scale_acc(acc, cur / coeffs[fn]);
            cur = coeffs[fn];
        }
        fc = fn;
        kc = kn;
        i++;
    }
#undef ISSUE
#undef ADVANCE
#undef AS
#undef BS
#undef SEG
    packed_epilogue<T>(acc, cur, layer_ptrs, l, rows, cols, r0, c0, wm, wn, g, t4, tid, wstaged, Ws);
#else
    __trap();  // the host launches this kernel only on sm_80 and newer
#endif
}

#define PACKED_ARGS const unsigned long long* layer_ptrs, const unsigned int* dims, \
    const unsigned long long* offsets, int n_layers, const unsigned long long* packed, \
    const unsigned int* ranks, const float* coeffs, int stage_w
extern "C" __global__ void __launch_bounds__(256, 2) lora_merge_packed_f32(PACKED_ARGS) {
    merge_chunks<float, 2>(layer_ptrs, dims, offsets, n_layers, packed, ranks, coeffs, stage_w);
}
extern "C" __global__ void __launch_bounds__(256, 2) lora_merge_packed_f16(PACKED_ARGS) {
    merge_chunks<unsigned short, 2>(layer_ptrs, dims, offsets, n_layers, packed, ranks, coeffs, stage_w);
}

// The persistent packed merge (mma-f16-persistent): two blocks per SM walk the tiles (tile +=
// gridDim.x) with two weight buffers. While a tile's chunks multiply, the next tile's weights
// load into the other buffer, one band of rows with each chunk (in that chunk's cp.async group),
// and the next tile's first chunk with this tile's last: a tile's DRAM read overlaps the
// tensor-core work of the tile before it instead of following it (in mma-f16-packed, the merge
// time is the memory time plus the chunk time). Same numbers as mma-f16-packed; f32 weights go
// through global memory as there. Dynamic shared memory: two chunk stages, then (fp16) two
// weight tiles (host: persistent_smem_bytes).
struct PackedTile : TileAt {
    bool staged;  // the weights go through shared memory
};

__device__ __forceinline__ bool packed_tile(PackedTile& p, const unsigned long long* layer_ptrs,
                                            const unsigned int* dims, const unsigned long long* offsets,
                                            int n_layers, unsigned long long tile, unsigned long long total,
                                            bool f16) {
    if (tile >= total) return false;
    static_cast<TileAt&>(p) = tile_at<TN>(dims, offsets, n_layers, tile);
    p.staged = f16 && p.cols % 8 == 0 && ((layer_ptrs[2 * p.l] | layer_ptrs[2 * p.l + 1]) % 16) == 0;
    return true;
}

template <typename T>
__device__ __forceinline__ void merge_persistent(const unsigned long long* layer_ptrs, const unsigned int* dims,
                                                 const unsigned long long* offsets, int n_layers,
                                                 const unsigned long long* packed, const unsigned int* ranks,
                                                 const float* coeffs, unsigned long long total) {
#if __CUDA_ARCH__ >= 800
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 2, wn = warp & 3, g = lane >> 2, t4 = lane & 3;
    const bool f16 = sizeof(T) == 2;
    unsigned short* wbuf = merge_dyn + 2 * STAGE_HALVES;  // two tiles of TM × WS halves
#define SEG(f) ((ranks[f] + PK - 1) / PK * PK)
#define BS(st) ((unsigned short (*)[PS])(merge_dyn + (st) * STAGE_HALVES))
#define AS(st) ((unsigned short (*)[PS])(merge_dyn + (st) * STAGE_HALVES + TM * PS))
#define SKIP(f, p) while ((f) < (p).f0 + (p).nf && (coeffs[f] == 0.0f || ranks[f] == 0)) (f)++
#define ADVANCE(f, k, p)           \
    do {                           \
        k += PK;                   \
        if (k >= SEG(f)) {         \
            k = 0;                 \
            f++;                   \
            SKIP(f, p);            \
        }                          \
    } while (0)
#define ISSUE(st, f, k, p)                                                                                  \
    issue_chunk(BS(st), AS(st), (const unsigned short*)packed[2 * (f)], (const unsigned short*)packed[2 * (f) + 1], \
                SEG(f), k, (p).r0, (p).c0, (p).rows, (p).cols, tid)
    unsigned long long tile = blockIdx.x;
    PackedTile cur, nxt;
    if (!packed_tile(cur, layer_ptrs, dims, offsets, n_layers, tile, total, f16)) return;
    int b = 0, st = 0;  // cur's weight buffer; the stage of the chunk computed next
    {  // cur's weights and first chunk: one group
        if (cur.staged)
            issue_weight_bands(wbuf, (const unsigned short*)layer_ptrs[2 * cur.l], cur.r0, cur.c0, cur.rows,
                               cur.cols, tid, 0, W_BANDS);
        unsigned int f = cur.f0;
        SKIP(f, cur);
        if (f < cur.f0 + cur.nf) ISSUE(0, f, 0u, cur);
        stage_commit();
    }
    float acc[4][4][4];
    for (;;) {
        const bool more = packed_tile(nxt, layer_ptrs, dims, offsets, n_layers, tile + gridDim.x, total, f16);
        unsigned short* wnext = wbuf + (b ^ 1) * TM * WS;
        // cur's chunks: how many, and the first
        unsigned int n = 0;
        for (unsigned int f = cur.f0; f < cur.f0 + cur.nf; f++)
            if (coeffs[f] != 0.0f) n += SEG(f) / PK;  // (SEG is 0 for a rank of 0)
        unsigned int fc = cur.f0, kc = 0;
        SKIP(fc, cur);
        float c = fc < cur.f0 + cur.nf ? coeffs[fc] : 0.0f;
        unsigned int fi = fc, ki = 0;  // the chunk issued next (after the first, issued already)
        if (n > 0) ADVANCE(fi, ki, cur);
        unsigned int fx = 0;  // nxt's first chunk
        if (more) {
            fx = nxt.f0;
            SKIP(fx, nxt);
        }
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++)
#pragma unroll
                for (int q = 0; q < 4; q++) acc[i][j][q] = 0.0f;
        for (unsigned int i = 0; i < n; i++) {
            // into the other stage: cur's next chunk, or after its last nxt's first; and a band of
            // nxt's weights
            if (i + 1 < n) {
                ISSUE(st ^ 1, fi, ki, cur);
                ADVANCE(fi, ki, cur);
            } else if (more && fx < nxt.f0 + nxt.nf) {
                ISSUE(st ^ 1, fx, 0u, nxt);
            }
            if (more && nxt.staged)
                issue_weight_bands(wnext, (const unsigned short*)layer_ptrs[2 * nxt.l], nxt.r0, nxt.c0, nxt.rows,
                                   nxt.cols, tid, (int)(i * W_BANDS / n), (int)((i + 1) * W_BANDS / n));
            stage_commit();
            stage_wait_n(1);  // chunk i (and every older group: cur's weights among them) is in
            __syncthreads();
            mma_chunk<4, PK / 2, PS / 2>(acc, (const unsigned int*)BS(st), (const unsigned int*)AS(st), wm * 64,
                                         wn * 32, g, t4);
            __syncthreads();  // stage st is free for the next issue
            st ^= 1;
            unsigned int fn = fc, kn = kc;
            ADVANCE(fn, kn, cur);
            if (fn != fc && fn < cur.f0 + cur.nf) {  // the accumulator in units of the next coefficient
                scale_acc(acc, c / coeffs[fn]);
                c = coeffs[fn];
            }
            fc = fn;
            kc = kn;
        }
        if (n == 0) {  // nothing multiplies here: nxt's weights and first chunk now
            if (more && nxt.staged)
                issue_weight_bands(wnext, (const unsigned short*)layer_ptrs[2 * nxt.l], nxt.r0, nxt.c0, nxt.rows,
                                   nxt.cols, tid, 0, W_BANDS);
            if (more && fx < nxt.f0 + nxt.nf) ISSUE(st, fx, 0u, nxt);
            stage_commit();
            stage_wait_n(1);  // cur's weights are in
            __syncthreads();
        }
        if (cur.staged)
            epilogue_staged(acc, c, (unsigned short*)layer_ptrs[2 * cur.l + 1], cur.rows, cur.cols, cur.r0, cur.c0,
                            wm, wn, g, t4, tid, wbuf + b * TM * WS);
        else
            add_to_weights<T, 4>(acc, c, layer_ptrs, cur.l, cur.rows, cur.cols, cur.r0 + wm * 64, cur.c0 + wn * 32,
                                 g, t4);
        __syncthreads();  // cur's weight buffer is free: nxt's successor loads into it
        if (!more) break;
        cur = nxt;
        tile += gridDim.x;
        b ^= 1;
    }
    stage_wait_n(0);
#undef ISSUE
#undef ADVANCE
#undef SKIP
#undef AS
#undef BS
#undef SEG
#else
    __trap();  // the host launches this kernel only on sm_80 and newer
#endif
}

#define PERSISTENT_ARGS PACKED_ARGS, unsigned long long total
extern "C" __global__ void __launch_bounds__(256, 2) lora_merge_persistent_f32(PERSISTENT_ARGS) {
    merge_persistent<float>(layer_ptrs, dims, offsets, n_layers, packed, ranks, coeffs, total);
}
extern "C" __global__ void __launch_bounds__(256, 2) lora_merge_persistent_f16(PERSISTENT_ARGS) {
    merge_persistent<unsigned short>(layer_ptrs, dims, offsets, n_layers, packed, ranks, coeffs, total);
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
extern "C" __global__ void __launch_bounds__(256, 2) lora_merge_h16_f32(MERGE_ARGS) {
    merge_h16<float>(layer_ptrs, dims, offsets, n_layers, factor_ptrs, ranks, coeffs);
}
extern "C" __global__ void __launch_bounds__(256, 2) lora_merge_h16_f16(MERGE_ARGS) {
    merge_h16<unsigned short>(layer_ptrs, dims, offsets, n_layers, factor_ptrs, ranks, coeffs);
}
