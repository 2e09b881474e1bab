// minitron's own CUDA kernels: weight widening from stored codes and activation rounding on the
// device. Compiled to PTX by build.rs when the `cuda` feature is on (nvcc from
// scripts/build-cuda.sh), loaded through candle's custom-module loader (runtime::devform).
//
// Every function here has a plain Rust twin in src/runtime/devform.rs (`twin`), which the tests
// compare bit for bit with the CPU runner's own arithmetic. Keep the two in step: the same
// operations in the same order, f32 throughout, no fused multiply-add (build.rs passes
// -fmad=false), IEEE division (nvcc's default -prec-div=true).
//
// Layouts: row-major, contiguous. bf16 values are written as their 16-bit patterns.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

// f32 -> bf16, round to nearest even (NaN stays a quiet NaN with its sign).
__device__ __forceinline__ u16 mt_bf16(float v) {
  u32 b = __float_as_uint(v);
  if (isnan(v)) return (u16)((b >> 16) | 0x40);
  b += 0x7FFFu + ((b >> 16) & 1u);
  return (u16)(b >> 16);
}

// E4M3 (OCP, "fn": no infinities, 0x7F/0xFF NaN) -> f32. Every value is exact in f32 and bf16.
// Built from bits, without branches or ldexpf (the decode GEMV calls it once per weight): a
// normal code 0eeeemmm is 2^(e-7)·(1 + m/8), f32 exponent field e + 120; a subnormal is m·2^-9.
__device__ __forceinline__ float mt_e4m3_value(u32 c) {
  u32 e = (c >> 3) & 0xFu, m = c & 7u;
  float normal = __uint_as_float(((e + 120u) << 23) | (m << 20));
  float mag = e ? normal : (float)m * 0.001953125f;
  mag = (c & 0x7Fu) == 0x7Fu ? __uint_as_float(0x7FC00000u) : mag;
  return (c & 0x80u) ? -mag : mag;
}

// f32 -> E4M3 code, nearest with ties to even, saturating at 448 (minitron's f32_to_e4m3).
__device__ __forceinline__ u8 mt_e4m3_code(float x) {
  u8 sign = (__float_as_uint(x) >> 31) ? 0x80 : 0;
  if (isnan(x)) return sign | 0x7F;
  float a = fabsf(x);
  if (a >= 448.0f) return sign | 0x7E;
  if (a < 0.015625f) return sign | (u8)rintf(a * 512.0f);
  u32 bits = __float_as_uint(a);
  u32 r = (bits + 0x7FFFFu + ((bits >> 20) & 1u)) >> 20;
  int e = (int)(r >> 3) - 127 + 7;
  return sign | (u8)(((u32)e << 3) | (r & 7u));
}

// E2M1 magnitude code of a >= 0: nearest of {0, .5, 1, 1.5, 2, 3, 4, 6}, ties to the even code.
__device__ __forceinline__ u8 mt_e2m1_magnitude(float a) {
  u8 c = 0;
  c += a > 0.25f;
  c += a >= 0.75f;
  c += a > 1.25f;
  c += a >= 1.75f;
  c += a > 2.5f;
  c += a >= 3.5f;
  c += a > 5.0f;
  return c;
}

// E2M1 code -> value. The magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6} times two are the nibbles of
// 0xC8643210 (no lookup array: an indexed local array would live in local memory).
__device__ __forceinline__ float mt_e2m1_value(u32 c) {
  float v = (float)((0xC8643210u >> (4u * (c & 7u))) & 0xFu) * 0.5f;
  return (c & 8u) ? -v : v;
}

// Largest |x| of one row, by one block of 256 threads (max is exact: any order gives the same).
__device__ float mt_row_amax(const float* x, int cols) {
  __shared__ float part[256];
  float m = 0.0f;
  for (int i = threadIdx.x; i < cols; i += blockDim.x) m = fmaxf(m, fabsf(x[i]));
  part[threadIdx.x] = m;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) part[threadIdx.x] = fmaxf(part[threadIdx.x], part[threadIdx.x + s]);
    __syncthreads();
  }
  float r = part[0];
  __syncthreads();
  return r;
}

extern "C" {

// E4M3 weight codes -> bf16 (exact).
__global__ void mt_widen_e4m3(const u8* codes, u16* out, unsigned long long n) {
  unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    float v = mt_e4m3_value(codes[i]);
    out[i] = isnan(v) ? (u16)0x7FC0 : (u16)(__float_as_uint(v) >> 16);
  }
}

// INT8 weight codes (two's complement bytes) -> bf16 (exact).
__global__ void mt_widen_i8(const u8* codes, u16* out, unsigned long long n) {
  unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = mt_bf16((float)(signed char)codes[i]);
}

// compressed-tensors packed INT4/INT8 weights (little-endian u32 words, `32 / bits` values each,
// stored with an offset of 2^(bits-1)) times f32 group scales [rows, groups], rounded to bf16.
__global__ void mt_widen_packed(const u8* words, const float* scales, u16* out, int rows, int cols,
                                int bits, int groups) {
  unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (unsigned long long)rows * cols) return;
  int r = (int)(i / cols), c = (int)(i % cols);
  int per = 32 / bits;
  int nwords = (cols + per - 1) / per;
  const u8* w = words + ((size_t)r * nwords + c / per) * 4;
  u32 word = (u32)w[0] | ((u32)w[1] << 8) | ((u32)w[2] << 16) | ((u32)w[3] << 24);
  int q = (int)((word >> ((c % per) * bits)) & ((1u << bits) - 1u)) - (1 << (bits - 1));
  int g = cols / groups;
  out[i] = mt_bf16((float)q * scales[(size_t)r * groups + c / g]);
}

// NVFP4 weights: two E2M1 codes per byte (low nibble first) times E4M3 group scales (one per 16),
// without the per-tensor factor (exact in bf16).
__global__ void mt_widen_nvfp4(const u8* packed, const u8* scales, u16* out,
                               unsigned long long n) {
  unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  u8 b = packed[i / 2];
  u8 code = (i & 1) ? (b >> 4) : (b & 0xF);
  float v = mt_e2m1_value(code) * mt_e4m3_value(scales[i / 16]);
  out[i] = mt_bf16(v);
}

// Per-row scales of activations [rows, cols] (one block of 256 threads per row):
// mode 0, FP8 per token: max(amax / qmax, floor); mode 1, INT8 per token: amax / qmax, or 1
// for an all-zero row.
__global__ void mt_row_scales(const float* x, float* scales, int cols, int mode, float qmax,
                              float floor_) {
  int r = blockIdx.x;
  float amax = mt_row_amax(x + (size_t)r * cols, cols);
  if (threadIdx.x == 0) {
    if (mode == 0) scales[r] = fmaxf(amax / qmax, floor_);
    else scales[r] = amax > 0.0f ? amax / qmax : 1.0f;
  }
}

// Activation codes as bf16 values [rows, cols] from per-row scales (`per_row` 0: one scale):
// mode 0, E4M3 of clamp(x / s, ±448); mode 1, INT8 clamp(rint(x / s), ±127).
__global__ void mt_act_codes(const float* x, const float* scales, u16* out, int rows, int cols,
                             int per_row, int mode) {
  unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (unsigned long long)rows * cols) return;
  float s = scales[per_row ? (int)(i / cols) : 0];
  float q = x[i] / s;
  if (mode == 0) {
    q = fminf(fmaxf(q, -448.0f), 448.0f);
    float v = mt_e4m3_value(mt_e4m3_code(q));
    out[i] = (u16)(__float_as_uint(v) >> 16);
  } else {
    // + 0 turns a -0 code into +0: integer codes have no signed zero.
    q = fminf(fmaxf(rintf(q), -127.0f), 127.0f) + 0.0f;
    out[i] = mt_bf16(q);
  }
}

// NVFP4 activations [rows, cols] (cols a multiple of 16), one thread per group of 16, with the
// global scale g as a multiplier: s = e4m3(min(g * (amax * (1/6)), 448)), q = E2M1 of
// clamp(x * (1 / (s * (1/g))), ±6); writes q * s (exact in bf16). `sixth` and `inv_g` come from
// the host (the same f32 values the CPU computes).
__global__ void mt_nvfp4_act(const float* x, u16* out, unsigned long long groups, float g,
                             float inv_g, float sixth) {
  unsigned long long k = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= groups) return;
  const float* xg = x + k * 16;
  float amax = 0.0f;
  for (int j = 0; j < 16; ++j) amax = fmaxf(amax, fabsf(xg[j]));
  float s = mt_e4m3_value(mt_e4m3_code(fminf(g * (amax * sixth), 448.0f)));
  float d = s * inv_g;
  float r = d == 0.0f ? 0.0f : 1.0f / d;
  for (int j = 0; j < 16; ++j) {
    float q = fminf(fmaxf(xg[j] * r, -6.0f), 6.0f);
    u8 code = (u8)((q < 0.0f) << 3) | mt_e2m1_magnitude(fabsf(q));
    out[k * 16 + j] = mt_bf16(mt_e2m1_value(code) * s);
  }
}

}  // extern "C"

// ---- Decode-size products straight from the stored weights (no widened copy).

// The exact bf16-representable value of weight (o, j) of a [out, k] weight in its stored form:
// kind 0 E4M3, 1 INT8, 2 packed integers (q · group scale rounded to bf16, as mt_widen_packed),
// 3 NVFP4 (e2m1 · e4m3).
__device__ __forceinline__ float mt_weight(int kind, const u8* w, const void* aux, int o, int j,
                                           int k, int bits, int groups) {
  if (kind == 0) return mt_e4m3_value(w[(size_t)o * k + j]);
  if (kind == 1) return (float)(signed char)w[(size_t)o * k + j];
  if (kind == 2) {
    int per = 32 / bits;
    int nwords = (k + per - 1) / per;
    const u8* p = w + ((size_t)o * nwords + j / per) * 4;
    u32 word = (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24);
    int q = (int)((word >> ((j % per) * bits)) & ((1u << bits) - 1u)) - (1 << (bits - 1));
    const float* s = (const float*)aux;
    return __uint_as_float((u32)mt_bf16((float)q * s[(size_t)o * groups + j / (k / groups)]) << 16);
  }
  u8 b = w[((size_t)o * k + j) / 2];
  u8 code = (j & 1) ? (b >> 4) : (b & 0xF);
  return mt_e2m1_value(code) * mt_e4m3_value(((const u8*)aux)[((size_t)o * k + j) / 16]);
}

#define MT_GEMV_ROWS 4

// One run of 8 consecutive weights (o, j0 .. j0+7) as the exact bf16-representable values
// mt_weight gives, loaded as wide as the format allows. KIND 2 takes this path only for 4- and
// 8-bit words with group sizes that are multiples of 8 (`fast`); other layouts use mt_weight.
template <int KIND>
__device__ __forceinline__ void mt_run8(const u8* w, const void* aux, int o, int j0, int k,
                                        int bits, int groups, int gsize, bool fast, float wv[8]) {
  if (KIND == 0 || KIND == 1) {
    uint2 v = __ldg((const uint2*)(w + (size_t)o * k + j0));
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      u32 c = ((e < 4 ? v.x : v.y) >> (8 * (e & 3))) & 0xFFu;
      wv[e] = KIND == 0 ? mt_e4m3_value(c) : (float)(int)(signed char)c;
    }
  } else if (KIND == 3) {
    u32 v = __ldg((const u32*)(w + ((size_t)o * k + j0) / 2));
    float sc = mt_e4m3_value(__ldg((const u8*)aux + ((size_t)o * k + j0) / 16));
#pragma unroll
    for (int e = 0; e < 8; ++e) wv[e] = mt_e2m1_value((v >> (4 * e)) & 0xFu) * sc;
  } else if (fast) {
    float s = __ldg((const float*)aux + (size_t)o * groups + j0 / gsize);
    if (bits == 4) {
      u32 v = __ldg((const u32*)w + (size_t)o * (k / 8) + j0 / 8);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        int q = (int)((v >> (4 * e)) & 0xFu) - 8;
        wv[e] = __uint_as_float((u32)mt_bf16((float)q * s) << 16);
      }
    } else {
      uint2 v = __ldg((const uint2*)(w + (size_t)o * k + j0));
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        int q = (int)(((e < 4 ? v.x : v.y) >> (8 * (e & 3))) & 0xFFu) - 128;
        wv[e] = __uint_as_float((u32)mt_bf16((float)q * s) << 16);
      }
    }
  } else {
    for (int e = 0; e < 8; ++e) wv[e] = mt_weight(KIND, w, aux, o, j0 + e, k, bits, groups);
  }
}

// y[r, o] = Σ_j a[r, j] · w[o, j] for rows ≤ 4 (decode), one warp per output channel, k a
// multiple of 8. Lane l takes the runs of 8 consecutive j starting at 8·l + 256·t (t = 0, 1, …)
// in order, adding each exact product to its f32 sum; the 32 sums are then combined by the
// butterfly `v += shfl_xor(v, 16, 8, 4, 2, 1)`. EXACT (INT8 codes times INT8 weights): the
// same in i32, which is exact, scaled in f64. Each sum is scaled before it is written. The row loops are unrolled to the
// constant MT_GEMV_ROWS so the sums stay in registers.
template <int KIND, bool EXACT>
__device__ __forceinline__ void mt_gemv_impl(const u16* a, const u8* w, const void* aux,
                                             float* y, const float* rs, const float* cs,
                                             int rows, int k, int out, int bits, int groups,
                                             int rs_n1) {
  int o = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  int lane = threadIdx.x & 31;
  if (o >= out) return;
  int gsize = KIND == 2 ? k / groups : 8;
  bool fast = KIND != 2 || ((bits == 4 || bits == 8) && gsize % 8 == 0);
  float acc[MT_GEMV_ROWS];
  int iacc[MT_GEMV_ROWS];
#pragma unroll
  for (int r = 0; r < MT_GEMV_ROWS; ++r) {
    acc[r] = 0.0f;
    iacc[r] = 0;
  }
#pragma unroll 4
  for (int j0 = 8 * lane; j0 < k; j0 += 256) {
    float wv[8];
    mt_run8<KIND>(w, aux, o, j0, k, bits, groups, gsize, fast, wv);
#pragma unroll
    for (int r = 0; r < MT_GEMV_ROWS; ++r) {
      if (r < rows) {
        uint4 av4 = __ldg((const uint4*)(a + (size_t)r * k + j0));
        u32 aw[4] = {av4.x, av4.y, av4.z, av4.w};
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          float av = __uint_as_float(((aw[e / 2] >> (16 * (e & 1))) & 0xFFFFu) << 16);
          if (EXACT) iacc[r] += (int)av * (int)wv[e];
          else acc[r] = acc[r] + av * wv[e];
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < MT_GEMV_ROWS; ++r) {
    if (r < rows) {
      float v = acc[r];
      int iv = iacc[r];
      for (int off = 16; off > 0; off >>= 1) {
        if (EXACT) iv += __shfl_xor_sync(0xFFFFFFFFu, iv, off);
        else v = v + __shfl_xor_sync(0xFFFFFFFFu, v, off);
      }
      if (lane == 0) {
        // The scaling, in the order of the prefill path: row scale, then column scale; exact
        // sums in f64 (as the CPU's W8A8 epilogue), f32 sums in f32.
        float res;
        if (EXACT) {
          double d = (double)iv;
          if (rs) d = d * (double)rs[rs_n1 ? 0 : r];
          if (cs) d = d * (double)cs[o];
          res = (float)d;
        } else {
          res = v;
          if (rs) res = res * rs[rs_n1 ? 0 : r];
          if (cs) res = res * cs[o];
        }
        y[(size_t)r * out + o] = res;
      }
    }
  }
}

// kind: 0 E4M3, 1 INT8, 2 packed integers, 3 NVFP4 (see mt_weight); `exact` only with kind 1.
// `rs` (per row, or one value when `rs_n1`) and `cs` (per output channel) may be null.
extern "C" __global__ void mt_gemv(const u16* a, const u8* w, const void* aux, float* y,
                                   const float* rs, const float* cs, int rows, int k, int out,
                                   int kind, int bits, int groups, int exact, int rs_n1) {
#define MT_GEMV_ARGS a, w, aux, y, rs, cs, rows, k, out, bits, groups, rs_n1
  switch (kind) {
    case 0: mt_gemv_impl<0, false>(MT_GEMV_ARGS); break;
    case 1:
      if (exact) mt_gemv_impl<1, true>(MT_GEMV_ARGS);
      else mt_gemv_impl<1, false>(MT_GEMV_ARGS);
      break;
    case 2: mt_gemv_impl<2, false>(MT_GEMV_ARGS); break;
    default: mt_gemv_impl<3, false>(MT_GEMV_ARGS); break;
  }
#undef MT_GEMV_ARGS
}

// W8A8's scaling of exact integer sums, as the CPU does it: f32((S · s_row) · s_col) in f64.
extern "C" __global__ void mt_int8_epilogue(const int* acc, const float* rs, const float* cs,
                                            float* y, int rows, int out) {
  unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (unsigned long long)rows * out) return;
  int r = (int)(i / out), o = (int)(i % out);
  y[i] = (float)(((double)acc[i] * (double)rs[r]) * (double)cs[o]);
}

// Integer-valued bf16 activation codes (|v| ≤ 127) to INT8 bytes, for the integer GEMM.
extern "C" __global__ void mt_codes_to_i8(const u16* a, u8* out, unsigned long long n) {
  unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = (u8)(signed char)(int)__uint_as_float((u32)a[i] << 16);
}

// E4M3-valued bf16 activation codes to their E4M3 bytes, for the FP8 GEMM (exact: every such
// value is an E4M3 value).
extern "C" __global__ void mt_codes_to_e4m3(const u16* a, u8* out, unsigned long long n) {
  unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = mt_e4m3_code(__uint_as_float((u32)a[i] << 16));
}
