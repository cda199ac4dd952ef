// The fp8 kernels of katz-kernels (`Fp8Kernels` in fp8.rs), compiled at run time with NVRTC for
// compute_89 or newer (the e4m3 conversions are sm_89+ PTX), half.cu in front.
//
//   fp8_amax_f16       amax ← max(amax, max |x|)                  (a weight's per-tensor range)
//   fp8_quantize_w     out = e4m3(w / s), s = max(amax, tiny) / 448; scale_out = s
//                      (a weight quantized per tensor, its scale left on the device for the GEMM)
//   fp8_quantize_x     out = e4m3(x · inv_scale), saturating      (an activation, its scale calibrated)
//   fp8_geglu          out = e4m3(fp16((x_l + b_l) · gelu(x_r + b_r)) · inv_scale): ONNX Runtime's
//                      BiasSplitGelu (GEGLU: x = [x_l | x_r] per row, erf GELU) and the quantize of
//                      its output in one pass (the feed-forward's second GEMM reads it in fp8)
//   fp8_layer_norm     sum = fp16(fp16(x + bias) + skip); out = e4m3(fp16(LN(sum)·γ + β) · inv_scale):
//                      ONNX Runtime's SkipLayerNormalization (or LayerNormalization: no skip, no bias)
//                      with its normalised output quantized as it is made (the next GEMMs read it
//                      in fp8); statistics in f32, one block per row
//
// e4m3 is OCP float8 e4m3fn (ONNX's FLOAT8E4M3FN): round to nearest even, saturated to ±448.

// two floats to two e4m3 bytes: a in the high byte, b in the low one
static __device__ __forceinline__ unsigned short f2_e4m3x2(float a, float b) {
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(a), "f"(b));
    return r;
}

extern "C" __global__ void fp8_amax_f16(const unsigned short* x, unsigned long long n, float* amax) {
    float m = 0.f;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        m = fmaxf(m, fabsf(h2f(x[i])));
    }
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    __shared__ float warp_max[32];
    if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = m;
    __syncthreads();
    if (threadIdx.x < 32) {
        m = threadIdx.x < (blockDim.x >> 5) ? warp_max[threadIdx.x] : 0.f;
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        // non-negative floats order as their bit patterns do; NaN (0x7fc00000) wins, as it should
        if (threadIdx.x == 0) atomicMax((unsigned int*)amax, __float_as_uint(m));
    }
}

// n even
extern "C" __global__ void fp8_quantize_w(const unsigned short* w, unsigned long long n, const float* amax,
                                          unsigned short* out, float* scale_out) {
    float s = fmaxf(*amax, 1e-12f) / 448.f, inv = 1.f / s;
    if (blockIdx.x == 0 && threadIdx.x == 0) *scale_out = s;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n / 2;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        out[i] = f2_e4m3x2(h2f(w[2 * i + 1]) * inv, h2f(w[2 * i]) * inv);
    }
}

// n a multiple of 8: eight halves in (16 bytes), eight bytes out per thread and iteration
extern "C" __global__ void fp8_quantize_x(const uint4* x, unsigned long long n, float inv_scale, uint2* out) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n / 8;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        uint4 v = x[i];
        unsigned int h[4] = {v.x, v.y, v.z, v.w};
        unsigned short q[4];
        for (int k = 0; k < 4; k++) {
            q[k] = f2_e4m3x2(h2f((unsigned short)(h[k] >> 16)) * inv_scale, h2f((unsigned short)(h[k] & 0xffff)) * inv_scale);
        }
        uint2 r;
        r.x = q[0] | ((unsigned int)q[1] << 16);
        r.y = q[2] | ((unsigned int)q[3] << 16);
        out[i] = r;
    }
}

// x: rows × 2·h halves ([left | right] per row), bias: 2·h halves, out: rows × h bytes; h a
// multiple of 8, h8 = h / 8: eight values a thread and iteration (16-byte loads, 8-byte stores)
extern "C" __global__ void fp8_geglu(const uint4* x, const uint4* bias, unsigned long long rows, unsigned int h8,
                                     float inv_scale, uint2* out) {
    unsigned long long n = rows * h8;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long row = i / h8;
        unsigned int c = (unsigned int)(i - row * h8);
        uint4 l = x[row * 2 * h8 + c], r = x[row * 2 * h8 + h8 + c], bl = bias[c], br = bias[h8 + c];
        unsigned int lv[4] = {l.x, l.y, l.z, l.w}, rv[4] = {r.x, r.y, r.z, r.w};
        unsigned int blv[4] = {bl.x, bl.y, bl.z, bl.w}, brv[4] = {br.x, br.y, br.z, br.w};
        unsigned short q[4];
        for (int k = 0; k < 4; k++) {
            float lo = round_f16(geglu_value((unsigned short)(lv[k] & 0xffff), (unsigned short)(blv[k] & 0xffff),
                                             (unsigned short)(rv[k] & 0xffff), (unsigned short)(brv[k] & 0xffff)));
            float hi = round_f16(geglu_value((unsigned short)(lv[k] >> 16), (unsigned short)(blv[k] >> 16),
                                             (unsigned short)(rv[k] >> 16), (unsigned short)(brv[k] >> 16)));
            q[k] = f2_e4m3x2(hi * inv_scale, lo * inv_scale);
        }
        uint2 o;
        o.x = q[0] | ((unsigned int)q[1] << 16);
        o.y = q[2] | ((unsigned int)q[3] << 16);
        out[i] = o;
    }
}

// a row's normalised values out as e4m3: each rounded to fp16 first (the value an fp16 norm
// would have stored), then quantized
struct StoreE4m3 {
    uint2* out;
    float inv_scale;
    __device__ void operator()(unsigned long long at, const float* y) const {
        unsigned short q[4];
        for (int k = 0; k < 4; k++) q[k] = f2_e4m3x2(round_f16(y[2 * k + 1]) * inv_scale, round_f16(y[2 * k]) * inv_scale);
        uint2 o;
        o.x = q[0] | ((unsigned int)q[1] << 16);
        o.y = q[2] | ((unsigned int)q[3] << 16);
        out[at] = o;
    }
};

// one block per row (half.cu's layer_norm_row); skip, bias, beta and sum may be null
extern "C" __global__ void fp8_layer_norm(const uint4* x, const uint4* skip, const uint4* bias, const uint4* gamma,
                                          const uint4* beta, unsigned int ld, float epsilon, float inv_scale,
                                          uint2* out, uint4* sum) {
    layer_norm_row(x, skip, bias, gamma, beta, ld, epsilon, sum, StoreE4m3{out, inv_scale});
}
