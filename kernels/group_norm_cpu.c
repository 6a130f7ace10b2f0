/* GroupNorm (then SiLU) of channels-last fp32 or bf16 tensors on x86 CPUs with AVX-512.

   Why: oneDNN's packed convolutions return channels-last tensors, so nearly every GroupNorm in
   the UNet and the VAE decoder sees one, and torch runs GroupNorm and SiLU there as separate
   passes (benchmarks/group_norm_cpu.py times both). Here it is two passes over memory:
     1. per image and channel, the sum and sum of squares of (x - shift), shift being the
        channel's value at the first pixel (so a large mean does not cancel the variance away),
        in fp32 over blocks of BLOCK pixels and in fp64 across blocks and threads;
     2. y = (x - shift[c]) * a[c] + b[c], with a and b folding the group's mean and 1/std and the
        affine parameters (x * a + b alone would cancel where the mean is large against the
        spread), then y * sigmoid(y), written in the input's dtype.
   x is [images, pixels, channels] with channels contiguous; channels a multiple of 16. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define BLOCK 64  /* pixels summed in fp32 registers before they are added in fp64 */
#define CHUNK 64  /* channels per register block: 4 vectors of sums and 4 of squares */

typedef uint16_t bf16;

/* 16 channels at element `i` as fp32 (bf16 widens exactly: its bits are fp32's upper half). */
static inline __m512 load16(const void *x, int is_bf16, int64_t i) {
    if (is_bf16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const bf16 *)x + i))), 16));
    return _mm512_loadu_ps((const float *)x + i);
}

static inline void store16(void *y, int is_bf16, int64_t i, __m512 v) {
    if (is_bf16) _mm256_storeu_si256((__m256i *)((bf16 *)y + i), (__m256i)_mm512_cvtneps_pbh(v));
    else _mm512_storeu_ps((float *)y + i, v);
}

/* e^x (16 lanes): 2^n * p(f) with x log2 e = n + f, f in [-0.5, 0.5], p the degree-6 Taylor
   polynomial of 2^f (relative error 1.2e-7); x clamped to [-87, 88] so it stays finite. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24022650695910071f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69314718055994531f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* y * sigmoid(y) = y / (1 + e^-y) to fp32 accuracy: the reciprocal by rcp14 and one Newton step. */
static inline __m512 silu16(__m512 y) {
    __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), y)));
    __m512 r = _mm512_rcp14_ps(d);
    r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
    return _mm512_mul_ps(y, r);
}

/* The same to bf16 accuracy (relative error 1e-4 against bf16's 4e-3 rounding): a degree-3 fit of
   2^f and rcp14 alone. Very negative y gives e^-y = inf and 1 / inf = 0: silu's limit. */
static inline __m512 silu16_bf16(__m512 y) {
    __m512 t = _mm512_mul_ps(y, _mm512_set1_ps(-1.4426950408889634f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(0.0550887671f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.242604656f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.693276283f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.999928905f));
    __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_scalef_ps(p, n));
    return _mm512_mul_ps(y, _mm512_rcp14_ps(d));
}

/* Pass 1 over pixels [p0, p1) for channels [c0, c0 + 16 * VECS): add the sums and squares of
   x - shift into sum[c], sq[c] (fp64), in fp32 registers over blocks of BLOCK pixels. Inlined with
   constant VECS and IS_BF16 so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void moments_chunk(
    const void *x, const int IS_BF16, const int VECS, int64_t channels, int64_t c0,
    const float *shift, int64_t p0, int64_t p1, double *sum, double *sq) {
    __m512 sh[CHUNK / 16];
    for (int v = 0; v < VECS; v++) sh[v] = _mm512_loadu_ps(shift + c0 + 16 * v);
    for (int64_t b0 = p0; b0 < p1; b0 += BLOCK) {
        __m512 s[CHUNK / 16], q[CHUNK / 16];
        for (int v = 0; v < VECS; v++) s[v] = q[v] = _mm512_setzero_ps();
        int64_t b1 = b0 + BLOCK < p1 ? b0 + BLOCK : p1;
        for (int64_t p = b0; p < b1; p++)
            for (int v = 0; v < VECS; v++) {
                __m512 d = _mm512_sub_ps(load16(x, IS_BF16, p * channels + c0 + 16 * v), sh[v]);
                s[v] = _mm512_add_ps(s[v], d);
                q[v] = _mm512_fmadd_ps(d, d, q[v]);
            }
        for (int v = 0; v < VECS; v++) {
            float fs[16], fq[16];
            _mm512_storeu_ps(fs, s[v]);
            _mm512_storeu_ps(fq, q[v]);
            for (int l = 0; l < 16; l++) {
                sum[c0 + 16 * v + l] += fs[l];
                sq[c0 + 16 * v + l] += fq[l];
            }
        }
    }
}

/* Pass 1 for pixels [p0, p1) of one image, every channel. */
static void moments(const void *x, int is_bf16, int64_t channels, const float *shift, int64_t p0, int64_t p1, double *sum, double *sq) {
    for (int64_t c0 = 0; c0 < channels; c0 += CHUNK) {
        int64_t vecs = channels - c0 >= CHUNK ? CHUNK / 16 : (channels - c0) / 16;
#define CASE(V)                                                                                  \
    case V:                                                                                      \
        if (is_bf16) moments_chunk(x, 1, V, channels, c0, shift, p0, p1, sum, sq);               \
        else moments_chunk(x, 0, V, channels, c0, shift, p0, p1, sum, sq);                       \
        break;
        switch (vecs) { CASE(1) CASE(2) CASE(3) CASE(4) }
#undef CASE
    }
}

/* Pass 2 for pixels [p0, p1): y = (x - shift) * a + b, then SiLU, in x's dtype. */
static inline __attribute__((always_inline)) void normalize(
    const void *x, void *y, const int IS_BF16, const int SILU, int64_t channels,
    const float *shift, const float *a, const float *b, int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p++)
        for (int64_t c = 0; c < channels; c += 16) {
            int64_t i = p * channels + c;
            __m512 d = _mm512_sub_ps(load16(x, IS_BF16, i), _mm512_loadu_ps(shift + c));
            __m512 v = _mm512_fmadd_ps(d, _mm512_loadu_ps(a + c), _mm512_loadu_ps(b + c));
            if (SILU) v = IS_BF16 ? silu16_bf16(v) : silu16(v);
            store16(y, IS_BF16, i, v);
        }
}

/* GroupNorm over `groups` groups of [images, pixels, channels] x (fp32, or bf16 when is_bf16),
   then SiLU when `silu`, into y (same dtype and layout). weight and bias: fp32 [channels] or
   NULL. Returns 0, or -1 when out of memory (y is then not written). */
int group_norm_nhwc(
    const void *x, void *y, int is_bf16,               /* input, output, their dtype */
    const float *weight, const float *bias,            /* affine parameters (NULL: 1 and 0) */
    int64_t images, int64_t pixels, int64_t channels,  /* shape, channels innermost */
    int64_t groups, float eps, int silu, int threads) {
    const int64_t per_group = channels / groups, size = is_bf16 ? 2 : 4;
    const int64_t blocks = (pixels + BLOCK - 1) / BLOCK;
    /* pass 1's work: `threads` pixel ranges per image, each with its own fp64 sums and squares */
    const int64_t parts = images * threads;
    double *part = calloc((size_t)parts * 2 * channels, sizeof(double));
    float *shift = malloc(images * channels * sizeof(float));
    float *a = malloc(images * channels * sizeof(float)), *b = malloc(images * channels * sizeof(float));
    if (part == NULL || shift == NULL || a == NULL || b == NULL) {
        free(part); free(shift); free(a); free(b);
        return -1;
    }
    for (int64_t img = 0; img < images; img++) /* each channel's value at the image's first pixel */
        for (int64_t c = 0; c < channels; c++) {
            int64_t i = img * pixels * channels + c;
            shift[img * channels + c] = is_bf16 ? ((union { uint32_t u; float f; }){(uint32_t)((const bf16 *)x)[i] << 16}).f : ((const float *)x)[i];
        }
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t j = 0; j < parts; j++) {
            int64_t img = j / threads, t = j % threads;
            int64_t p0 = blocks * t / threads * BLOCK, p1 = blocks * (t + 1) / threads * BLOCK;
            if (p1 > pixels) p1 = pixels;
            if (p0 < p1)
                moments((const char *)x + img * pixels * channels * size, is_bf16, channels, shift + img * channels, p0, p1,
                        part + 2 * j * channels, part + (2 * j + 1) * channels);
        }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < images * groups; j++) {
            int64_t img = j / groups, g = j % groups;
            const float *k = shift + img * channels;
            double s = 0, q = 0; /* the group's sums of x and x^2, from the shifted channel sums */
            for (int64_t c = g * per_group; c < (g + 1) * per_group; c++) {
                double cs = 0, cq = 0;
                for (int64_t t = 0; t < threads; t++) {
                    cs += part[2 * (img * threads + t) * channels + c];
                    cq += part[(2 * (img * threads + t) + 1) * channels + c];
                }
                s += cs + pixels * (double)k[c];
                q += cq + 2 * (double)k[c] * cs + pixels * (double)k[c] * k[c];
            }
            double count = (double)pixels * per_group, mean = s / count;
            double var = q / count - mean * mean;
            double rstd = 1.0 / sqrt((var > 0 ? var : 0) + eps);
            if (!isfinite(s) || !isfinite(q)) /* a NaN or inf input, or squares past fp32's range: */
                mean = rstd = NAN;             /* NaN out, as torch's (never a finite wrong value) */
            for (int64_t c = g * per_group; c < (g + 1) * per_group; c++) {
                double w = weight ? weight[c] : 1.0;
                a[img * channels + c] = (float)(rstd * w);
                b[img * channels + c] = (float)((bias ? bias[c] : 0.0) - (mean - k[c]) * rstd * w);
            }
        }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < parts; j++) { /* pass 2, over the same pixel ranges */
            int64_t img = j / threads, t = j % threads, o = img * channels;
            int64_t p0 = pixels * t / threads, p1 = pixels * (t + 1) / threads;
            const char *xi = (const char *)x + img * pixels * channels * size;
            char *yi = (char *)y + img * pixels * channels * size;
            if (is_bf16 && silu) normalize(xi, yi, 1, 1, channels, shift + o, a + o, b + o, p0, p1);
            else if (is_bf16) normalize(xi, yi, 1, 0, channels, shift + o, a + o, b + o, p0, p1);
            else if (silu) normalize(xi, yi, 0, 1, channels, shift + o, a + o, b + o, p0, p1);
            else normalize(xi, yi, 0, 0, channels, shift + o, a + o, b + o, p0, p1);
        }
    }
    free(part); free(shift); free(a); free(b);
    return 0;
}
