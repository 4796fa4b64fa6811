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
   packed  the weights, bfloat16, in panels of PANEL outputs: [n / PANEL][k / 2][PANEL][2]
           (n padded to PANEL and k to even with zeros; cai/backends/kernels.py packs them)
   bias    [n] float32, or NULL
   y       [m, n] float32, row stride ldy
   scratch m * ((k + 1) / 2) uint32: the rounded rows, as pairs

   Built by cai/backends/kernels.py with -march=native; on a CPU without AVX512-BF16 the function
   is left out and cai_linear_bf16_supported() returns 0. */

#include <stdint.h>
#include <string.h>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>

#define VECTORS 4          /* 16-lane output vectors a panel */
#define PANEL (VECTORS * 16)
#define MR 6               /* rows a micro-tile: 24 accumulators + 4 weight vectors + 1 broadcast */

int cai_linear_bf16_supported(void) { return PANEL; }

static inline __attribute__((always_inline)) void micro_tile(
        int rows, const uint32_t *x, int64_t pairs, const __m512bh *w, const float *bias,
        float *y, int64_t ldy, int64_t valid) {
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
        for (int r = 0; r < rows; r++)
            _mm512_mask_storeu_ps(y + r * ldy + v * 16, mask, _mm512_add_ps(acc[r][v], b));
    }
}

/* a row of float32 to bfloat16 pairs, rounded to nearest even; an odd k's last pair gets a 0 */
static void round_row(const float *src, int64_t k, uint32_t *dst) {
    int64_t j = 0;
    for (; j + 32 <= k; j += 32)
        _mm512_storeu_si512(dst + j / 2, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + j + 16),
                                                                        _mm512_loadu_ps(src + j)));
    for (; j < k; j += 2) {
        __m128bh b = _mm_cvtneps_pbh(_mm_set_ps(0.0f, 0.0f, j + 1 < k ? src[j + 1] : 0.0f, src[j]));
        memcpy(dst + j / 2, &b, sizeof(uint32_t));
    }
}

void cai_linear_bf16(const float *x, int64_t m, int64_t k, int64_t ldx, const uint16_t *packed,
                     int64_t n, const float *bias, float *y, int64_t ldy, uint32_t *scratch, int threads) {
    const int64_t pairs = (k + 1) / 2, panels = (n + PANEL - 1) / PANEL, tiles = (m + MR - 1) / MR;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; i++) round_row(x + i * ldx, k, scratch + i * pairs);
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
                switch (rows) {        /* each a copy of the tile unrolled for its rows; the sums' order is the same */
                case 6: micro_tile(6, xs, pairs, w, b, out, ldy, n - n0); break;
                case 5: micro_tile(5, xs, pairs, w, b, out, ldy, n - n0); break;
                case 4: micro_tile(4, xs, pairs, w, b, out, ldy, n - n0); break;
                case 3: micro_tile(3, xs, pairs, w, b, out, ldy, n - n0); break;
                case 2: micro_tile(2, xs, pairs, w, b, out, ldy, n - n0); break;
                default: micro_tile(1, xs, pairs, w, b, out, ldy, n - n0); break;
                }
            }
    }
}

#else

int cai_linear_bf16_supported(void) { return 0; }

void cai_linear_bf16(const float *x, int64_t m, int64_t k, int64_t ldx, const uint16_t *packed,
                     int64_t n, const float *bias, float *y, int64_t ldy, uint32_t *scratch, int threads) {
    (void)x; (void)m; (void)k; (void)ldx; (void)packed; (void)n; (void)bias; (void)y; (void)ldy;
    (void)scratch; (void)threads;
}

#endif
