/* Rotary position embedding and the KV cache's write, in one pass, for cai's fused decoder layer
   on a CPU (cai/backends/fused.py).

   A layer's q/k/v projection leaves each id's queries, keys and values side by side in one row of
   `qkv` (row stride ld; the queries at q_at, keys at k_at, values at v_at, head after head of
   `dim`). This rotates the queries in place and the keys on their way to the cache, and writes
   keys and values where the engine keeps them: the cache of one layer seen as rows of `dim`
   (float32 or bfloat16, rounded to nearest even), key head h of id t to row rows[h * ids + t].

   The rotation is transformers' own, operation for operation (x * cos + rotate_half(x) * sin:
   one product each, then one sum, no fused multiply-add), so its results are the same bits as
   the model's `apply_rotary_pos_emb`; cos and sin are the model's rotary embedding's, [ids, dim]
   at row stride cs_ld. */

#include <stdint.h>
#include <string.h>

#define MAX_DIM 512

static inline uint16_t to_bf16(float f) {        /* round to nearest even, as torch's conversion */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40);       /* a NaN stays one */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline void rotate(const float *x, const float *c, const float *s, int64_t dim, float *out) {
    const int64_t half = dim / 2;
    for (int64_t d = 0; d < half; d++) {
        const float a = x[d] * c[d], b = -x[d + half] * s[d];
        out[d] = a + b;
    }
    for (int64_t d = half; d < dim; d++) {
        const float a = x[d] * c[d], b = x[d - half] * s[d];
        out[d] = a + b;
    }
}

static inline void store(const float *x, int64_t dim, void *cache, int64_t row, int bf16) {
    if (bf16) {
        uint16_t *to = (uint16_t *)cache + row * dim;
        for (int64_t d = 0; d < dim; d++) to[d] = to_bf16(x[d]);
    } else {
        memcpy((float *)cache + row * dim, x, sizeof(float) * dim);
    }
}

int cai_rotary_write(float *qkv, int64_t ids, int64_t ld, int64_t q_at, int64_t k_at, int64_t v_at,
                     int64_t q_heads, int64_t kv_heads, int64_t dim, const float *cos, const float *sin,
                     int64_t cs_ld, void *k_cache, void *v_cache, const int64_t *rows, int bf16, int threads) {
    if (dim > MAX_DIM || dim % 2)
        return -1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < ids; t++) {
        float *row = qkv + t * ld, turned[MAX_DIM];
        const float *c = cos + t * cs_ld, *s = sin + t * cs_ld;
        for (int64_t h = 0; h < q_heads; h++) {
            rotate(row + q_at + h * dim, c, s, dim, turned);
            memcpy(row + q_at + h * dim, turned, sizeof(float) * dim);
        }
        for (int64_t h = 0; h < kv_heads; h++) {
            rotate(row + k_at + h * dim, c, s, dim, turned);
            store(turned, dim, k_cache, rows[h * ids + t], bf16);
            store(row + v_at + h * dim, dim, v_cache, rows[h * ids + t], bf16);
        }
    }
    return 0;
}
