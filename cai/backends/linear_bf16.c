/* Linear layers in bfloat16 on AVX512-BF16, for cai's engine on a CPU: y = x W^T (+ bias).

   The point is a product whose result for a row does not depend on the rows beside it. oneDNN and
   MKL pick their blocking, and with it the order of a row's sums, by the product's shape, so the
   same token gets other last bits in a step of 7 rows than in a step of 64 (and a greedy run other
   records). Here every output y[m, n] is one float32 lane that takes the pairs of k in one fixed
   order, 0, 1, ... K/2 - 1, with one `vdpbf16ps` each, whatever the number of rows, the row's place
   in its tile, the tile's size or the thread that runs it. Nothing else touches it but the bias,
   added once at the end.

   It is also fast: a micro-tile of MR rows x 64 outputs keeps MR x 4 accumulators in registers;
   each step of k loads 4 vectors of weights and reuses them for every row (on a 2-core AVX512-BF16
   EPYC, 350-430 GFLOP/s for the 135M model's products at 64 rows: the machine's bf16 peak, and
   2-2.5x fbgemm's float16-weight kernel).

   x       [m, k] float32, row stride ldx; rounded to bfloat16 (to nearest even) into `scratch`
   norm    [k] float32, or NULL: x is first RMS-normalized with these weights (eps), as a decoder
           layer's norm before its projections: x_j * (1 / sqrt(mean(x^2) + eps)) * norm_j, its
           sum of squares in one fixed order (the normalized rows are never stored)
   packed  the weights, bfloat16, in panels of PANEL outputs: [n / PANEL][k / 2][PANEL][2]
           (n padded to PANEL and k to even with zeros; cai/backends/kernels.py packs them)
   bias    [n] float32, or NULL (in the panels' order)
   y       [m, n] float32, row stride ldy; `mode` says what goes there:
             0  the product (+ bias)
             1  y += the product (+ bias): a residual stream, added to in place
             2  gated: the weights are a gate's and an up projection's, one after the other (the
                up's from output n / 2 on); the product goes to `tmp` [m, n], and
                y[:, j] = silu(gate_j) * up_j for j < width (a SwiGLU MLP's hidden layer)
   scratch m * ((k + 1) / 2) uint32: the rounded rows, as pairs

   Built by cai/backends/kernels.py with -march=native; on a CPU without AVX512-BF16 the function
   is left out and cai_linear_bf16_supported() returns 0. */

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>

#define VECTORS 4          /* 16-lane output vectors a panel */
#define PANEL (VECTORS * 16)
#define MR 6               /* rows a micro-tile: 24 accumulators + 4 weight vectors + 1 broadcast */

int cai_linear_bf16_supported(void) { return PANEL; }

/* silu(g) = g / (1 + exp(-g)), sixteen lanes: exp by range reduction to 2^k and a degree-5
   polynomial (relative error about 2e-7), its argument clamped so it cannot overflow */
static inline __m512 silu512(__m512 g) {
    __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), g), _mm512_set1_ps(-87.0f)),
                             _mm512_set1_ps(87.0f));
    __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), v);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 r2 = _mm512_mul_ps(r, r);
    __m512 e = _mm512_fmadd_ps(_mm512_set1_ps(1.9875691500e-4f), r, _mm512_set1_ps(1.3981999507e-3f));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(8.3334519073e-3f));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(4.1665795894e-2f));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.6666665459e-1f));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(5.0000001201e-1f));
    e = _mm512_fmadd_ps(e, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    e = _mm512_scalef_ps(e, k);
    return _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

static inline __attribute__((always_inline)) void micro_tile(
        int rows, const uint32_t *x, int64_t pairs, const __m512bh *w, const float *bias,
        float *y, int64_t ldy, int64_t valid, int add) {
    __m512 acc[MR][VECTORS];
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < VECTORS; v++) acc[r][v] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; p++) {
        __m512bh wv[VECTORS];
        for (int v = 0; v < VECTORS; v++) wv[v] = w[p * VECTORS + v];
        for (int r = 0; r < rows; r++) {
            __m512bh xv = (__m512bh)_mm512_set1_epi32((int)x[r * pairs + p]);
            for (int v = 0; v < VECTORS; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], xv, wv[v]);
        }
    }
    for (int v = 0; v < VECTORS && v * 16 < valid; v++) {
        __mmask16 mask = valid - v * 16 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (valid - v * 16)) - 1);
        __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + v * 16) : _mm512_setzero_ps();
        for (int r = 0; r < rows; r++) {
            __m512 out = _mm512_add_ps(acc[r][v], b);
            if (add)
                out = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, y + r * ldy + v * 16), out);
            _mm512_mask_storeu_ps(y + r * ldy + v * 16, mask, out);
        }
    }
}

/* a row of float32 to bfloat16 pairs, rounded to nearest even; an odd k's last pair gets a 0.
   With `norm`, the row is RMS-normalized first: its squares summed in sixteen lanes in order, the
   lanes then by a fixed tree, so a row's result depends on the row alone. */
static void round_row(const float *src, int64_t k, const float *norm, float eps, uint32_t *dst) {
    float scale = 1.0f;
    if (norm) {
        __m512 sq = _mm512_setzero_ps();
        for (int64_t j = 0; j < k; j += 16) {
            __mmask16 mask = k - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (k - j)) - 1);
            __m512 v = _mm512_maskz_loadu_ps(mask, src + j);
            sq = _mm512_add_ps(sq, _mm512_mul_ps(v, v));
        }
        sq = _mm512_add_ps(sq, _mm512_shuffle_f32x4(sq, sq, 0x4E));
        sq = _mm512_add_ps(sq, _mm512_shuffle_f32x4(sq, sq, 0xB1));
        sq = _mm512_add_ps(sq, _mm512_permute_ps(sq, 0x4E));
        sq = _mm512_add_ps(sq, _mm512_permute_ps(sq, 0xB1));
        scale = 1.0f / sqrtf(_mm512_cvtss_f32(sq) / (float)k + eps);
    }
    const __m512 s = _mm512_set1_ps(scale);
    for (int64_t j = 0; j < k; j += 32) {
        const int64_t left = k - j;
        __mmask16 m0 = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        __mmask16 m1 = left >= 32 ? (__mmask16)0xFFFF : left <= 16 ? 0 : (__mmask16)((1u << (left - 16)) - 1);
        __m512 a = _mm512_maskz_loadu_ps(m0, src + j), b = _mm512_maskz_loadu_ps(m1, src + j + 16);
        if (norm) {
            a = _mm512_mul_ps(_mm512_mul_ps(a, s), _mm512_maskz_loadu_ps(m0, norm + j));
            b = _mm512_mul_ps(_mm512_mul_ps(b, s), _mm512_maskz_loadu_ps(m1, norm + j + 16));
        }
        const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(b, a);
        const int64_t words = left >= 32 ? 16 : (left + 1) / 2;
        _mm512_mask_storeu_epi32(dst + j / 2, (__mmask16)((1u << words) - 1) | (words == 16 ? 0xFFFF : 0), both);
    }
}

void cai_linear_bf16(const float *x, int64_t m, int64_t k, int64_t ldx, const float *norm, float eps,
                     const uint16_t *packed, int64_t n, const float *bias, float *y, int64_t ldy, int mode,
                     int64_t width, float *tmp, uint32_t *scratch, int threads) {
    const int64_t pairs = (k + 1) / 2, panels = (n + PANEL - 1) / PANEL, tiles = (m + MR - 1) / MR;
    float *const gated_y = y;
    const int64_t gated_ld = ldy;
    if (mode == 2) {           /* the product into tmp first */
        y = tmp;
        ldy = n;
    }
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; i++) round_row(x + i * ldx, k, norm, eps, scratch + i * pairs);
        /* one job: a panel over a micro-tile of rows; a panel's weights stay in the core's cache
           across the tiles it takes next */
#pragma omp for schedule(dynamic, 1) collapse(2)
        for (int64_t p = 0; p < panels; p++)
            for (int64_t t = 0; t < tiles; t++) {
                const __m512bh *w = (const __m512bh *)(packed + p * pairs * PANEL * 2);
                int64_t r0 = t * MR, rows = m - r0 < MR ? m - r0 : MR, n0 = p * PANEL;
                const float *b = bias ? bias + n0 : 0;
                const uint32_t *xs = scratch + r0 * pairs;
                float *out = y + r0 * ldy + n0;
                const int64_t valid = n - n0;
                const int add = mode == 1;
                switch (rows) {        /* each a copy of the tile unrolled for its rows; the sums' order is the same */
                case 6: micro_tile(6, xs, pairs, w, b, out, ldy, valid, add); break;
                case 5: micro_tile(5, xs, pairs, w, b, out, ldy, valid, add); break;
                case 4: micro_tile(4, xs, pairs, w, b, out, ldy, valid, add); break;
                case 3: micro_tile(3, xs, pairs, w, b, out, ldy, valid, add); break;
                case 2: micro_tile(2, xs, pairs, w, b, out, ldy, valid, add); break;
                default: micro_tile(1, xs, pairs, w, b, out, ldy, valid, add); break;
                }
            }
        if (mode == 2) {
#pragma omp for schedule(static)
            for (int64_t i = 0; i < m; i++) {
                const float *gate = tmp + i * n, *up = gate + n / 2;
                float *o = gated_y + i * gated_ld;
                for (int64_t j = 0; j < width; j += 16) {
                    __mmask16 mask = width - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (width - j)) - 1);
                    _mm512_mask_storeu_ps(o + j, mask, _mm512_mul_ps(silu512(_mm512_maskz_loadu_ps(mask, gate + j)),
                                                                     _mm512_maskz_loadu_ps(mask, up + j)));
                }
            }
        }
    }
}

#else

int cai_linear_bf16_supported(void) { return 0; }

void cai_linear_bf16(const float *x, int64_t m, int64_t k, int64_t ldx, const float *norm, float eps,
                     const uint16_t *packed, int64_t n, const float *bias, float *y, int64_t ldy, int mode,
                     int64_t width, float *tmp, uint32_t *scratch, int threads) {
    (void)x; (void)m; (void)k; (void)ldx; (void)norm; (void)eps; (void)packed; (void)n; (void)bias; (void)y;
    (void)ldy; (void)mode; (void)width; (void)tmp; (void)scratch; (void)threads;
}

#endif
