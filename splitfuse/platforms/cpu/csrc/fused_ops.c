/* Fused element-wise ops for the CPU: one pass over memory where torch needs several ops.
 *
 * At decode batch sizes every torch op costs more in dispatch and in the fp32 round trips
 * (x.float() ... .to(bf16)) than in arithmetic; these do the same math in one loop, rounding
 * to the model dtype at the points the torch code does, so both paths agree to rounding.
 * Built with -ffast-math (see platforms/cpu/kernels.py) so the loops, exp included, vectorize.
 *
 * dtype: 0 bf16, 1 fp32.  Rows are tokens; a row stride is in elements.
 */

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "splitfuse_kernels.h"

#define PARALLEL_MIN_ELEMENTS 4096  /* below this, threads cost more than they save */

#define LOAD_BF16(x) bf16_to_f32(x)
#define STORE_BF16(x) f32_to_bf16(x)
#define ROUND_BF16(x) bf16_to_f32(f32_to_bf16(x))  /* what a torch op returning bf16 does */
#define LOAD_F32(x) (x)
#define STORE_F32(x) (x)
#define ROUND_F32(x) (x)

/* out = weight * to_dtype(h * rsqrt(mean(h^2) + eps)), where h = x, or h = x + residual when
 * residual is given, and then residual = h (the next layer's residual stream). */
#define DEFINE_RMS_NORM(NAME, T, LOAD, STORE, ROUND)                                                  \
static void NAME(T *restrict out, T *restrict residual, const T *restrict x, const T *restrict weight, \
                 int64_t rows, int hidden, int64_t x_stride, float eps) {                             \
    _Pragma("omp parallel for if (rows * hidden >= PARALLEL_MIN_ELEMENTS)")                           \
    for (int64_t row = 0; row < rows; row++) {                                                        \
        float h[hidden];                                                                              \
        const T *src = x + row * x_stride;                                                            \
        if (residual) {                                                                               \
            T *res = residual + row * hidden;                                                         \
            for (int i = 0; i < hidden; i++) {                                                        \
                h[i] = ROUND(LOAD(src[i]) + LOAD(res[i]));                                            \
                res[i] = STORE(h[i]);                                                                 \
            }                                                                                         \
        } else {                                                                                      \
            for (int i = 0; i < hidden; i++) h[i] = LOAD(src[i]);                                     \
        }                                                                                             \
        float sum_squares = 0.f;                                                                      \
        for (int i = 0; i < hidden; i++) sum_squares += h[i] * h[i];                                  \
        float inv_rms = 1.f / sqrtf(sum_squares / hidden + eps);                                      \
        T *dst = out + row * hidden;                                                                  \
        for (int i = 0; i < hidden; i++) dst[i] = STORE(LOAD(weight[i]) * ROUND(h[i] * inv_rms));     \
    }                                                                                                 \
}

/* Rotate-half (NeoX) rotary embedding, in place on query [T, H, D] and key [T, KVH, D] rows
 * (row strides q_stride, k_stride); cos/sin are fp32 [max_position, D / 2]. */
#define DEFINE_ROTARY(NAME, T, LOAD, STORE)                                                           \
static void NAME(T *query, T *key, const int64_t *positions, const float *cos_cache,                 \
                 const float *sin_cache, int64_t tokens, int num_heads, int num_kv_heads, int head_dim, \
                 int64_t q_stride, int64_t k_stride) {                                                \
    const int half = head_dim / 2;                                                                    \
    _Pragma("omp parallel for if (tokens * (num_heads + num_kv_heads) * head_dim >= PARALLEL_MIN_ELEMENTS)") \
    for (int64_t t = 0; t < tokens; t++) {                                                            \
        const float *restrict cos = cos_cache + positions[t] * half;                                  \
        const float *restrict sin = sin_cache + positions[t] * half;                                  \
        for (int head = 0; head < num_heads + num_kv_heads; head++) {                                 \
            T *restrict x = head < num_heads ? query + t * q_stride + (int64_t)head * head_dim       \
                                             : key + t * k_stride + (int64_t)(head - num_heads) * head_dim; \
            for (int i = 0; i < half; i++) {                                                          \
                float x1 = LOAD(x[i]), x2 = LOAD(x[half + i]);                                        \
                x[i] = STORE(x1 * cos[i] - x2 * sin[i]);                                              \
                x[half + i] = STORE(x2 * cos[i] + x1 * sin[i]);                                       \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
}

/* out [T, I] = to_dtype(silu(gate)) * up, gate_up [T, 2I] (gate first). exp's argument is capped at 88
 * (as exp16 caps it): under -ffast-math an infinite exp made g / (1 + inf) NaN, for any gate below -88. */
#define DEFINE_SILU_AND_MUL(NAME, T, LOAD, STORE, ROUND)                                              \
static void NAME(T *restrict out, const T *restrict gate_up, int64_t rows, int intermediate) {        \
    _Pragma("omp parallel for if (rows * intermediate >= PARALLEL_MIN_ELEMENTS)")                     \
    for (int64_t row = 0; row < rows; row++) {                                                        \
        const T *gate = gate_up + row * 2 * intermediate, *up = gate + intermediate;                  \
        T *dst = out + row * intermediate;                                                            \
        for (int i = 0; i < intermediate; i++) {                                                      \
            float g = LOAD(gate[i]);                                                                  \
            dst[i] = STORE(ROUND(g / (1.f + expf(fminf(-g, 88.f)))) * LOAD(up[i]));                     \
        }                                                                                             \
    }                                                                                                 \
}

DEFINE_RMS_NORM(rms_norm_bf16, uint16_t, LOAD_BF16, STORE_BF16, ROUND_BF16)
DEFINE_RMS_NORM(rms_norm_f32, float, LOAD_F32, STORE_F32, ROUND_F32)
DEFINE_ROTARY(rotary_bf16, uint16_t, LOAD_BF16, STORE_BF16)
DEFINE_ROTARY(rotary_f32, float, LOAD_F32, STORE_F32)
DEFINE_SILU_AND_MUL(silu_and_mul_bf16, uint16_t, LOAD_BF16, STORE_BF16, ROUND_BF16)
DEFINE_SILU_AND_MUL(silu_and_mul_f32, float, LOAD_F32, STORE_F32, ROUND_F32)

void rms_norm(int dtype, void *out, void *residual, const void *x, const void *weight,
              int64_t rows, int hidden, int64_t x_stride, float eps) {
    if (dtype == 0) rms_norm_bf16(out, residual, x, weight, rows, hidden, x_stride, eps);
    else rms_norm_f32(out, residual, x, weight, rows, hidden, x_stride, eps);
}

void rotary_embedding(int dtype, void *query, void *key, const int64_t *positions, const float *cos_cache,
                      const float *sin_cache, int64_t tokens, int num_heads, int num_kv_heads, int head_dim,
                      int64_t q_stride, int64_t k_stride) {
    if (dtype == 0)
        rotary_bf16(query, key, positions, cos_cache, sin_cache, tokens, num_heads, num_kv_heads, head_dim,
                    q_stride, k_stride);
    else
        rotary_f32(query, key, positions, cos_cache, sin_cache, tokens, num_heads, num_kv_heads, head_dim,
                   q_stride, k_stride);
}

void silu_and_mul(int dtype, void *out, const void *gate_up, int64_t rows, int intermediate) {
    if (dtype == 0) silu_and_mul_bf16(out, gate_up, rows, intermediate);
    else silu_and_mul_f32(out, gate_up, rows, intermediate);
}

/* cache[slots[t]] = rows[t] for key and value rows of row_size elements (strided sources). */
void write_kv_cache(int dtype, void *key_cache, void *value_cache, const void *key, const void *value,
                    const int64_t *slots, int64_t tokens, int row_size, int64_t key_stride, int64_t value_stride) {
    const size_t element = dtype == 0 ? 2 : 4, bytes = (size_t)row_size * element;
    for (int64_t t = 0; t < tokens; t++) {
        memcpy((char *)key_cache + slots[t] * bytes, (const char *)key + t * key_stride * element, bytes);
        memcpy((char *)value_cache + slots[t] * bytes, (const char *)value + t * value_stride * element, bytes);
    }
}

/* out[r] = the first index of the largest value in row r of logits [rows, cols] (row stride in
 * elements): greedy sampling without converting the logits to fp32 first. */
#define DEFINE_ARGMAX(NAME, T, LOAD)                                                                  \
static void NAME(int64_t *out, const T *logits, int64_t rows, int64_t cols, int64_t stride) {        \
    _Pragma("omp parallel for if (rows * cols >= PARALLEL_MIN_ELEMENTS)")                             \
    for (int64_t r = 0; r < rows; r++) {                                                              \
        const T *row = logits + r * stride;                                                           \
        float best = LOAD(row[0]);                                                                    \
        for (int64_t i = 1; i < cols; i++) best = LOAD(row[i]) > best ? LOAD(row[i]) : best;          \
        int64_t index = 0;                                                                            \
        while (index < cols - 1 && LOAD(row[index]) != best) index++;                                 \
        out[r] = index;                                                                               \
    }                                                                                                 \
}

DEFINE_ARGMAX(argmax_bf16, uint16_t, LOAD_BF16)
DEFINE_ARGMAX(argmax_f32, float, LOAD_F32)

void argmax_rows(int dtype, int64_t *out, const void *logits, int64_t rows, int64_t cols, int64_t stride) {
    if (dtype == 0) argmax_bf16(out, logits, rows, cols, stride);
    else argmax_f32(out, logits, rows, cols, stride);
}
