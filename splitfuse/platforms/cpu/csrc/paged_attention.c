/* Paged attention for the CPU: reads keys and values straight from the paged KV cache.
 *
 * The torch-native backend must first copy every request's context out of the cache
 * (index_select) before SDPA can use it; here each (request, KV head) pair walks its own
 * block table instead, so the cache is read once and nothing is copied.
 *
 * Layouts (all contiguous):
 *   query, out          [tokens, num_heads, head_dim]; query rows query_stride elements apart
 *   key/value cache     [slots, num_kv_heads, head_dim], slot = block * block_size + offset
 *   block_tables        [num_requests, block_table_stride] int64
 *   query_start_loc     [num_requests + 1] int64: request r owns rows query_start_loc[r]..[r+1]-1
 *   context_lens        [num_requests] int64: tokens with KV after this step; row j of request r
 *                       sits at position context_len - query_len + j and sees keys
 *                       max(0, position - window + 1) .. position (window 0: no window)
 *   requests            [num_selected] int32: the requests this call computes
 *
 * Softmax runs online over one block at a time (running max, sum and fp32 accumulator
 * per query row), so memory does not grow with the context.  Built with -march=native:
 * the AVX-512 paths below are used where the machine has them, plain C elsewhere.
 *
 * Batch invariance (what ModelConfig.batch_invariant relies on; keep it): a row's result depends
 * only on its query, its position and its keys and values.  Its keys are visited in order, in
 * sub-blocks aligned to the cache blocks whatever the work item; rows that share key loads never
 * share a sum; keys a row does not see add exact zeros.  So the row comes out the same as a
 * decode, in a chunk of any length, or beside any other rows (tests/unit/test_attention.py).
 */

#include <math.h>
#include <stdint.h>
#include <omp.h>
#include <string.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "bf16.h"
#include "splitfuse_kernels.h"
#include "vector_math.h"

#define MAX_ROWS 32        /* query rows (tokens x heads of one KV group) per work item */
#define MAX_HEAD_DIM 256
#define MAX_BLOCK_SIZE 64

/* dot(q, k) with q in fp32 and k as stored (bf16 or fp32). */
static inline float dot_bf16(const float *restrict q, const uint16_t *restrict k, int dim) {
    int d = 0;
    float sum = 0.f;
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    for (; d + 16 <= dim; d += 16) {
        __m256i raw = _mm256_loadu_si256((const __m256i *)(k + d));
        __m512 kf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), kf, acc);
    }
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (; d < dim; d++) sum += q[d] * bf16_to_f32(k[d]);
    return sum;
}

static inline float dot_f32(const float *restrict q, const float *restrict k, int dim) {
    int d = 0;
    float sum = 0.f;
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    for (; d + 16 <= dim; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(k + d), acc);
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (; d < dim; d++) sum += q[d] * k[d];
    return sum;
}

/* acc += p * v */
static inline void axpy_bf16(float *restrict acc, float p, const uint16_t *restrict v, int dim) {
    int d = 0;
#ifdef __AVX512F__
    __m512 pv = _mm512_set1_ps(p);
    for (; d + 16 <= dim; d += 16) {
        __m256i raw = _mm256_loadu_si256((const __m256i *)(v + d));
        __m512 vf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
        _mm512_storeu_ps(acc + d, _mm512_fmadd_ps(pv, vf, _mm512_loadu_ps(acc + d)));
    }
#endif
    for (; d < dim; d++) acc[d] += p * bf16_to_f32(v[d]);
}

static inline void axpy_f32(float *restrict acc, float p, const float *restrict v, int dim) {
    for (int d = 0; d < dim; d++) acc[d] += p * v[d];
}

static inline void prefetch_block(const void *keys, const void *values, size_t bytes) {
    for (size_t offset = 0; offset < bytes; offset += 64) {
        __builtin_prefetch((const char *)keys + offset);
        __builtin_prefetch((const char *)values + offset);
    }
}

typedef struct {
    const int64_t *block_tables;
    int64_t block_table_stride;
    const int64_t *query_start_loc;
    const int64_t *context_lens;
    int num_heads, num_kv_heads, head_dim, block_size, window;
    float scale;
    int64_t query_stride;
} Shape;

/* One work item: query tokens first_token .. first_token + num_tokens - 1 of request `req`,
 * every head that reads KV heads first_kv_head .. first_kv_head + num_kv - 1.  Taking all KV heads
 * of a token at once reads each block as one contiguous run of memory. */
#define DEFINE_WORK_ITEM(NAME, T, DOT, AXPY, LOAD, STORE)                                          \
static void NAME(const Shape *s, T *out, const T *query, const T *key_cache, const T *value_cache, \
                 int req, int first_kv_head, int num_kv, int first_token, int num_tokens) {        \
    const int dim = s->head_dim, group = s->num_heads / s->num_kv_heads, heads = group * num_kv;  \
    const int rows = num_tokens * heads, bs = s->block_size;                                      \
    const int64_t q_start = s->query_start_loc[req];                                               \
    const int64_t query_len = s->query_start_loc[req + 1] - q_start;                               \
    const int64_t context_len = s->context_lens[req];                                              \
    const int64_t *table = s->block_tables + (int64_t)req * s->block_table_stride;                 \
    float q[MAX_ROWS][MAX_HEAD_DIM], acc[MAX_ROWS][MAX_HEAD_DIM];                                  \
    float row_max[MAX_ROWS], row_sum[MAX_ROWS], scores[MAX_ROWS][MAX_BLOCK_SIZE];                  \
    int64_t row_pos[MAX_ROWS];                                                                     \
    int row_kv[MAX_ROWS];                                                                          \
    for (int r = 0; r < rows; r++) {                                                               \
        int token = first_token + r / heads, head = first_kv_head * group + r % heads;            \
        row_kv[r] = head / group;                                                                  \
        const T *src = query + (q_start + token) * s->query_stride + (int64_t)head * dim;          \
        for (int d = 0; d < dim; d++) { q[r][d] = LOAD(src[d]) * s->scale; acc[r][d] = 0.f; }     \
        row_max[r] = -INFINITY;                                                                    \
        row_sum[r] = 0.f;                                                                          \
        row_pos[r] = context_len - query_len + token;                                              \
    }                                                                                              \
    int64_t last_pos = row_pos[rows - 1];                                                          \
    int64_t first_key = 0;                                                                         \
    if (s->window > 0 && row_pos[0] - s->window + 1 > 0) first_key = row_pos[0] - s->window + 1;  \
    const int64_t kv_stride = (int64_t)s->num_kv_heads * dim;                                     \
    for (int64_t block_start = first_key / bs * bs; block_start <= last_pos; block_start += bs) {  \
        const int64_t base = table[block_start / bs] * bs;                                         \
        int n = (int)(last_pos + 1 - block_start < bs ? last_pos + 1 - block_start : bs);          \
        const T *keys = key_cache + base * kv_stride;                                              \
        const T *values = value_cache + base * kv_stride;                                          \
        if (block_start + bs <= last_pos) {                                                        \
            const int64_t next = table[block_start / bs + 1] * bs * kv_stride;                     \
            prefetch_block(key_cache + next, value_cache + next, (size_t)bs * kv_stride * sizeof(T)); \
        }                                                                                          \
        /* token-major, so each block is read front to back */                                    \
        for (int t = 0; t < n; t++) {                                                              \
            const int64_t pos = block_start + t;                                                   \
            for (int r = 0; r < rows; r++) {                                                       \
                int visible = pos <= row_pos[r] && (s->window <= 0 || pos > row_pos[r] - s->window); \
                scores[r][t] = visible ? DOT(q[r], keys + t * kv_stride + row_kv[r] * dim, dim) : -INFINITY; \
            }                                                                                      \
        }                                                                                          \
        for (int r = 0; r < rows; r++) {                                                           \
            float *p = scores[r], block_max = -INFINITY;                                           \
            for (int t = 0; t < n; t++) block_max = p[t] > block_max ? p[t] : block_max;           \
            if (block_max == -INFINITY) { for (int t = 0; t < n; t++) p[t] = 0.f; continue; }      \
            float new_max = block_max > row_max[r] ? block_max : row_max[r];                       \
            if (new_max != row_max[r]) {                                                           \
                float correction = expf(row_max[r] - new_max);                                     \
                row_sum[r] *= correction;                                                          \
                for (int d = 0; d < dim; d++) acc[r][d] *= correction;                             \
                row_max[r] = new_max;                                                              \
            }                                                                                      \
            for (int t = 0; t < n; t++) { p[t] = expf(p[t] - new_max); row_sum[r] += p[t]; }        \
        }                                                                                          \
        for (int t = 0; t < n; t++)                                                                \
            for (int r = 0; r < rows; r++)                                                         \
                if (scores[r][t] != 0.f)                                                           \
                    AXPY(acc[r], scores[r][t], values + t * kv_stride + row_kv[r] * dim, dim);     \
    }                                                                                              \
    for (int r = 0; r < rows; r++) {                                                               \
        int token = first_token + r / heads, head = first_kv_head * group + r % heads;            \
        T *dst = out + ((q_start + token) * s->num_heads + head) * dim;                            \
        float inv = 1.f / row_sum[r];                                                              \
        for (int d = 0; d < dim; d++) dst[d] = STORE(acc[r][d] * inv);                             \
    }                                                                                              \
}

#define LOAD_BF16(x) bf16_to_f32(x)
#define STORE_BF16(x) f32_to_bf16(x)
#define LOAD_F32(x) (x)
#define STORE_F32(x) (x)
DEFINE_WORK_ITEM(work_item_bf16, uint16_t, dot_bf16, axpy_bf16, LOAD_BF16, STORE_BF16)
DEFINE_WORK_ITEM(work_item_f32, float, dot_f32, axpy_f32, LOAD_F32, STORE_F32)

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* The vector path, for head_dim a multiple of 16 on AVX-512 machines.  Per block it reads each
 * key and value row once for up to FAST_ROWS query rows of the same KV head (the GQA group and
 * the chunk's tokens), keeps the scores of 16 keys in one register (so the softmax update and
 * exp run 16 lanes at a time) and accumulates P.V with the accumulators in registers. */
#define HAVE_FAST_PATH 1
#define FAST_ROWS 4
#define LANES 16

static inline __m512 load16_bf16(const uint16_t *p) {
    __m256i raw = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

static inline __m512 load16_f32(const float *p) { return _mm512_loadu_ps(p); }

/* Lane i of the result is the sum of the 16 lanes of v[i]: a transpose-and-add tree, far
 * cheaper than 16 separate horizontal sums. */
static inline __m512 sum16(const __m512 v[LANES]) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++)
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
        b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; i++)
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

/* Lanes t of a sub-block of n keys starting at key position `first` that a row at `pos` sees. */
static inline __mmask16 visible_lanes(int64_t first, int n, int64_t pos, int window) {
    int64_t lo = window > 0 ? pos - window + 1 : 0;
    int64_t t_lo = lo > first ? lo - first : 0, t_hi = pos - first < n - 1 ? pos - first : n - 1;
    if (t_hi < t_lo) return 0;
    return (__mmask16)((((uint32_t)1 << (t_hi + 1)) - 1) & ~(((uint32_t)1 << t_lo) - 1));
}

/* The three steps for one sub-block of n <= 16 keys and `set` query rows of one KV head.  Always
 * inlined and called with a constant `set`, so the per-row loops unroll and their accumulators
 * stay in registers. */

/* partial[j][t]: 16 partial sums of row j's q . key t (sum16 finishes them).  Queries are kept as
 * Q_T: fp32 and pre-scaled, or, with AVX512-BF16, the bf16 query itself (scaled after the dot). */
#define DEFINE_FMA_SCORES(NAME, T, LOAD16)                                                        \
static inline __attribute__((always_inline)) void NAME(                                          \
        const int set, float (*q)[MAX_HEAD_DIM], const T *keys, int64_t kv_stride, int dim, int n, \
        float (*partial)[LANES][LANES]) {                                                          \
    for (int t = 0; t < n; t++) {                                                                  \
        __m512 dots[FAST_ROWS];                                                                    \
        for (int j = 0; j < set; j++) dots[j] = _mm512_setzero_ps();                               \
        for (int c = 0; c < dim; c += LANES) {                                                     \
            __m512 k = LOAD16(keys + t * kv_stride + c);                                          \
            for (int j = 0; j < set; j++) dots[j] = _mm512_fmadd_ps(_mm512_loadu_ps(q[j] + c), k, dots[j]); \
        }                                                                                          \
        for (int j = 0; j < set; j++) _mm512_storeu_ps(partial[j][t], dots[j]);                    \
    }                                                                                              \
}

#ifdef __AVX512BF16__
/* bf16 . bf16 with vdpbf16ps: 32 products per instruction, summed in pairs into 16 fp32 lanes;
 * no conversion of the keys.  A head_dim tail of 16 is zero-extended. */
static inline __attribute__((always_inline)) void scores_bf16(
        const int set, uint16_t (*q)[MAX_HEAD_DIM], const uint16_t *keys, int64_t kv_stride, int dim, int n,
        float (*partial)[LANES][LANES]) {
    for (int t = 0; t < n; t++) {
        const uint16_t *k_row = keys + t * kv_stride;
        __m512 dots[FAST_ROWS];
        for (int j = 0; j < set; j++) dots[j] = _mm512_setzero_ps();
        int c = 0;
        for (; c + 2 * LANES <= dim; c += 2 * LANES) {
            __m512bh k = (__m512bh)_mm512_loadu_si512(k_row + c);
            for (int j = 0; j < set; j++)
                dots[j] = _mm512_dpbf16_ps(dots[j], (__m512bh)_mm512_loadu_si512(q[j] + c), k);
        }
        if (c < dim) {
            __m512bh k = (__m512bh)_mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)(k_row + c)));
            for (int j = 0; j < set; j++)
                dots[j] = _mm512_dpbf16_ps(dots[j], (__m512bh)_mm512_zextsi256_si512(
                                               _mm256_loadu_si256((const __m256i *)(q[j] + c))), k);
        }
        for (int j = 0; j < set; j++) _mm512_storeu_ps(partial[j][t], dots[j]);
    }
}
#define BF16_Q_T uint16_t
#define BF16_Q_LOAD(x, scale) (x)
#define BF16_SCORE_SCALE(s) ((s)->scale)
#else
DEFINE_FMA_SCORES(scores_bf16, uint16_t, load16_bf16)
#define BF16_Q_T float
#define BF16_Q_LOAD(x, scale) (bf16_to_f32(x) * (scale))
#define BF16_SCORE_SCALE(s) 1.f
#endif
DEFINE_FMA_SCORES(scores_f32, float, load16_f32)

/* Online softmax over the sub-block: p[j] = exp(scores - running max) on visible lanes (0 elsewhere),
 * rescaling the row's sum and accumulator when its max grows. */
static inline __attribute__((always_inline)) void softmax_update(
        const int set, const __mmask16 *visible, float score_scale, float (*partial)[LANES][LANES],
        float (*acc)[MAX_HEAD_DIM], int dim, float *row_max, float *row_sum, float (*p)[LANES]) {
    for (int j = 0; j < set; j++) {
        if (!visible[j]) { _mm512_storeu_ps(p[j], _mm512_setzero_ps()); continue; }
        __m512 scores = _mm512_mul_ps(sum16((const __m512 *)partial[j]), _mm512_set1_ps(score_scale));
        float block_max = _mm512_mask_reduce_max_ps(visible[j], scores);
        if (block_max > row_max[j]) {
            float correction = expf(row_max[j] - block_max);
            row_sum[j] *= correction;
            for (int c = 0; c < dim; c += LANES)
                _mm512_storeu_ps(acc[j] + c, _mm512_mul_ps(_mm512_loadu_ps(acc[j] + c), _mm512_set1_ps(correction)));
            row_max[j] = block_max;
        }
        __m512 probs = _mm512_maskz_mov_ps(visible[j], exp16(_mm512_sub_ps(scores, _mm512_set1_ps(row_max[j]))));
        row_sum[j] += _mm512_reduce_add_ps(probs);
        _mm512_storeu_ps(p[j], probs);
    }
}

/* acc[j] += sum over t of p[j][t] * value t; each value row is loaded once for the whole set. */
#define DEFINE_ACCUMULATE(NAME, T, LOAD16)                                                        \
static inline __attribute__((always_inline)) void NAME(                                          \
        const int set, float (*p)[LANES], const T *values, int64_t kv_stride, int dim, int n,      \
        float (*acc)[MAX_HEAD_DIM]) {                                                              \
    for (int c = 0; c < dim; c += LANES) {                                                         \
        __m512 sums[FAST_ROWS];                                                                    \
        for (int j = 0; j < set; j++) sums[j] = _mm512_loadu_ps(acc[j] + c);                       \
        for (int t = 0; t < n; t++) {                                                              \
            __m512 v = LOAD16(values + t * kv_stride + c);                                        \
            for (int j = 0; j < set; j++) sums[j] = _mm512_fmadd_ps(_mm512_set1_ps(p[j][t]), v, sums[j]); \
        }                                                                                          \
        for (int j = 0; j < set; j++) _mm512_storeu_ps(acc[j] + c, sums[j]);                       \
    }                                                                                              \
}
DEFINE_ACCUMULATE(accumulate_bf16, uint16_t, load16_bf16)
DEFINE_ACCUMULATE(accumulate_f32, float, load16_f32)

#define DEFINE_FAST_SET(NAME, T, Q_T, SCORES, ACCUMULATE)                                          \
static inline __attribute__((always_inline)) void NAME(                                          \
        const int set, const T *keys, const T *values, int64_t kv_stride, int dim, int n,           \
        int64_t first, int window, float score_scale, Q_T (*q)[MAX_HEAD_DIM], float (*acc)[MAX_HEAD_DIM], \
        float *row_max, float *row_sum, const int64_t *row_pos, float (*partial)[LANES][LANES]) {  \
    __mmask16 visible[FAST_ROWS], any = 0;                                                         \
    for (int j = 0; j < set; j++) {                                                                \
        visible[j] = visible_lanes(first, n, row_pos[j], window);                                  \
        any |= visible[j];                                                                         \
    }                                                                                              \
    if (!any) return;                                                                              \
    float p[FAST_ROWS][LANES];                                                                     \
    SCORES(set, q, keys, kv_stride, dim, n, partial);                                              \
    softmax_update(set, visible, score_scale, partial, acc, dim, row_max, row_sum, p);            \
    ACCUMULATE(set, p, values, kv_stride, dim, n, acc);                                            \
}
DEFINE_FAST_SET(fast_set_bf16, uint16_t, BF16_Q_T, scores_bf16, accumulate_bf16)
DEFINE_FAST_SET(fast_set_f32, float, float, scores_f32, accumulate_f32)

#define DEFINE_FAST_WORK_ITEM(NAME, SET_NAME, T, Q_T, Q_LOAD, SCORE_SCALE, STORE)                   \
static void NAME(const Shape *s, T *out, const T *query, const T *key_cache, const T *value_cache, \
                 int req, int first_kv_head, int num_kv, int first_token, int num_tokens) {        \
    const int dim = s->head_dim, group = s->num_heads / s->num_kv_heads;                         \
    const int rows_per_kv = num_tokens * group, rows = rows_per_kv * num_kv, bs = s->block_size;  \
    const int64_t q_start = s->query_start_loc[req];                                               \
    const int64_t query_len = s->query_start_loc[req + 1] - q_start;                               \
    const int64_t context_len = s->context_lens[req];                                              \
    const int64_t *table = s->block_tables + (int64_t)req * s->block_table_stride;                 \
    const int64_t kv_stride = (int64_t)s->num_kv_heads * dim;                                     \
    /* Row r: KV head first_kv_head + r / rows_per_kv, token r % rows_per_kv / group and query    \
     * head kv_head * group + r % group, so the rows of one KV head are consecutive. */           \
    Q_T q[MAX_ROWS][MAX_HEAD_DIM];                                                                 \
    float acc[MAX_ROWS][MAX_HEAD_DIM];                                                             \
    float row_max[MAX_ROWS], row_sum[MAX_ROWS], partial[FAST_ROWS][LANES][LANES];                  \
    int64_t row_pos[MAX_ROWS];                                                                     \
    for (int r = 0; r < rows; r++) {                                                               \
        int kv_head = first_kv_head + r / rows_per_kv, token = first_token + r % rows_per_kv / group; \
        const T *src = query + (q_start + token) * s->query_stride                                 \
                       + (int64_t)(kv_head * group + r % group) * dim;                             \
        for (int d = 0; d < dim; d++) { q[r][d] = Q_LOAD(src[d], s->scale); acc[r][d] = 0.f; }     \
        row_max[r] = -INFINITY;                                                                    \
        row_sum[r] = 0.f;                                                                          \
        row_pos[r] = context_len - query_len + token;                                              \
    }                                                                                              \
    memset(partial, 0, sizeof partial);  /* lanes past a short sub-block are summed, then masked */ \
    const int64_t first_pos = context_len - query_len + first_token, last_pos = first_pos + num_tokens - 1; \
    int64_t first_key = 0;                                                                         \
    if (s->window > 0 && first_pos - s->window + 1 > 0) first_key = first_pos - s->window + 1;    \
    for (int64_t block_start = first_key / bs * bs; block_start <= last_pos; block_start += bs) {  \
        const int64_t base = table[block_start / bs] * bs;                                         \
        const int block_n = (int)(last_pos + 1 - block_start < bs ? last_pos + 1 - block_start : bs); \
        if (block_start + bs <= last_pos) {                                                        \
            const int64_t next = table[block_start / bs + 1] * bs * kv_stride;                     \
            prefetch_block(key_cache + next, value_cache + next, (size_t)bs * kv_stride * sizeof(T)); \
        }                                                                                          \
        for (int t0 = 0; t0 < block_n; t0 += LANES) {                                              \
            const int n = block_n - t0 < LANES ? block_n - t0 : LANES;                             \
            for (int r0 = 0, set = 0; r0 < rows; r0 += set) {                                      \
                set = rows_per_kv - r0 % rows_per_kv < FAST_ROWS ? rows_per_kv - r0 % rows_per_kv : FAST_ROWS; \
                const int64_t offset = (base + t0) * kv_stride + (int64_t)(first_kv_head + r0 / rows_per_kv) * dim; \
                const T *keys = key_cache + offset, *values = value_cache + offset;                \
                const int64_t first = block_start + t0;                                            \
                const float score_scale = SCORE_SCALE(s);                                          \
                switch (set) { /* a constant set size per call, for the unrolled loops */          \
                case 1: SET_NAME(1, keys, values, kv_stride, dim, n, first, s->window, score_scale, \
                                 q + r0, acc + r0, row_max + r0, row_sum + r0, row_pos + r0, partial); break; \
                case 2: SET_NAME(2, keys, values, kv_stride, dim, n, first, s->window, score_scale, \
                                 q + r0, acc + r0, row_max + r0, row_sum + r0, row_pos + r0, partial); break; \
                case 3: SET_NAME(3, keys, values, kv_stride, dim, n, first, s->window, score_scale, \
                                 q + r0, acc + r0, row_max + r0, row_sum + r0, row_pos + r0, partial); break; \
                default: SET_NAME(FAST_ROWS, keys, values, kv_stride, dim, n, first, s->window, score_scale, \
                                  q + r0, acc + r0, row_max + r0, row_sum + r0, row_pos + r0, partial); \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    for (int r = 0; r < rows; r++) {                                                               \
        int kv_head = first_kv_head + r / rows_per_kv, token = first_token + r % rows_per_kv / group; \
        T *dst = out + ((q_start + token) * s->num_heads + kv_head * group + r % group) * dim;     \
        float inv = 1.f / row_sum[r];                                                              \
        for (int d = 0; d < dim; d++) dst[d] = STORE(acc[r][d] * inv);                             \
    }                                                                                              \
}

#define F32_Q_LOAD(x, scale) ((x) * (scale))
#define F32_SCORE_SCALE(s) 1.f
DEFINE_FAST_WORK_ITEM(fast_work_item_bf16, fast_set_bf16, uint16_t, BF16_Q_T, BF16_Q_LOAD, BF16_SCORE_SCALE, STORE_BF16)
DEFINE_FAST_WORK_ITEM(fast_work_item_f32, fast_set_f32, float, float, F32_Q_LOAD, F32_SCORE_SCALE, STORE_F32)
#endif

/* Limits a caller checks before calling: rows per work item, head_dim and block_size. */
int paged_attention_max_rows(void) { return MAX_ROWS; }
int paged_attention_max_head_dim(void) { return MAX_HEAD_DIM; }
int paged_attention_max_block_size(void) { return MAX_BLOCK_SIZE; }

/* dtype: 0 bf16, 1 fp32.  Each selected request is cut into work items (a few query tokens, a
 * range of KV heads); items run in parallel (OpenMP). */
void paged_attention(int dtype, void *out, const void *query, const void *key_cache, const void *value_cache,
                     const int64_t *block_tables, int64_t block_table_stride,
                     const int64_t *query_start_loc, const int64_t *context_lens,
                     const int32_t *requests, int num_requests,
                     int num_heads, int num_kv_heads, int head_dim, int block_size,
                     float scale, int window, int64_t query_stride) {
    Shape s = {block_tables, block_table_stride, query_start_loc, context_lens,
               num_heads, num_kv_heads, head_dim, block_size, window, scale, query_stride};
    const int group = num_heads / num_kv_heads;
    /* All KV heads per item where the rows fit; fewer (a divisor) where they do not, or where
     * too few requests would leave threads idle. */
    int kv_per_item = num_kv_heads;
    while (kv_per_item > 1 && kv_per_item % 2 == 0
           && (group * kv_per_item > MAX_ROWS || num_requests * (num_kv_heads / kv_per_item) < 4 * omp_get_max_threads()))
        kv_per_item /= 2;
    while (group * kv_per_item > MAX_ROWS || num_kv_heads % kv_per_item) kv_per_item--;
    const int kv_splits = num_kv_heads / kv_per_item;
    const int tokens_per_item = MAX_ROWS / (group * kv_per_item);
    /* [3 tokens, 70 tokens] with 32 tokens per item -> items per request [1, 3], first items [0, 1, 4] */
    int first_item[num_requests + 1];
    first_item[0] = 0;
    for (int i = 0; i < num_requests; i++) {
        int req = requests[i];
        int query_len = (int)(query_start_loc[req + 1] - query_start_loc[req]);
        first_item[i + 1] = first_item[i] + (query_len + tokens_per_item - 1) / tokens_per_item;
    }
    const int num_items = first_item[num_requests] * kv_splits;
#pragma omp parallel for schedule(dynamic, 1)
    for (int item = 0; item < num_items; item++) {
        int first_kv_head = item % kv_splits * kv_per_item, chunk = item / kv_splits;
        int lo = 0, hi = num_requests - 1;  /* the request i with first_item[i] <= chunk < first_item[i + 1] */
        while (lo < hi) {
            int mid = (lo + hi + 1) / 2;
            if (first_item[mid] <= chunk) lo = mid; else hi = mid - 1;
        }
        int i = lo;
        int req = requests[i];
        int query_len = (int)(query_start_loc[req + 1] - query_start_loc[req]);
        int first_token = (chunk - first_item[i]) * tokens_per_item;
        int num_tokens = query_len - first_token < tokens_per_item ? query_len - first_token : tokens_per_item;
#ifdef HAVE_FAST_PATH
        if (head_dim % LANES == 0) {
            if (dtype == 0)
                fast_work_item_bf16(&s, (uint16_t *)out, query, key_cache, value_cache, req, first_kv_head,
                                    kv_per_item, first_token, num_tokens);
            else
                fast_work_item_f32(&s, (float *)out, query, key_cache, value_cache, req, first_kv_head,
                                   kv_per_item, first_token, num_tokens);
            continue;
        }
#endif
        if (dtype == 0)
            work_item_bf16(&s, (uint16_t *)out, query, key_cache, value_cache, req, first_kv_head, kv_per_item,
                           first_token, num_tokens);
        else
            work_item_f32(&s, (float *)out, query, key_cache, value_cache, req, first_kv_head, kv_per_item,
                          first_token, num_tokens);
    }
}
