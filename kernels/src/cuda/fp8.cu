// The fp8 kernels of katz-kernels (`Fp8Kernels` in fp8.rs), compiled at run time with NVRTC for
// compute_89 or newer (the e4m3 conversions are sm_89+ PTX); no headers, fp16 through PTX.
//
//   fp8_amax_f16       amax ← max(amax, max |x|)                  (a weight's per-tensor range)
//   fp8_quantize_w     out = e4m3(w / s), s = max(amax, tiny) / 448; scale_out = s
//                      (a weight quantized per tensor, its scale left on the device for the GEMM)
//   fp8_quantize_x     out = e4m3(x · inv_scale), saturating      (an activation, its scale calibrated)
//
// e4m3 is OCP float8 e4m3fn (ONNX's FLOAT8E4M3FN): round to nearest even, saturated to ±448.

static __device__ __forceinline__ float h2f(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

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
