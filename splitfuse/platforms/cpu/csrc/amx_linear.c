/* bf16 linear layers on Intel AMX: y[M, N] = x[M, K] W[N, K]^T (+ bias), fp32 accumulation.
 *
 * oneDNN compiles a kernel per row count and, at decode sizes (tens of rows), reads the weight
 * well below the memory bandwidth; this kernel needs no compiling and streams the weight.
 *
 * The weight is packed once (amx_pack_weight) into tiles of 16 k-pairs x 16 output columns
 * (AMX's "VNNI" layout: W[n, 2p] and W[n, 2p + 1] side by side), two column blocks of 16 at a
 * time, k-step after k-step, so the tiles a column pair needs lie one after the other in memory:
 *
 *     packed[((pair * K / 32 + kstep) * 2 + half) * 512 + p * 32 + c * 2 + j]
 *         = W[32 pair + 16 half + c, 32 kstep + 2 p + j]
 *
 * with N padded with zero columns to a multiple of 32; K must be a multiple of 32.
 *
 * Tiles: C 0..3 (rows 0-15 x columns 0-15, 0-15 x 16-31, 16-31 x 0-15, 16-31 x 16-31), A 4-5 (the
 * two 16-row blocks of x), B 6-7 (the two column blocks). Rows go in blocks of up to 1,024; within
 * a block, work is split among threads by contiguous ranges of (column chunk, 32-row group, column
 * pair), so a chunk's weight (~1 MB) stays in a core's L2 while the block's row groups pass over it.
 * Results equal oneDNN's bf16 matmul bit for bit on this project's machines (tests/unit/test_amx_linear.py
 * checks against fp32 within rounding).
 */

#define _GNU_SOURCE  /* syscall() */
#include <stdint.h>
#include <string.h>

#include "splitfuse_kernels.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)  /* every AMX CPU has AVX512-BF16 */
#define SPLITFUSE_AMX 1
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "vector_math.h"
#endif

#define TILE_ELEMENTS 512     /* one B tile: 16 k-pairs x 16 columns x 2 */
#define CHUNK_BYTES (1 << 20)
#define BLOCK_GROUPS 32      /* 32-row groups per row block */
#define PREFETCH_KSTEPS 2    /* how far ahead the weight is prefetched into L1 (2 KB a k-step) */

int amx_linear_available(void) {
#ifdef SPLITFUSE_AMX
    /* Linux hands out the AMX register state only on request (ARCH_REQ_XCOMP_PERM for XTILEDATA). */
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
#else
    return 0;
#endif
}

/* packed holds (n rounded up to 32) * k elements (platforms/cpu/kernels.py's amx_packed_columns). */

void amx_pack_weight(uint16_t *restrict packed, const uint16_t *restrict weight, int64_t n, int64_t k) {
    const int64_t ksteps = k / 32, pairs = (n + 31) / 32;
    #pragma omp parallel for
    for (int64_t pair = 0; pair < pairs; pair++) {
        for (int64_t kstep = 0; kstep < ksteps; kstep++) {
            for (int half = 0; half < 2; half++) {
                uint16_t *tile = packed + ((pair * ksteps + kstep) * 2 + half) * TILE_ELEMENTS;
                for (int c = 0; c < 16; c++) {
                    const int64_t column = pair * 32 + half * 16 + c;
                    for (int i = 0; i < 32; i++)  /* i = 2p + j */
                        tile[(i / 2) * 32 + c * 2 + (i % 2)] = column < n ? weight[column * k + kstep * 32 + i] : 0;
                }
            }
        }
    }
}

#ifdef SPLITFUSE_AMX
typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

static void configure(int rows0, int rows1) {
    tile_config config;
    memset(&config, 0, sizeof config);
    config.palette_id = 1;
    const int rows[8] = {rows0, rows0, rows1, rows1, rows0, rows1, 16, 16};
    for (int t = 0; t < 8; t++) {
        if (rows[t] == 0) continue;
        config.rows[t] = (uint8_t)rows[t];
        config.colsb[t] = 64;
    }
    _tile_loadconfig(&config);
}

/* 32 fp32 values -> 32 bf16, rounded to nearest even (NaN stays NaN), like torch's .to(torch.bfloat16). */
static inline __m512i round_bf16(__m512 low, __m512 high) {
    return (__m512i)_mm512_cvtne2ps_pbh(high, low);  /* (fp32 denormals flush to zero, as in AMX's sums) */
}

/* Writes rows x 32 fp32 results (row stride 32) to y as bf16, adding bias (fp32 [32] or NULL), keeping
 * columns < valid. */
static void store_rows(uint16_t *y, int64_t y_stride, const float *acc, int rows, const float *bias32, int valid) {
    const __mmask32 mask = valid >= 32 ? 0xffffffffu : (__mmask32)((1u << valid) - 1);
    if (bias32) {
        const __m512 bias0 = _mm512_loadu_ps(bias32), bias1 = _mm512_loadu_ps(bias32 + 16);
        for (int r = 0; r < rows; r++)
            _mm512_mask_storeu_epi16(y + r * y_stride, mask,
                                     round_bf16(_mm512_add_ps(_mm512_load_ps(acc + r * 32), bias0),
                                                _mm512_add_ps(_mm512_load_ps(acc + r * 32 + 16), bias1)));
    } else {
        for (int r = 0; r < rows; r++)
            _mm512_mask_storeu_epi16(y + r * y_stride, mask,
                                     round_bf16(_mm512_load_ps(acc + r * 32), _mm512_load_ps(acc + r * 32 + 16)));
    }
}

/* fp32 -> the nearest bf16, as fp32 (what a bf16 op's result holds). */
static inline __m512 to_bf16_f32(__m512 v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

/* The gate_up epilogue: columns 0-15 of acc are 16 gate columns, 16-31 the matching up columns;
 * y gets silu(gate) * up for the 16, rounding where a bf16 matmul then silu_and_mul would round. */
static void store_silu_mul_rows(uint16_t *y, int64_t y_stride, const float *acc, int rows, const float *bias32) {
    const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.f);
    const __m512 bias0 = bias32 ? _mm512_loadu_ps(bias32) : zero, bias1 = bias32 ? _mm512_loadu_ps(bias32 + 16) : zero;
    for (int r = 0; r < rows; r++) {
        __m512 gate = to_bf16_f32(_mm512_add_ps(_mm512_load_ps(acc + r * 32), bias0));
        __m512 up = to_bf16_f32(_mm512_add_ps(_mm512_load_ps(acc + r * 32 + 16), bias1));
        __m512 silu = to_bf16_f32(_mm512_div_ps(gate, _mm512_add_ps(one, exp16(_mm512_sub_ps(zero, gate)))));
        _mm256_storeu_si256((__m256i *)(y + r * y_stride), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(silu, up)));
    }
}

/* One 32-row group (rows1 == 0: one 16-row block) times one column pair, over all of K. */
static inline void group_pair(const uint16_t *x, int64_t x_stride, const uint16_t *b, int64_t ksteps, int two_blocks,
                              float *acc) {
    _tile_zero(0);
    _tile_zero(1);
    if (two_blocks) {
        _tile_zero(2);
        _tile_zero(3);
    }
    const int64_t x_bytes = x_stride * 2;
    for (int64_t kstep = 0; kstep < ksteps; kstep++) {
        const uint16_t *tiles = b + kstep * 2 * TILE_ELEMENTS;
        /* A tile load waits for the dot products still reading its tile (tiles are not renamed), so
         * the weight must already be in L1 by then; the hardware prefetchers alone leave the kernel
         * at half the speed at 32 rows. Past the pair's end this fetches the next pair's tiles. */
        const char *ahead = (const char *)(tiles + PREFETCH_KSTEPS * 2 * TILE_ELEMENTS);
        for (int line = 0; line < 2 * TILE_ELEMENTS * 2; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
        _tile_loadd(6, tiles, 64);
        _tile_loadd(7, tiles + TILE_ELEMENTS, 64);
        _tile_loadd(4, x + kstep * 32, x_bytes);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (two_blocks) {
            _tile_loadd(5, x + 16 * x_stride + kstep * 32, x_bytes);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, acc, 128);
    _tile_stored(1, acc + 16, 128);
    if (two_blocks) {
        _tile_stored(2, acc + 16 * 32, 128);
        _tile_stored(3, acc + 16 * 32 + 16, 128);
    }
}
#endif

static void linear(uint16_t *y, int64_t y_stride, const uint16_t *x, int64_t x_stride, const uint16_t *packed,
                   const float *bias, int64_t m, int64_t n, int64_t k, int silu_mul) {
#ifdef SPLITFUSE_AMX
    const int64_t ksteps = k / 32, pairs = (n + 31) / 32, all_groups = (m + 31) / 32;
    const int64_t groups = all_groups < BLOCK_GROUPS ? all_groups : BLOCK_GROUPS;
    int64_t chunk = CHUNK_BYTES / (k * 64);  /* column pairs per chunk */
    if (chunk < 1) chunk = 1;
    const int64_t chunks = (pairs + chunk - 1) / chunk;
    const int64_t items = chunks * groups * chunk;  /* (chunk, group, pair in chunk), some pairs past the end */
    /* Even one row is worth two threads from a 64 KB weight on: the weight's streaming is the cost. */
    const int parallel = n * k >= (1 << 15);
    #pragma omp parallel if (parallel)
    {
        const int threads = omp_get_num_threads(), thread = omp_get_thread_num();
        const int64_t start = items * thread / threads, end = items * (thread + 1) / threads;
        float acc[32 * 32] __attribute__((aligned(64)));
        int configured0 = -1, configured1 = -1;
        for (int64_t first_group = 0; first_group < all_groups; first_group += groups) {
          for (int64_t item = start; item < end; item++) {
            const int64_t pair = item / (groups * chunk) * chunk + item % chunk;
            const int64_t group = first_group + item / chunk % groups;
            if (pair >= pairs || group >= all_groups) continue;
            const int64_t row0 = group * 32;
            const int rows = m - row0 < 32 ? (int)(m - row0) : 32;
            const int rows0 = rows < 16 ? rows : 16, rows1 = rows - rows0;
            if (rows0 != configured0 || rows1 != configured1) {
                configure(rows0, rows1);
                configured0 = rows0;
                configured1 = rows1;
            }
            group_pair(x + row0 * x_stride, x_stride, packed + pair * ksteps * 2 * TILE_ELEMENTS, ksteps, rows1 > 0,
                       acc);
            const int64_t column = pair * 32;
            const float *bias32 = bias ? bias + column : NULL;
            if (silu_mul) {
                store_silu_mul_rows(y + row0 * y_stride + pair * 16, y_stride, acc, rows, bias32);
            } else {
                const int valid = n - column < 32 ? (int)(n - column) : 32;
                store_rows(y + row0 * y_stride + column, y_stride, acc, rows, bias32, valid);
            }
          }
        }
        if (configured0 >= 0) _tile_release();
    }
#else  /* amx_linear_available() said no: never called */
    (void)y; (void)y_stride; (void)x; (void)x_stride; (void)packed; (void)bias; (void)m; (void)n; (void)k;
    (void)silu_mul;
#endif
}

/* y[m, n] (row stride y_stride) = x[m, k] (row stride x_stride) . W^T + bias (fp32, padded with zeros
 * to a multiple of 32, or NULL). */
void amx_linear(uint16_t *y, int64_t y_stride, const uint16_t *x, int64_t x_stride, const uint16_t *packed,
                const float *bias, int64_t m, int64_t n, int64_t k) {
    linear(y, y_stride, x, x_stride, packed, bias, m, n, k, 0);
}

/* A gated MLP's first half: y[m, n / 2] = silu(gate) * up, where x . W^T gives gate and up in
 * alternating blocks of 16 columns (W's rows packed in that order, n a multiple of 32). */
void amx_linear_silu_mul(uint16_t *y, int64_t y_stride, const uint16_t *x, int64_t x_stride, const uint16_t *packed,
                         const float *bias, int64_t m, int64_t n, int64_t k) {
    linear(y, y_stride, x, x_stride, packed, bias, m, n, k, 1);
}
