/* Convolutions with few output pixels (rows of the im2col matrix) for bf16 on AMX CPUs.

   Why: at SD1.5's lowest UNet levels (4x4 and 8x8 latents, CFG batch 2: 32 and 128 output rows) a
   3x3 convolution reads 30-60 MB of weights for little arithmetic, and oneDNN's kernels there read
   them at a fraction of what a sequential stream gets (benchmarks/matmul_few_rows_cpu.py measures
   both per shape, weights cold). Here the weights are packed once into the order in which the
   tiles consume them, so each thread reads one sequential stream per chunk of the reduction.

   y[m, n] = sum_k a[m, k] w[n, k] (+ bias[n]) (+ res[m, n]), where row m is an output pixel and k
   runs over (tap, input channel): a convolution of a channels-last input through its im2col rows.
   1. a is written once as 1 KiB A tiles, zero-padded (a step: 32 values of k within one tap; rows
      padded to a multiple of 32), [row pair][step][32 rows][32]: the tiles one pair of row blocks
      reads are one sequential stream;
   2. per chunk of `chunk` steps, each thread takes its pairs of 16-column output blocks and, per
      pair of 16-row blocks, accumulates four 16x16 fp32 tiles over the chunk (A tiles from L2, the
      B tiles streamed), kept in an fp32 buffer between chunks;
   3. after the last chunk, bias and residual are added and y rounded to bf16 once.
   Tiles: tmm0-3 accumulators, tmm4-5 A operands (two row blocks), tmm6-7 B operands. */

#include <stdlib.h>

#include "amx_tiles.h"

/* Ask Linux for the AMX tile state (once per process). 0 on success. */
int few_rows_init(void) { return amx_request(); }

/* The A tile rows of rows m0 .. m0 + 16 for every step of tap `tap` (steps_per_tap steps of 32
   channels): the input pixel each output pixel sees through that tap, or zeros. Where each row
   reads from is worked out once per tap, not once per step. a_block: this row block's rows of
   step 0 (a step's rows of a row pair are 1024 values further on). */
static void im2col_tap(const bf16 *x, int64_t xn, int64_t xh, int64_t xw, int64_t H, int64_t W, int64_t C,
                       int64_t kw, int64_t stride, int64_t pad, int64_t OH, int64_t OW, int64_t M,
                       int64_t steps_per_tap, int64_t tap, int64_t m0, bf16 *a_block) {
    const int64_t ky = tap / kw, kx = tap % kw;
    const bf16 *src[16]; /* row r's input pixel through this tap, or NULL (padding, or past M) */
    for (int64_t r = 0; r < 16; r++) {
        int64_t m = m0 + r, img = m / (OH * OW), oy = m % (OH * OW) / OW, ox = m % OW;
        int64_t iy = oy * stride - pad + ky, ix = ox * stride - pad + kx;
        src[r] = m < M && iy >= 0 && iy < H && ix >= 0 && ix < W ? x + img * xn + iy * xh + ix * xw : NULL;
    }
    for (int64_t j = 0; j < steps_per_tap; j++) {
        const int64_t c = j * 32;
        const __mmask32 channels = C - c >= 32 ? 0xffffffffu : (__mmask32)((1ull << (C - c)) - 1);
        bf16 *a = a_block + (tap * steps_per_tap + j) * 32 * 32;
        for (int64_t r = 0; r < 16; r++)
            _mm512_store_si512((void *)(a + r * 32), src[r] ? _mm512_maskz_loadu_epi16(channels, src[r] + c) : _mm512_setzero_si512());
    }
}

/* Rows m0 .. m0 + 16, columns n0 .. n0 + 16 of y from acc (fp32, that block, row stride ldc floats)
   plus bias and res, rounded to bf16 once. */
static void write_rows(const float *acc, int64_t ldc, int64_t m0, int64_t n0, int64_t M, int64_t N, const float *bias,
                       const bf16 *res, int64_t rn, int64_t rh, int64_t rw, bf16 *y, int64_t yn, int64_t yh, int64_t yw,
                       int64_t OH, int64_t OW) {
    const __mmask16 cols = first(N - n0);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(cols, bias + n0) : _mm512_setzero_ps();
    for (int64_t r = 0; r < 16 && m0 + r < M; r++) {
        int64_t m = m0 + r, img = m / (OH * OW), oy = m % (OH * OW) / OW, ox = m % OW;
        __m512 o = _mm512_add_ps(_mm512_load_ps(acc + r * ldc), b);
        if (res) {
            __m256i rv = _mm256_maskz_loadu_epi16(cols, res + img * rn + oy * rh + ox * rw + n0);
            o = _mm512_add_ps(o, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(rv), 16)));
        }
        _mm256_mask_storeu_epi16(y + img * yn + oy * yh + ox * yw + n0, cols, (__m256i)_mm512_cvtneps_pbh(o));
    }
}

/* One pair of 16-column blocks over one chunk, for every pair of 16-row blocks: acc (fp32 [M_pad][N_pad],
   row stride ldc floats) += a[rows, chunk] . b[chunk, 32 columns]; b: the pair's B tiles, 2 KiB a step. */
static void chunk_pair(const bf16 *a, int64_t m_pad, int64_t all_steps, const bf16 *b, int64_t s0, int64_t steps,
                       int first_chunk, float *acc, int64_t ldc) {
    for (int64_t r = 0; r < m_pad; r += 32) {
        float *c = acc + r * ldc;
        if (first_chunk) {
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        } else {
            _tile_loadd(0, c, ldc * 4); _tile_loadd(1, c + 16, ldc * 4);
            _tile_loadd(2, c + 16 * ldc, ldc * 4); _tile_loadd(3, c + 16 * ldc + 16, ldc * 4);
        }
        for (int64_t s = 0; s < steps; s++) {
            const bf16 *as = a + (r / 32 * all_steps + s0 + s) * 32 * 32; /* row pair r / 32, step s0 + s */
            _tile_loadd(6, b + s * 1024, 64);
            _tile_loadd(4, as, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_loadd(7, b + s * 1024 + 512, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_loadd(5, as + 16 * 32, 64);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, c, ldc * 4); _tile_stored(1, c + 16, ldc * 4);
        _tile_stored(2, c + 16 * ldc, ldc * 4); _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
    }
}

/* y = conv(x, w) (+ bias) (+ res) for channels-last bf16 x [B, H, W, C] and y, res [B, OH, OW, N]
   (strides in elements per image, row and pixel; channels contiguous), a kh x kw kernel with one
   stride and padding for both axes, and w packed by the launcher: per chunk of `chunk` steps, per
   pair of 16-column blocks, per step, two 1 KiB B tiles [16 k pairs][16 columns][2]. bias: fp32 [N] or
   NULL; res may be NULL. Returns 0, or -1 when out of memory (y untouched). */
int few_rows_conv_bf16(
    const bf16 *x, int64_t xn, int64_t xh, int64_t xw,      /* input and its strides */
    int64_t B, int64_t H, int64_t W, int64_t C,              /* input shape */
    int64_t kh, int64_t kw, int64_t stride, int64_t pad,    /* kernel */
    const bf16 *w, const float *bias, int64_t N,             /* packed weights, bias, output channels */
    const bf16 *res, int64_t rn, int64_t rh, int64_t rw,    /* residual and its strides */
    bf16 *y, int64_t yn, int64_t yh, int64_t yw,            /* output and its strides */
    int64_t OH, int64_t OW, int64_t chunk, int threads) {  /* output size, steps per chunk, threads */
    const int64_t M = B * OH * OW, m_pad = (M + 31) / 32 * 32;
    const int64_t steps_per_tap = (C + 31) / 32, steps = kh * kw * steps_per_tap;
    const int64_t pairs = (N + 31) / 32, ldc = pairs * 32;
    bf16 *a = aligned_alloc(64, (size_t)steps * m_pad * 32 * sizeof(bf16));
    float *acc = aligned_alloc(64, (size_t)m_pad * ldc * sizeof(float));
    if (!a || !acc) {
        free(a); free(acc);
        return -1;
    }
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < kh * kw * (m_pad / 16); i++) { /* (16-row block rb, tap) */
            int64_t rb = i / (kh * kw), tap = i % (kh * kw);
            im2col_tap(x, xn, xh, xw, H, W, C, kw, stride, pad, OH, OW, M, steps_per_tap, tap, rb * 16,
                       a + ((rb / 2) * steps * 32 + (rb % 2) * 16) * 32);
        }
        amx_configure_tiles();
        for (int64_t s0 = 0; s0 < steps; s0 += chunk) {
            const int64_t len = steps - s0 < chunk ? steps - s0 : chunk;
#pragma omp for schedule(static)
            for (int64_t p = 0; p < pairs; p++)
                chunk_pair(a, m_pad, steps, w + (s0 * pairs + p * len) * 1024, s0, len, s0 == 0, acc + p * 32, ldc);
        }
        _tile_release();
#pragma omp for schedule(static)
        for (int64_t i = 0; i < (m_pad / 16) * (pairs * 2); i++) {
            int64_t m0 = i / (pairs * 2) * 16, n0 = i % (pairs * 2) * 16;
            write_rows(acc + m0 * ldc + n0, ldc, m0, n0, M, N, bias, res, rn, rh, rw, y, yn, yh, yw, OH, OW);
        }
    }
    free(a);
    free(acc);
    return 0;
}
