// The fp16 kernels of katz's own operators (`FusedKernels` in fused.rs): where ONNX Runtime's CUDA
// kernel for an operator of the UNet's step is slower than it need be, the step graph names
// katz's instead (tools/katz_ops.py). Compiled at run time with NVRTC; no headers, fp16 through PTX.
//
//   geglu_f16   out = fp16((x_l + b_l) · gelu(x_r + b_r)): ONNX Runtime's BiasSplitGelu (the
//               feed-forward's GEGLU: x = [x_l | x_r] per row, erf GELU), value for value, with
//               16-byte loads and stores (ONNX Runtime's kernel moves one fp16 value a load)

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
