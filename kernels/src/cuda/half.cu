// What the fp16 kernels of fp8.cu and fused.cu share (each is compiled with this in front of it:
// `concat!` in fp8.rs and fused.rs): fp16 through PTX (no headers), the block sum, the GEGLU value
// and the layer norm of one row, which each file's kernels store in their own format.

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

// rounded to fp16 and back, as a value stored in an fp16 tensor
static __device__ __forceinline__ float round_f16(float f) { return h2f(f2h(f)); }

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

// one GEGLU value as ONNX Runtime's BiasSplitGelu makes it: the bias added in fp16, the GELU (erf)
// and the product in f32; the caller rounds it to fp16
static __device__ __forceinline__ float geglu_value(unsigned short xl, unsigned short bl, unsigned short xr,
                                                    unsigned short br) {
    float l = round_f16(h2f(xl) + h2f(bl)), r = round_f16(h2f(xr) + h2f(br));
    return l * (r * 0.5f * (erff(r / 1.41421356237f) + 1.0f));
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

// The layer norm of row blockIdx.x of ld halves (ld a multiple of 8, ld / 8 ≤ blockDim.x ≤ 1024,
// blockDim.x a multiple of 32): sum = fp16(fp16(x + bias) + skip), written where `sum` is given;
// y = LN(sum)·γ + β in f32 (statistics in f32), handed to `store(at, y)` for the thread's 8 values
// at 16-byte index `at`. skip, bias, beta and sum may be null.
template <typename Store>
static __device__ __forceinline__ void layer_norm_row(const uint4* x, const uint4* skip, const uint4* bias,
                                                      const uint4* gamma, const uint4* beta, unsigned int ld,
                                                      float epsilon, uint4* sum, Store store) {
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
            for (int k = 0; k < 8; k++) v[k] = round_f16(v[k] + b[k]);
        }
        if (skip) {
            float s[8];
            unpack8(skip[at], s);
            for (int k = 0; k < 8; k++) v[k] = round_f16(v[k] + s[k]);
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
    store(at, y);
}

