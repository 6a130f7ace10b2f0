/* Scaled dot-product attention for bf16 on x86 CPUs with AVX512-BF16, its matmuls on AMX-BF16
   tiles where the CPU has them.

   Why: torch's CPU flash attention spends most of SD1.5's 4096-token self-attention on the
   softmax's per-score work, not on the matmuls (benchmarks/attention_cpu.py measures both).
   Here the two matmuls run on AMX tiles (or, without AMX, as AVX512-BF16 dot products on the same
   packed operands) and the softmax is one AVX-512 pass that computes 2^x with a degree-3
   polynomial (relative error 8e-5, below bf16's 4e-3 rounding of P).

   Work item: 32 query rows of one (batch, head). Keys and values of every (batch, head) are
   first packed into the tiles' VNNI layout (zero-padded), then per item:
     1. S = Q K^T for all keys, fp32, into a per-thread buffer [32, keys_pad] (512 KiB at 4096
        keys: it stays in L2, so the softmax needs no running max or rescaling);
     2. per row: m = max(S), P = 2^((S - m) * scale * log2 e) as bf16, l = sum(P) in fp32;
     3. O = P V on tiles, then O / l written as bf16 to the output's strides.
   Tiles (one config for all phases): tmm0-3 accumulators [16 x 16 fp32], tmm4-5 A operands
   [16 x 32 bf16], tmm6-7 B operands [16 pairs x 16 x 2 bf16]. Without AMX each row of a B tile
   (one pair, 16 columns) is one 512-bit vector for vdpbf16ps, against a broadcast pair of A. */

#include <math.h>
#include <stdlib.h>

#include "amx_tiles.h"

#define ROWS 32 /* query rows per work item: two 16-row tiles */

static size_t round_up(size_t x, size_t m) { return (x + m - 1) / m * m; }

/* Ask Linux for the AMX tile state (once per process). 0 on success. */
int attention_init(void) { return amx_request(); }

/* K of one (batch, head) as the B operands of Q K^T, d padded to d_pad and keys to keys_pad with
   zeros: one contiguous 1 KiB tile [16 dim pairs][16 keys][2] per 32 head dims c and 16 keys j, at
   kp + (c * keys_pad / 16 + j) * 512 (contiguous tiles: row strides of a power of two bytes would
   put a tile's 16 rows in one L1 set). */
static void pack_keys(const bf16 *k, int64_t stride_n, int64_t keys, int64_t d, bf16 *kp, int64_t keys_pad, int64_t d_pad) {
    memset(kp, 0, (size_t)d_pad * keys_pad * sizeof(bf16));
    for (int64_t n = 0; n < keys; n++)
        for (int64_t i = 0; i < d; i += 2) /* a pair of head dims moves as one 32-bit word */
            memcpy(kp + (((i / 32) * (keys_pad / 16) + n / 16) * 16 + (i % 32) / 2) * 32 + (n % 16) * 2, k + n * stride_n + i, 4);
}

/* V of one (batch, head) as the B operands of P V, keys padded to keys_pad and d to dv (a multiple
   of 16) with zeros: one contiguous 1 KiB tile [16 key pairs][16 dims][2] per 32 keys s and 16 head
   dims t, at vp + (s * dv / 16 + t) * 512. */
static void pack_values(const bf16 *v, int64_t stride_n, int64_t keys, int64_t d, bf16 *vp, int64_t keys_pad, int64_t dv) {
    memset(vp, 0, (size_t)dv * keys_pad * sizeof(bf16));
    /* lane 2i takes dim i of key n, lane 2i + 1 dim i of key n + 1 */
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int64_t n = 0; n < keys; n += 2)
        for (int64_t i = 0; i < d; i += 16) {
            __mmask16 dims = d - i >= 16 ? 0xffff : (__mmask16)((1u << (d - i)) - 1);
            __m256i a = _mm256_maskz_loadu_epi16(dims, v + n * stride_n + i);
            __m256i b = n + 1 < keys ? _mm256_maskz_loadu_epi16(dims, v + (n + 1) * stride_n + i) : _mm256_setzero_si256();
            __m512i ab = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
            _mm512_storeu_si512((void *)(vp + (((n / 32) * (dv / 16) + i / 16) * 16 + (n % 32) / 2) * 32),
                                _mm512_permutexvar_epi16(interleave, ab));
        }
}

/* 2^x for x <= 0 (16 lanes): 2^round(x) times a degree-3 fit of 2^f on [-0.5, 0.5]. Very negative
   x gives 0 (scalef underflows), as the softmax wants. */
static inline __m512 exp2_neg(__m512 x) {
    __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(0.0550887671f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.242604656f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.693276283f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.999928905f));
    return _mm512_scalef_ps(p, n);
}

/* Step 1: s[32, keys_pad] (row stride ls floats) = q_rows[32, d_pad] . kp (all keys). */
static void scores(const bf16 *q_rows, int64_t d_pad, const bf16 *kp, int64_t keys_pad, float *s, int64_t ls) {
    const int64_t tiles = keys_pad / 16;
    for (int64_t j = 0; j < tiles; j += 2) {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int64_t c = 0; c < d_pad / 32; c++) {
            _tile_loadd(4, q_rows + 32 * c, d_pad * 2);                 /* rows 0-15, dims 32c.. */
            _tile_loadd(5, q_rows + 16 * d_pad + 32 * c, d_pad * 2);    /* rows 16-31 */
            _tile_loadd(6, kp + (c * tiles + j) * 512, 64);            /* keys 16j.. */
            _tile_loadd(7, kp + (c * tiles + j + 1) * 512, 64);        /* keys 16j+16.. */
            _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, s + 16 * j, ls * 4);
        _tile_stored(1, s + 16 * j + 16, ls * 4);
        _tile_stored(2, s + 16 * ls + 16 * j, ls * 4);
        _tile_stored(3, s + 16 * ls + 16 * j + 16, ls * 4);
    }
}

/* Without AMX, steps 1 and 3 for ROWS_AVX rows of A: out[r, 16 col ..] (fp32, row stride lo) = the
   sum over pairs g < pairs of a[r, 2g : 2g + 2] (bf16, row stride la) times row g of B's tiles
   col .. col + W - 1, B laid out as the AMX B operands: tile (g / 16, col) at b + ((g / 16) *
   tiles + col) * 512, pair g % 16 its row of 16 columns x 2. W (1 or 2) is a constant at each call. */
#define ROWS_AVX 8 /* 8 rows x 2 tiles: 16 accumulators, 2 B vectors, 1 broadcast of 32 registers */
static inline __attribute__((always_inline)) void dot_rows(const bf16 *a, int64_t la, int64_t pairs, const bf16 *b,
                                                           int64_t tiles, int64_t col, const int W, float *out, int64_t lo) {
    __m512 acc[ROWS_AVX][2];
    for (int r = 0; r < ROWS_AVX; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t g = 0; g < pairs; g++) {
        const bf16 *row = b + ((g / 16) * tiles + col) * 512 + (g % 16) * 32;
        __m512bh b0 = (__m512bh)_mm512_load_si512((const void *)row);
        __m512bh b1 = W == 2 ? (__m512bh)_mm512_load_si512((const void *)(row + 512)) : b0;
        for (int r = 0; r < ROWS_AVX; r++) {
            int32_t pair;
            memcpy(&pair, a + r * la + 2 * g, 4);
            __m512bh ab = (__m512bh)_mm512_set1_epi32(pair);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], ab, b0);
            if (W == 2) acc[r][1] = _mm512_dpbf16_ps(acc[r][1], ab, b1);
        }
    }
    for (int r = 0; r < ROWS_AVX; r++) {
        _mm512_storeu_ps(out + r * lo + 16 * col, acc[r][0]);
        if (W == 2) _mm512_storeu_ps(out + r * lo + 16 * col + 16, acc[r][1]);
    }
}

/* Step 1 without AMX: as `scores`, over the d / 2 pairs of head dims that are not padding. */
static void scores_avx512(const bf16 *q_rows, int64_t d_pad, int64_t d, const bf16 *kp, int64_t keys_pad, float *s, int64_t ls) {
    const int64_t tiles = keys_pad / 16; /* even: keys_pad is a multiple of 32 */
    for (int64_t r = 0; r < ROWS; r += ROWS_AVX)
        for (int64_t j = 0; j < tiles; j += 2) dot_rows(q_rows + r * d_pad, d_pad, d / 2, kp, tiles, j, 2, s + r * ls, ls);
}

/* Step 3 without AMX: as `weighted_values`. */
static void weighted_values_avx512(const bf16 *p, int64_t lp, int64_t keys_pad, const bf16 *vp, int64_t dv, float *o,
                                   int64_t lo) {
    const int64_t tiles = dv / 16;
    for (int64_t r = 0; r < ROWS; r += ROWS_AVX) {
        int64_t t = 0;
        for (; t + 2 <= tiles; t += 2) dot_rows(p + r * lp, lp, keys_pad / 2, vp, tiles, t, 2, o + r * lo, lo);
        if (t < tiles) dot_rows(p + r * lp, lp, keys_pad / 2, vp, tiles, t, 1, o + r * lo, lo);
    }
}

/* Step 2, one row: p[keys_pad] = 2^((s - max s) * c) as bf16 (zero past `keys`); returns sum(p). */
static float softmax_row(const float *s, int64_t keys, int64_t keys_pad, float c, bf16 *p) {
    __m512 m = _mm512_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 16 <= keys; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + j));
    if (j < keys) m = _mm512_mask_max_ps(m, first(keys - j), m, _mm512_maskz_loadu_ps(first(keys - j), s + j));
    __m512 cv = _mm512_set1_ps(c), shift = _mm512_set1_ps(-_mm512_reduce_max_ps(m) * c);
    __m512 sum = _mm512_setzero_ps();
    for (j = 0; j + 32 <= keys; j += 32) { /* whole chunks of 32 keys */
        __m512 a = exp2_neg(_mm512_fmadd_ps(_mm512_loadu_ps(s + j), cv, shift));
        __m512 b = exp2_neg(_mm512_fmadd_ps(_mm512_loadu_ps(s + j + 16), cv, shift));
        sum = _mm512_add_ps(sum, _mm512_add_ps(a, b));
        _mm512_storeu_si512((void *)(p + j), (__m512i)_mm512_cvtne2ps_pbh(b, a));
    }
    if (j < keys_pad) { /* the last, partial chunk; zero up to keys_pad */
        __mmask16 lo = first(keys - j), hi = first(keys - j - 16);
        __m512 a = _mm512_maskz_mov_ps(lo, exp2_neg(_mm512_fmadd_ps(_mm512_maskz_loadu_ps(lo, s + j), cv, shift)));
        __m512 b = _mm512_maskz_mov_ps(hi, exp2_neg(_mm512_fmadd_ps(_mm512_maskz_loadu_ps(hi, s + j + 16), cv, shift)));
        sum = _mm512_add_ps(sum, _mm512_add_ps(a, b));
        _mm512_storeu_si512((void *)(p + j), (__m512i)_mm512_cvtne2ps_pbh(b, a));
    }
    return _mm512_reduce_add_ps(sum);
}

/* Step 3: o[32, dv] (fp32, row stride lo) = p[32, keys_pad] (row stride lp) . vp; dims in pairs of
   16-wide tiles, then a single one where dv / 16 is odd (d = 40 needs 3 tiles, not 4). */
static void weighted_values(const bf16 *p, int64_t lp, int64_t keys_pad, const bf16 *vp, int64_t dv, float *o, int64_t lo) {
    const int64_t tiles = dv / 16;
    int64_t t = 0;
    for (; t + 2 <= tiles; t += 2) {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int64_t j = 0; j < keys_pad / 32; j++) {
            _tile_loadd(4, p + 32 * j, lp * 2);                 /* rows 0-15, keys 32j.. */
            _tile_loadd(5, p + 16 * lp + 32 * j, lp * 2);       /* rows 16-31 */
            _tile_loadd(6, vp + (j * tiles + t) * 512, 64);     /* dims 16t.. */
            _tile_loadd(7, vp + (j * tiles + t + 1) * 512, 64); /* dims 16t+16.. */
            _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, o + 16 * t, lo * 4);
        _tile_stored(1, o + 16 * t + 16, lo * 4);
        _tile_stored(2, o + 16 * lo + 16 * t, lo * 4);
        _tile_stored(3, o + 16 * lo + 16 * t + 16, lo * 4);
    }
    if (t < tiles) {
        _tile_zero(0); _tile_zero(2);
        for (int64_t j = 0; j < keys_pad / 32; j++) {
            _tile_loadd(4, p + 32 * j, lp * 2);
            _tile_loadd(5, p + 16 * lp + 32 * j, lp * 2);
            _tile_loadd(6, vp + (j * tiles + t) * 512, 64);
            _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(2, 5, 6);
        }
        _tile_stored(0, o + 16 * t, lo * 4);
        _tile_stored(2, o + 16 * lo + 16 * t, lo * 4);
    }
}

/* o[b, h, n, :] = softmax(q k^T * scale) v for bf16 q [B, H, Nq, d], k and v [B, H, Nk, d], each
   addressed by its own (batch, head, token) strides in elements with d contiguous; o likewise.
   d must be even. `amx`: 1 runs the matmuls on AMX tiles (the process must hold the tile state,
   attention_init), 0 as AVX512-BF16 dot products. Returns 0, or -1 when out of memory (the output
   is then incomplete). */
int attention_bf16(
    const bf16 *q, int64_t q_sb, int64_t q_sh, int64_t q_sn,  /* queries and their strides */
    const bf16 *k, int64_t k_sb, int64_t k_sh, int64_t k_sn,  /* keys */
    const bf16 *v, int64_t v_sb, int64_t v_sh, int64_t v_sn,  /* values */
    bf16 *o, int64_t o_sb, int64_t o_sh, int64_t o_sn,        /* output */
    int64_t batch, int64_t heads, int64_t queries, int64_t keys, int64_t d,
    float scale, int threads, int amx) {
    const int64_t keys_pad = round_up(keys, 32), d_pad = round_up(d, 32), dv = round_up(d, 16);
    const int64_t ls = keys_pad + 16, lp = keys_pad + 32; /* row strides of S and P: 64 bytes past a multiple of 128 */
    const int64_t bh = batch * heads, blocks = (queries + ROWS - 1) / ROWS;
    const size_t packed = (size_t)d_pad * keys_pad; /* bf16 elements per (batch, head), for K and for V */
    bf16 *kp = aligned_alloc(64, packed * bh * sizeof(bf16));
    bf16 *vp = aligned_alloc(64, packed * bh * sizeof(bf16));
    const int packed_ok = kp != NULL && vp != NULL;
    const float c = scale * 1.4426950408889634f; /* scores to base-2 exponents */
    int failed = !packed_ok;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        if (packed_ok) {
#pragma omp for schedule(static)
            for (int64_t i = 0; i < bh; i++) {
                int64_t b = i / heads, h = i % heads;
                pack_keys(k + b * k_sb + h * k_sh, k_sn, keys, d, kp + i * packed, keys_pad, d_pad);
                pack_values(v + b * v_sb + h * v_sh, v_sn, keys, d, vp + i * packed, keys_pad, dv);
            } /* (the loop's end waits for every thread: all keys and values are packed) */
        }
        float *s = aligned_alloc(64, ROWS * ls * sizeof(float));
        bf16 *p = aligned_alloc(64, ROWS * lp * sizeof(bf16));
        bf16 *q_rows = aligned_alloc(64, ROWS * d_pad * sizeof(bf16));
        float *acc = aligned_alloc(64, ROWS * d_pad * sizeof(float));
        float sums[ROWS];
        int ok = packed_ok && s && p && q_rows && acc;
        if (ok && amx) amx_configure_tiles();
#pragma omp for schedule(static)
        for (int64_t item = 0; item < bh * blocks; item++) {
            if (!ok) continue;
            int64_t i = item / blocks, n0 = item % blocks * ROWS;
            int64_t b = i / heads, h = i % heads, rows = queries - n0 < ROWS ? queries - n0 : ROWS;
            memset(q_rows, 0, ROWS * d_pad * sizeof(bf16));
            for (int64_t r = 0; r < rows; r++)
                memcpy(q_rows + r * d_pad, q + b * q_sb + h * q_sh + (n0 + r) * q_sn, d * sizeof(bf16));
            if (amx) scores(q_rows, d_pad, kp + i * packed, keys_pad, s, ls);
            else scores_avx512(q_rows, d_pad, d, kp + i * packed, keys_pad, s, ls);
            for (int64_t r = 0; r < rows; r++) sums[r] = softmax_row(s + r * ls, keys, keys_pad, c, p + r * lp);
            if (rows < ROWS) memset(p + rows * lp, 0, (ROWS - rows) * lp * sizeof(bf16)); /* padding rows */
            if (amx) weighted_values(p, lp, keys_pad, vp + i * packed, dv, acc, d_pad);
            else weighted_values_avx512(p, lp, keys_pad, vp + i * packed, dv, acc, d_pad);
            for (int64_t r = 0; r < rows; r++) {
                bf16 *out = o + b * o_sb + h * o_sh + (n0 + r) * o_sn;
                __m512 inv = _mm512_set1_ps(1.0f / sums[r]);
                for (int64_t e = 0; e < d; e += 16) {
                    __mmask16 dims = d - e >= 16 ? 0xffff : (__mmask16)((1u << (d - e)) - 1);
                    __m256bh y = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(acc + r * d_pad + e), inv));
                    _mm256_mask_storeu_epi16(out + e, dims, (__m256i)y);
                }
            }
        }
        if (ok && amx) _tile_release();
        failed |= !ok;
        free(s); free(p); free(q_rows); free(acc);
    }
    free(kp);
    free(vp);
    return failed ? -1 : 0;
}
