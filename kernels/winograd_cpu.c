/* Winograd F(2x2, 3x3) transforms for 3x3 convolutions (stride 1, padding 1) of channels-last
   bf16 tensors on x86 CPUs with AVX512-BF16.

   Why: where a bf16 convolution runs at the CPU's dot-product rate (no AMX), the only way to run
   it faster is fewer products. Over output tiles of 2 x 2 pixels a 3x3 convolution is 16
   independent matmuls [tiles, C] x [C, Co] (one per position of a 4 x 4 transformed input tile)
   instead of 36 products per 4 pixels: 2.25x fewer (Lavin and Gray, "Fast Algorithms for
   Convolutional Neural Networks", 2016). oneDNN runs the matmuls on packed weights; this file
   does the two transforms around them, each one pass over memory:
     input:  V[a*4+b][tile][c] = (B^T d B)[a][b], d the tile's 4 x 4 input pixels of channel c
             (zero outside the image), B^T = [[1,0,-1,0], [0,1,1,0], [0,-1,1,0], [0,1,0,-1]];
     output: y[2i+r][2j+s][c] = (A^T M A)[r][s] + bias[c] (+ residual), M the tile's 16 matmul
             outputs of channel c, A^T = [[1,1,1,0], [0,1,-1,-1]]; pixels past an odd edge are
             not written.
   The transformed weights G g G^T are made once in Python (float64, then rounded to bf16).
   Sums are in fp32; V is rounded to bf16 for the matmuls, and their products M come back in
   bf16: that is where the method's extra error comes from (tests/test_winograd_cpu.py bounds it
   against float64; benchmarks/winograd_cpu.py measures it per shape). Channels are a multiple
   of 16. */

#include <immintrin.h>
#include <stdint.h>
#include <omp.h>

typedef uint16_t bf16;

/* 16 bf16 channels as fp32 (bf16 widens exactly: its bits are fp32's upper half). */
static inline __m512 load16(const bf16 *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline void store16(bf16 *p, __m512 v) {
    _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(v));
}

/* B^T applied to four values along one axis. */
static inline void input_axis(const __m512 d[4], __m512 t[4]) {
    t[0] = _mm512_sub_ps(d[0], d[2]);
    t[1] = _mm512_add_ps(d[1], d[2]);
    t[2] = _mm512_sub_ps(d[2], d[1]);
    t[3] = _mm512_sub_ps(d[1], d[3]);
}

/* One tile, channels [c, c + 16): `px[r][s]` points at the input pixel of tile row r, column s
   (NULL outside the image); the 16 results go to v + k * plane + c. */
static inline void input_tile(const bf16 *const px[4][4], bf16 *v, int64_t plane, int64_t c) {
    __m512 rows[4][4], t[4][4];
    for (int r = 0; r < 4; r++) {
        __m512 d[4];
        for (int s = 0; s < 4; s++) d[s] = px[r][s] ? load16(px[r][s] + c) : _mm512_setzero_ps();
        input_axis(d, rows[r]);  /* along the row: rows[r][b] */
    }
    for (int b = 0; b < 4; b++) {
        __m512 d[4] = {rows[0][b], rows[1][b], rows[2][b], rows[3][b]};
        input_axis(d, t[b]);  /* down the column: t[b][a] */
    }
    for (int a = 0; a < 4; a++)
        for (int b = 0; b < 4; b++) store16(v + (a * 4 + b) * plane + c, t[b][a]);
}

int winograd_input(
    const bf16 *x,                   /* [images, height, width, channels], channels innermost */
    bf16 *v,                         /* out: [16, count, channels] for tiles first .. first + count - 1 */
    int64_t images, int64_t height,  /* shape; the tiles, ceil(h/2) * ceil(w/2) an image, are */
    int64_t width, int64_t channels, /* numbered image by image, row by row; channels % 16 == 0 */
    int64_t first, int64_t count,    /* the range of tiles transformed */
    int threads) {                   /* OpenMP threads */
    const int64_t th = (height + 1) / 2, tw = (width + 1) / 2;
    const int64_t plane = count * channels;
    (void)images;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = first; p < first + count; p++) {
        const int64_t n = p / (th * tw), i = p / tw % th, j = p % tw;
        const bf16 *px[4][4];
        for (int r = 0; r < 4; r++) {
            const int64_t y = 2 * i - 1 + r;  /* padding 1: tile i reads rows 2i-1 .. 2i+2 */
            for (int s = 0; s < 4; s++) {
                const int64_t xx = 2 * j - 1 + s;
                const int inside = y >= 0 && y < height && xx >= 0 && xx < width;
                px[r][s] = inside ? x + ((n * height + y) * width + xx) * channels : 0;
            }
        }
        for (int64_t c = 0; c < channels; c += 16) input_tile(px, v + (p - first) * channels, plane, c);
    }
    return 0;
}

/* A^T applied to four values along one axis. */
static inline void output_axis(const __m512 m[4], __m512 t[2]) {
    t[0] = _mm512_add_ps(_mm512_add_ps(m[0], m[1]), m[2]);
    t[1] = _mm512_sub_ps(_mm512_sub_ps(m[1], m[2]), m[3]);
}

/* One tile, channels [c, c + 16): the 16 matmul outputs at m[k] + c, the 2 x 2 results to
   `out[r][s]` (NULL past an odd edge), plus bias and the residual at the same offsets. */
static inline void output_tile(const bf16 *const m[16], const float *bias, const bf16 *const res[2][2],
                               bf16 *const out[2][2], int64_t c) {
    __m512 cols[4][2], y[2][2];
    for (int a = 0; a < 4; a++) {
        __m512 d[4];
        for (int b = 0; b < 4; b++) d[b] = load16(m[a * 4 + b] + c);
        output_axis(d, cols[a]);  /* along the row: cols[a][s] */
    }
    for (int s = 0; s < 2; s++) {
        __m512 d[4] = {cols[0][s], cols[1][s], cols[2][s], cols[3][s]}, t[2];
        output_axis(d, t);  /* down the column: t[r] */
        y[0][s] = t[0];
        y[1][s] = t[1];
    }
    const __m512 b = bias ? _mm512_loadu_ps(bias + c) : _mm512_setzero_ps();
    for (int r = 0; r < 2; r++)
        for (int s = 0; s < 2; s++) {
            if (!out[r][s]) continue;
            __m512 o = _mm512_add_ps(y[r][s], b);
            if (res[r][s]) o = _mm512_add_ps(o, load16(res[r][s] + c));
            store16(out[r][s] + c, o);
        }
}

int winograd_output(
    const bf16 *const *m,            /* 16 pointers, each [count, channels]: the matmuls' outputs */
    const float *bias,               /* [channels] or NULL */
    const bf16 *residual,            /* [images, height, width, channels] added, or NULL */
    bf16 *y,                         /* out: [images, height, width, channels] */
    int64_t images, int64_t height,  /* shape of y, tiles numbered as in winograd_input */
    int64_t width, int64_t channels, /* channels a multiple of 16 */
    int64_t first, int64_t count,    /* the range of tiles written */
    int threads) {                   /* OpenMP threads */
    const int64_t th = (height + 1) / 2, tw = (width + 1) / 2;
    (void)images;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = first; p < first + count; p++) {
        const int64_t n = p / (th * tw), i = p / tw % th, j = p % tw;
        const bf16 *mp[16];
        for (int k = 0; k < 16; k++) mp[k] = m[k] + (p - first) * channels;
        bf16 *out[2][2];
        const bf16 *res[2][2];
        for (int r = 0; r < 2; r++)
            for (int s = 0; s < 2; s++) {
                const int64_t yy = 2 * i + r, xx = 2 * j + s;
                const int inside = yy < height && xx < width;
                const int64_t at = ((n * height + yy) * width + xx) * channels;
                out[r][s] = inside ? y + at : 0;
                res[r][s] = inside && residual ? residual + at : 0;
            }
        for (int64_t c = 0; c < channels; c += 16) output_tile(mp, bias, res, out, c);
    }
    return 0;
}
