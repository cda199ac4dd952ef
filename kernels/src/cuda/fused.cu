// The fp16 kernels of katz's own operators (`FusedKernels` in fused.rs): where ONNX Runtime's CUDA
// kernel for an operator of the UNet's step is slower than it need be, the step graph names
// katz's instead (tools/katz_ops.py). Compiled at run time with NVRTC; no headers, fp16 through PTX.
//
//   geglu_f16   out = fp16((x_l + b_l) · gelu(x_r + b_r)): ONNX Runtime's BiasSplitGelu (the
//               feed-forward's GEGLU: x = [x_l | x_r] per row, erf GELU), its formula in f32, with
//               16-byte loads and stores (ONNX Runtime's kernel moves one fp16 value a load)
//   layer_norm_f16  sum = fp16(x + bias) (+ skip, in fp16); out = fp16(LN(sum)·γ + β), statistics in
//               f32, one block per row: ONNX Runtime's LayerNormalization (its generic fp16 kernel is
//               slow) with the bias add before it in the same pass, or SkipLayerNormalization

static __device__ __forceinline__ float h2f(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

static __device__ __forceinline__ unsigned short f2h(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// one GEGLU value as BiasSplitGelu makes it: the bias added in fp16, the GELU and the product in
// f32, the result rounded to fp16
static __device__ __forceinline__ unsigned short geglu1(unsigned short xl, unsigned short bl, unsigned short xr,
                                                        unsigned short br) {
    float l = h2f(f2h(h2f(xl) + h2f(bl))), r = h2f(f2h(h2f(xr) + h2f(br)));
    return f2h(l * (r * 0.5f * (erff(r / 1.41421356237f) + 1.0f)));
}

// x: rows × 2·h halves ([left | right] per row), bias: 2·h halves, out: rows × h halves; h a
// multiple of 8, h8 = h / 8: eight values a thread and iteration; rows · h8 < 2^31 (the host checks)
extern "C" __global__ void geglu_f16(const uint4* x, const uint4* bias, unsigned int rows, unsigned int h8,
                                     uint4* out) {
    unsigned int n = rows * h8;
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        unsigned int row = i / h8, c = i - row * h8;
        uint4 l = x[2ull * row * h8 + c], r = x[2ull * row * h8 + h8 + c], bl = bias[c], br = bias[h8 + c];
        unsigned int lv[4] = {l.x, l.y, l.z, l.w}, rv[4] = {r.x, r.y, r.z, r.w};
        unsigned int blv[4] = {bl.x, bl.y, bl.z, bl.w}, brv[4] = {br.x, br.y, br.z, br.w};
        unsigned int o[4];
        for (int k = 0; k < 4; k++) {
            unsigned short lo = geglu1((unsigned short)(lv[k] & 0xffff), (unsigned short)(blv[k] & 0xffff),
                                       (unsigned short)(rv[k] & 0xffff), (unsigned short)(brv[k] & 0xffff));
            unsigned short hi = geglu1((unsigned short)(lv[k] >> 16), (unsigned short)(blv[k] >> 16),
                                       (unsigned short)(rv[k] >> 16), (unsigned short)(brv[k] >> 16));
            o[k] = lo | ((unsigned int)hi << 16);
        }
        out[i] = make_uint4(o[0], o[1], o[2], o[3]);
    }
}

static __device__ __forceinline__ void unpack8(uint4 v, float* f) {
    unsigned int w[4] = {v.x, v.y, v.z, v.w};
    for (int k = 0; k < 4; k++) {
        f[2 * k] = h2f((unsigned short)(w[k] & 0xffff));
        f[2 * k + 1] = h2f((unsigned short)(w[k] >> 16));
    }
}

static __device__ __forceinline__ uint4 pack8(const float* f) {
    uint4 o;
    o.x = f2h(f[0]) | ((unsigned int)f2h(f[1]) << 16);
    o.y = f2h(f[2]) | ((unsigned int)f2h(f[3]) << 16);
    o.z = f2h(f[4]) | ((unsigned int)f2h(f[5]) << 16);
    o.w = f2h(f[6]) | ((unsigned int)f2h(f[7]) << 16);
    return o;
}

// the sum over the block (≤ 1024 threads, a multiple of 32); every thread gets it
static __device__ __forceinline__ float block_sum(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int warps = blockDim.x >> 5;
    __syncthreads();  // red is reused by the next call
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    v = (threadIdx.x & 31) < warps ? red[threadIdx.x & 31] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// one block per row of ld halves (ld a multiple of 8, ld / 8 ≤ blockDim.x ≤ 1024, blockDim.x a
// multiple of 32); skip, bias, beta and sum may be null
extern "C" __global__ void layer_norm_f16(const uint4* x, const uint4* skip, const uint4* bias, const uint4* gamma,
                                          const uint4* beta, unsigned int ld, float epsilon, uint4* out, uint4* sum) {
    __shared__ float red[32];
    unsigned int l8 = ld >> 3, c = threadIdx.x;
    unsigned long long at = (unsigned long long)blockIdx.x * l8 + c;
    bool live = c < l8;
    float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (live) {
        unpack8(x[at], v);
        if (bias) {
            float b[8];
            unpack8(bias[c], b);
            for (int k = 0; k < 8; k++) v[k] = h2f(f2h(v[k] + b[k]));
        }
        if (skip) {
            float s[8];
            unpack8(skip[at], s);
            for (int k = 0; k < 8; k++) v[k] = h2f(f2h(v[k] + s[k]));
        }
        if (sum) sum[at] = pack8(v);
    }
    float t = 0.f;
    for (int k = 0; k < 8; k++) t += v[k];
    float mean = block_sum(t, red) / (float)ld;
    t = 0.f;
    if (live) {
        for (int k = 0; k < 8; k++) t += (v[k] - mean) * (v[k] - mean);
    }
    float rstd = rsqrtf(block_sum(t, red) / (float)ld + epsilon);
    if (!live) return;
    float g[8], b[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, y[8];
    unpack8(gamma[c], g);
    if (beta) unpack8(beta[c], b);
    for (int k = 0; k < 8; k++) y[k] = (v[k] - mean) * rstd * g[k] + b[k];
    out[at] = pack8(y);
}
