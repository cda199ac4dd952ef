// The fp16 kernels of katz's own operators (`FusedKernels` in fused.rs): where ONNX Runtime's CUDA
// kernel for an operator of the UNet's step is slower than it need be, the step graph names
// katz's instead (tools/step_rewrite.py). Compiled at run time with NVRTC, half.cu in front.
//
//   geglu_f16   out = fp16((x_l + b_l) · gelu(x_r + b_r)): ONNX Runtime's BiasSplitGelu (the
//               feed-forward's GEGLU: x = [x_l | x_r] per row, erf GELU), its formula in f32, with
//               16-byte loads and stores (ONNX Runtime's kernel moves one fp16 value a load)
//   layer_norm_f16  sum = fp16(x + bias) (+ skip, in fp16); out = fp16(LN(sum)·γ + β), statistics in
//               f32, one block per row: ONNX Runtime's LayerNormalization (its generic fp16 kernel is
//               slow) with the bias add before it in the same pass, or SkipLayerNormalization

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
            unsigned short lo = f2h(geglu_value((unsigned short)(lv[k] & 0xffff), (unsigned short)(blv[k] & 0xffff),
                                                (unsigned short)(rv[k] & 0xffff), (unsigned short)(brv[k] & 0xffff)));
            unsigned short hi = f2h(geglu_value((unsigned short)(lv[k] >> 16), (unsigned short)(blv[k] >> 16),
                                                (unsigned short)(rv[k] >> 16), (unsigned short)(brv[k] >> 16)));
            o[k] = lo | ((unsigned int)hi << 16);
        }
        out[i] = make_uint4(o[0], o[1], o[2], o[3]);
    }
}

// a row's normalised values out as fp16
struct StoreHalf {
    uint4* out;
    __device__ void operator()(unsigned long long at, const float* y) const { out[at] = pack8(y); }
};

// one block per row (half.cu's layer_norm_row); skip, bias, beta and sum may be null
extern "C" __global__ void layer_norm_f16(const uint4* x, const uint4* skip, const uint4* bias, const uint4* gamma,
                                          const uint4* beta, unsigned int ld, float epsilon, uint4* out, uint4* sum) {
    layer_norm_row(x, skip, bias, gamma, beta, ld, epsilon, sum, StoreHalf{out});
}
