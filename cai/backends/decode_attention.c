/* Decode attention over each conversation's own cached positions, for cai's engine on a CPU.

   A decode step asks, for every row of the batch and every kv head, for a handful of queries (the
   query heads that share the kv head, times the step's 1 + draft ids) against that row's cached
   keys and values. As a batched matrix product that is thousands of tiny GEMMs, which PyTorch
   runs at a fifth of memory speed, and every row is padded to the longest row's length. Here each
   (row, kv head) is one task that streams its own keys and values once, up to that row's own
   length, with an online softmax: the work the memory bus allows and no more.

   The ids of all rows are packed into one sequence of `tokens` ids: row b owns ids
   offsets[b] .. offsets[b + 1] - 1, and id t sits at cache position positions[t].

   q      [heads, group, tokens, dim]   queries (query head h*group + g reads kv head h), at any
                                        strides q_strides[0..2] (elements; dim's is 1): the
                                        projection's token-major layout is read where it lies
   keys,
   values [slots, heads, capacity, dim] the engine's cache; row b reads slot slots[b]
   keys read by id t of row b: positions start .. positions[t], inclusive (causal)
   out    [tokens, heads, group, dim]   softmax-weighted values, token-major: the layout the output
                                        projection reads, so nothing is transposed after
   lse    [heads, group, tokens]        log-sum-exp of each query's scaled scores (what joins this
                                        part to another under one softmax); -1e30 when it saw no key
   init_out, init_lse                   (or NULL) another part's softmax-weighted values and
                                        log-sum-exps, in out's and lse's layouts: the softmax starts from that part
                                        (the shared root's) instead of from nothing, so out and lse
                                        come back joined with it, with no pass of their own

   Keys and values are float32 (cai_decode_attention) or bfloat16 (cai_decode_attention_bf16, half
   the bytes to stream; widened to float32 as they are loaded, all arithmetic float32); one body
   serves both, specialized at compile time.

   Built on first use by cai/backends/kernels.py with the machine's compiler (-O3 -march=native
   -ffp-contract=off -fopenmp, not -ffast-math: the compiler keeps every sum in the order written,
   which is what lets two paths give a query the same bits; the block's sums that fast-math used
   to vectorize are written as fixed trees instead). Thread pool: the process's libgomp,
   which PyTorch has already loaded. */

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#define BLOCK 32          /* keys per block: their scores stay in L1 */
#define CHUNK 16          /* ids of a row one task takes (each id's result is its own: no order depends on it) */
#define MASKED -1e30f

/* exp(x) for x <= 0, zero below -87 (Cephes' expf: range reduction by ln 2, degree-5 polynomial;
   relative error about 2e-7). */
static void exp_inplace(float *x, int n) {
    int i = 0;
#ifdef __AVX2__
    const __m256 lo = _mm256_set1_ps(-87.0f), log2e = _mm256_set1_ps(1.44269504088896341f);
    const __m256 c1 = _mm256_set1_ps(0.693359375f), c2 = _mm256_set1_ps(-2.12194440e-4f);
    const __m256 p0 = _mm256_set1_ps(1.9875691500e-4f), p1 = _mm256_set1_ps(1.3981999507e-3f),
                 p2 = _mm256_set1_ps(8.3334519073e-3f), p3 = _mm256_set1_ps(4.1665795894e-2f),
                 p4 = _mm256_set1_ps(1.6666665459e-1f), p5 = _mm256_set1_ps(5.0000001201e-1f);
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        __m256 dead = _mm256_cmp_ps(v, lo, _CMP_LT_OQ);
        v = _mm256_max_ps(v, lo);
        __m256 k = _mm256_round_ps(_mm256_mul_ps(v, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256 r = _mm256_fnmadd_ps(k, c1, v);
        r = _mm256_fnmadd_ps(k, c2, r);
        __m256 r2 = _mm256_mul_ps(r, r);
        __m256 y = _mm256_fmadd_ps(p0, r, p1);
        y = _mm256_fmadd_ps(y, r, p2);
        y = _mm256_fmadd_ps(y, r, p3);
        y = _mm256_fmadd_ps(y, r, p4);
        y = _mm256_fmadd_ps(y, r, p5);
        y = _mm256_fmadd_ps(y, r2, _mm256_add_ps(r, one));
        __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
        y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
        _mm256_storeu_ps(x + i, _mm256_andnot_ps(dead, y));
    }
#endif
    for (; i < n; i++)
        x[i] = x[i] < -87.0f ? 0.0f : expf(x[i]);
}

#define INLINE static inline __attribute__((always_inline))

/* the sum of a block's BLOCK weights, in one fixed order (a tree, vectorized where there is AVX2) */
INLINE float block_sum(const float *s) {
#ifdef __AVX2__
    const __m256 a = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(s), _mm256_loadu_ps(s + 8)),
                                   _mm256_add_ps(_mm256_loadu_ps(s + 16), _mm256_loadu_ps(s + 24)));
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    b = _mm_add_ps(b, _mm_movehl_ps(b, b));
    return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
#else
    float sum = 0.0f;
    for (int j = 0; j < BLOCK; j++)
        sum += s[j];
    return sum;
#endif
}

/* element i of a row of keys or values stored as float32 (bf16 == 0) or bfloat16 (bf16 == 1) */
INLINE float kv_at(const void *row, int64_t i, const int bf16) {
    if (!bf16)
        return ((const float *)row)[i];
    union { uint32_t u; float f; } v = {.u = (uint32_t)((const uint16_t *)row)[i] << 16};
    return v.f;
}

#ifdef __AVX2__
/* elements i .. i+7 of such a row, as float32 */
INLINE __m256 kv_load8(const void *row, int64_t i, const int bf16) {
    if (!bf16)
        return _mm256_loadu_ps((const float *)row + i);
    __m128i half = _mm_loadu_si128((const __m128i *)((const uint16_t *)row + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}
#endif

INLINE float dot(const float *a, const void *k, int n, const int bf16) {
    float s = 0.0f;
    for (int d = 0; d < n; d++)
        s += a[d] * kv_at(k, d, bf16);
    return s;
}

/* out[0..3] = the dot products of one key with four queries (a repeated pointer for fewer). Four
   independent sums keep the FMA units busy, where one dot product at a time waits on its own sum. */
INLINE void dot4(const void *k, const float *q0, const float *q1, const float *q2, const float *q3, int dim,
                 float *out, const int bf16) {
#if defined(__AVX2__) && defined(__FMA__)
    if (dim % 8 == 0) {
        __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps(), c = _mm256_setzero_ps(), d = _mm256_setzero_ps();
        for (int i = 0; i < dim; i += 8) {
            __m256 kv = kv_load8(k, i, bf16);
            a = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + i), kv, a);
            b = _mm256_fmadd_ps(_mm256_loadu_ps(q1 + i), kv, b);
            c = _mm256_fmadd_ps(_mm256_loadu_ps(q2 + i), kv, c);
            d = _mm256_fmadd_ps(_mm256_loadu_ps(q3 + i), kv, d);
        }
        __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
        _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
        return;
    }
#endif
    out[0] = dot(q0, k, dim, bf16);
    out[1] = dot(q1, k, dim, bf16);
    out[2] = dot(q2, k, dim, bf16);
    out[3] = dot(q3, k, dim, bf16);
}

/* acc[0..dim) += sum over j < n of p[j] * v[j * dim ..]. With AVX2, 64 columns at a time stay in
   registers across all n rows (eight independent sums), instead of a load and store per row. */
INLINE void add_weighted(float *acc, const void *v, const float *p, int n, int64_t dim, const int bf16) {
    int64_t d = 0;
#if defined(__AVX2__) && defined(__FMA__)
    for (; d + 64 <= dim; d += 64) {
        __m256 a0 = _mm256_loadu_ps(acc + d), a1 = _mm256_loadu_ps(acc + d + 8), a2 = _mm256_loadu_ps(acc + d + 16),
               a3 = _mm256_loadu_ps(acc + d + 24), a4 = _mm256_loadu_ps(acc + d + 32), a5 = _mm256_loadu_ps(acc + d + 40),
               a6 = _mm256_loadu_ps(acc + d + 48), a7 = _mm256_loadu_ps(acc + d + 56);
        for (int j = 0; j < n; j++) {
            const int64_t row = j * dim + d;
            const __m256 w = _mm256_set1_ps(p[j]);
            a0 = _mm256_fmadd_ps(w, kv_load8(v, row, bf16), a0);
            a1 = _mm256_fmadd_ps(w, kv_load8(v, row + 8, bf16), a1);
            a2 = _mm256_fmadd_ps(w, kv_load8(v, row + 16, bf16), a2);
            a3 = _mm256_fmadd_ps(w, kv_load8(v, row + 24, bf16), a3);
            a4 = _mm256_fmadd_ps(w, kv_load8(v, row + 32, bf16), a4);
            a5 = _mm256_fmadd_ps(w, kv_load8(v, row + 40, bf16), a5);
            a6 = _mm256_fmadd_ps(w, kv_load8(v, row + 48, bf16), a6);
            a7 = _mm256_fmadd_ps(w, kv_load8(v, row + 56, bf16), a7);
        }
        _mm256_storeu_ps(acc + d, a0); _mm256_storeu_ps(acc + d + 8, a1); _mm256_storeu_ps(acc + d + 16, a2);
        _mm256_storeu_ps(acc + d + 24, a3); _mm256_storeu_ps(acc + d + 32, a4); _mm256_storeu_ps(acc + d + 40, a5);
        _mm256_storeu_ps(acc + d + 48, a6); _mm256_storeu_ps(acc + d + 56, a7);
    }
#endif
    for (int j = 0; j < n; j++) {
        const float w = p[j];
        for (int64_t e = d; e < dim; e++)
            acc[e] += w * kv_at(v, j * dim + e, bf16);
    }
}

/* one task: ids first .. first+n_ids-1 of a row (its keys at ks, values at vs) for kv head h */
INLINE void task_scalar(const float *q, const int64_t *qs, const char *ks, const char *vs, int64_t h, int64_t first,
                        int64_t n_ids, const int64_t *positions, int64_t start, int64_t heads, int64_t group,
                        int64_t tokens, int64_t dim,
                        int64_t capacity, float scale, const float *init_out, const float *init_lse,
                        float *out, float *lse, const int bf16) {
    const int64_t size = bf16 ? 2 : 4, m = group * n_ids;
    /* query i of this task: query head h*group + i / n_ids, id first + i % n_ids */
    const float *qp[m];
    float *op[m], *lp[m];
    float top[m], total[m], scores[m][BLOCK];
    int64_t limit[m], last = start - 1;
    for (int64_t i = 0; i < m; i++) {
        const int64_t g = i / n_ids, t = first + i % n_ids;
        const int64_t row = (h * group + g) * tokens + t, at = ((t * heads + h) * group + g) * dim;
        qp[i] = q + h * qs[0] + g * qs[1] + t * qs[2];
        op[i] = out + at;
        lp[i] = lse + row;
        limit[i] = positions[first + i % n_ids];
        if (limit[i] > last)
            last = limit[i];
        if (init_out != NULL && init_lse[row] > MASKED) {
            /* the other part's state: its weights sum to 1 at its own log-sum-exp */
            top[i] = init_lse[row];
            total[i] = 1.0f;
            memcpy(op[i], init_out + at, sizeof(float) * dim);
        } else {
            top[i] = MASKED;
            total[i] = 0.0f;
            memset(op[i], 0, sizeof(float) * dim);
        }
    }
    if (last >= capacity)
        last = capacity - 1;
    for (int64_t t0 = start; t0 <= last; t0 += BLOCK) {
        int n = (int)(last - t0 + 1 < BLOCK ? last - t0 + 1 : BLOCK);
        for (int j = 0; j < n; j++) {
            const char *k = ks + (t0 + j) * dim * size;
            for (int64_t i = 0; i < m; i += 4) {
                float four[4];
                dot4(k, qp[i], qp[i + 1 < m ? i + 1 : i], qp[i + 2 < m ? i + 2 : i], qp[i + 3 < m ? i + 3 : i],
                     (int)dim, four, bf16);
                for (int64_t u = i; u < i + 4 && u < m; u++)
                    scores[u][j] = t0 + j <= limit[u] ? four[u - i] * scale : MASKED;
            }
        }
        for (int64_t i = 0; i < m; i++) {
            float *s = scores[i], best = top[i];
            for (int j = 0; j < n; j++)
                best = s[j] > best ? s[j] : best;
            if (best <= MASKED)
                continue;                       /* every key of this block is after the query */
            float keep = top[i] <= MASKED ? 0.0f : expf(top[i] - best);
            /* a whole block always: how many keys the row's last block holds depends on
               the row's other ids (a decode step has one, a prefill many), and a shorter
               block would take the vector exp's scalar tail and sum in another order;
               the keys past n weigh exactly 0 */
            for (int j = n; j < BLOCK; j++)
                s[j] = MASKED;
            for (int j = 0; j < BLOCK; j++)
                s[j] -= best;
            exp_inplace(s, BLOCK);
            const float sum = block_sum(s);
            total[i] = total[i] * keep + sum;
            top[i] = best;
            float *acc = op[i];
            if (keep != 1.0f) {
#pragma omp simd
                for (int64_t d = 0; d < dim; d++)
                    acc[d] *= keep;
            }
            add_weighted(acc, vs + t0 * dim * size, s, n, dim, bf16);
        }
    }
    for (int64_t i = 0; i < m; i++) {
        if (total[i] > 0.0f) {
            const float inv = 1.0f / total[i];
            for (int64_t d = 0; d < dim; d++)
                op[i][d] *= inv;
            *lp[i] = top[i] + logf(total[i]);
        } else {
            *lp[i] = MASKED;
        }
    }
}

#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__)
/* The bfloat16 path on a CPU with AVX512-BF16: sixteen queries a vector, one per lane.

   Scores, softmax and the weighted sum of values run with the task's queries across a vector's
   lanes, and the products are `vdpbf16ps` (pairs of bfloat16, summed in float32): a score is the
   query's pairs of dimensions times the key's, taken in order 0, 1, ...; a query's output takes
   its pairs of keys in order too, with its weights rounded to bfloat16 (as flash attention does on
   GPUs). Every lane runs the same instructions whatever the other lanes hold, so a query's result
   does not depend on which queries share its task: a decode id, a draft and an id of a long
   prefill get the same bits. Keys are read as they lie in the cache (a key's pair of dimensions
   is broadcast to all lanes); a block's values are interleaved once, in pairs of keys, for all
   of the task's queries. */
#define LANES_KERNEL 1
#define LANES 16
#define QV 4              /* query vectors one pass over the keys takes */
#define MAX_DIM 256

/* 2^v for v <= 0, sixteen lanes, zero below -126: the bfloat16 paths keep their scores in base 2
   (the query's scale times log2 e), so the exponential needs no range reduction by ln 2: the
   nearest integer k, 2^(v - k) by a degree-6 polynomial (relative error about 1e-7, far below
   the bfloat16 rounding the weights then take), scaled by 2^k. */
static inline __m512 exp2_512(__m512 v) {
    const __mmask16 live = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-126.0f), _CMP_GE_OQ);
    v = _mm512_max_ps(v, _mm512_set1_ps(-126.0f));
    const __m512 k = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_sub_ps(v, k);
    __m512 y = _mm512_fmadd_ps(_mm512_set1_ps(1.5403530393e-4f), r, _mm512_set1_ps(1.3333558146e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(9.6181291076e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.5504108665e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(2.4022650696e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(6.9314718056e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f));
    return _mm512_maskz_scalef_ps(live, y, k);
}
#define LOG2E 1.44269504088896341f
#define LN2 0.693147180559945309f

#define BCAST(word) ((__m512bh)_mm512_set1_epi32((int)(word)))

/* a block's values [BLOCK][dim] as pairs of keys, dimension by dimension: vp[j][d] holds values
   2j and 2j + 1 of dimension d (the even key in the low half), what `vdpbf16ps` takes */
static inline void interleave_values(const uint16_t *vb, int64_t dim, uint32_t vp[][MAX_DIM]) {
    /* unpack gives each 128-bit lane's dimensions 0-3 and 4-7 apart; these put them back in order */
    const __m512i first16 = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
    const __m512i next16 = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
    for (int j = 0; j < BLOCK / 2; j++)
        for (int64_t d = 0; d < dim; d += 32) {
            __m512i a = _mm512_loadu_si512(vb + 2 * j * dim + d), b = _mm512_loadu_si512(vb + (2 * j + 1) * dim + d);
            __m512i lo = _mm512_unpacklo_epi16(a, b), hi = _mm512_unpackhi_epi16(a, b);
            _mm512_storeu_si512(&vp[j][d], _mm512_permutex2var_epi32(lo, first16, hi));
            _mm512_storeu_si512(&vp[j][d + 16], _mm512_permutex2var_epi32(lo, next16, hi));
        }
}

/* a query's result from its running sums: o = acc / total (acc read at stride `step`), and its
   log-sum-exp; one piece of code for both tasks, so both round alike */
static inline void finish(const float *acc, int64_t step, float top, float total, int64_t dim, float *o, float *lse) {
    if (total > 0.0f) {
        const float inv = 1.0f / total;
        for (int64_t d = 0; d < dim; d++) o[d] = acc[d * step] * inv;
        *lse = (top + log2f(total)) * LN2;        /* the running maximum is in base 2 */
    } else {
        for (int64_t d = 0; d < dim; d++) o[d] = 0.0f;
        *lse = MASKED;
    }
}

/* a block of keys (and its last, partial block padded with zeros) where the tasks read it */
static inline void block_at(const uint16_t *ks, const uint16_t *vs, int64_t t0, int64_t n, int64_t dim,
                            uint32_t *kpad, uint16_t *vpad, const uint32_t **kw, const uint16_t **vb) {
    *kw = (const uint32_t *)(ks + t0 * dim);
    *vb = vs + t0 * dim;
    /* the next block on its way while this one is worked on: a task streams its keys and values
       from memory, and the hardware's prefetch alone left it waiting (15% faster for a decode step) */
    for (int64_t at = 0; at < (int64_t)BLOCK * dim * 2; at += 64) {
        _mm_prefetch((const char *)(ks + (t0 + BLOCK) * dim) + at, _MM_HINT_T2);
        _mm_prefetch((const char *)(vs + (t0 + BLOCK) * dim) + at, _MM_HINT_T2);
    }
    if (n < BLOCK) {
        memset(kpad, 0, sizeof(uint32_t) * BLOCK * (dim / 2));
        memset(vpad, 0, sizeof(uint16_t) * BLOCK * dim);
        memcpy(kpad, *kw, sizeof(uint32_t) * n * (dim / 2));
        memcpy(vpad, *vb, sizeof(uint16_t) * n * dim);
        *kw = kpad;
        *vb = vpad;
    }
}

static void task_lanes(const float *q, const int64_t *qs, const uint16_t *ks, const uint16_t *vs, int64_t h,
                       int64_t first, int64_t n_ids, const int64_t *positions, int64_t start, int64_t heads,
                       int64_t group, int64_t tokens,
                       int64_t dim, int64_t capacity, float scale, const float *init_out, const float *init_lse,
                       float *out, float *lse) {
    const int64_t m = group * n_ids, pairs = dim / 2;
    uint32_t kpad[BLOCK * MAX_DIM / 2];               /* a last, partial block, padded with zeros */
    uint16_t vpad[BLOCK * MAX_DIM];
    uint32_t vp[BLOCK / 2][MAX_DIM];                  /* values of keys 2j and 2j+1, dimension by dimension */
    for (int64_t q0 = 0; q0 < m; q0 += QV * LANES) {
        const int nq = (int)(m - q0 < QV * LANES ? m - q0 : QV * LANES), nv = (nq + LANES - 1) / LANES;
        uint32_t qt[QV][MAX_DIM / 2][LANES];          /* query pairs, lane by lane */
        float ot[QV][MAX_DIM][LANES];                 /* running outputs, lane by lane */
        int32_t limits[QV * LANES];
        int64_t rows[QV * LANES], ats[QV * LANES];       /* a query's place in lse, and in out */
        __m512 top[QV], total[QV];
        __m512i limit[QV];
        int64_t last = start - 1;
        memset(qt, 0, sizeof(uint32_t) * nv * (MAX_DIM / 2) * LANES);
        for (int i = 0; i < nv * LANES; i++) {
            const int v = i / LANES, lane = i % LANES;
            float init_top = MASKED, init_total = 0.0f;
            if (i >= nq) {
                limits[i] = -1;                    /* an empty lane: sees no key */
                for (int64_t d = 0; d < dim; d++) ot[v][d][lane] = 0.0f;
            } else {
                const int64_t id = q0 + i, g = id / n_ids, t = first + id % n_ids;
                const int64_t row = (h * group + g) * tokens + t, at = ((t * heads + h) * group + g) * dim;
                rows[i] = row;
                ats[i] = at;
                limits[i] = (int32_t)positions[first + id % n_ids];
                if (limits[i] > last)
                    last = limits[i];
                const float *qr = q + h * qs[0] + g * qs[1] + t * qs[2];
                for (int64_t p = 0; p < pairs; p++) {
                    __m128bh two = _mm_cvtneps_pbh(_mm_set_ps(0.0f, 0.0f, qr[2 * p + 1], qr[2 * p]));
                    memcpy(&qt[v][p][lane], &two, sizeof(uint32_t));
                }
                const int joined = init_out != NULL && init_lse[row] > MASKED;
                for (int64_t d = 0; d < dim; d++) ot[v][d][lane] = joined ? init_out[at + d] : 0.0f;
                if (joined) {
                    init_top = init_lse[row] * LOG2E;
                    init_total = 1.0f;
                }
            }
            ((float *)&top[v])[lane] = init_top;
            ((float *)&total[v])[lane] = init_total;
        }
        for (int v = 0; v < nv; v++)
            limit[v] = _mm512_loadu_si512(limits + v * LANES);
        if (last >= capacity)
            last = capacity - 1;
        const __m512 masked = _mm512_set1_ps(MASKED), half_masked = _mm512_set1_ps(MASKED / 2), zero = _mm512_setzero_ps();
        for (int64_t t0 = start; t0 <= last; t0 += BLOCK) {
            const int64_t n = last - t0 + 1 < BLOCK ? last - t0 + 1 : BLOCK;
            const uint32_t *kw;
            const uint16_t *vb;
            block_at(ks, vs, t0, n, dim, kpad, vpad, &kw, &vb);
            interleave_values(vb, dim, vp);
            for (int v = 0; v < nv; v++) {
                __m512 s[BLOCK];
                for (int j0 = 0; j0 < BLOCK; j0 += 8) {        /* scores of 8 keys: 8 independent sums */
                    __m512 acc[8];
                    for (int k = 0; k < 8; k++) acc[k] = zero;
                    for (int64_t p = 0; p < pairs; p++) {
                        const __m512bh qv = (__m512bh)_mm512_loadu_si512(qt[v][p]);
                        for (int k = 0; k < 8; k++)
                            acc[k] = _mm512_dpbf16_ps(acc[k], qv, BCAST(kw[(j0 + k) * pairs + p]));
                    }
                    for (int k = 0; k < 8; k++) {
                        const __mmask16 seen = _mm512_cmple_epi32_mask(_mm512_set1_epi32((int)(t0 + j0 + k)), limit[v]);
                        s[j0 + k] = _mm512_mask_mul_ps(masked, seen, acc[k], _mm512_set1_ps(scale * LOG2E));
                    }
                }
                __m512 best = top[v];
                for (int j = 0; j < BLOCK; j++)
                    best = _mm512_max_ps(best, s[j]);
                const __mmask16 had = _mm512_cmp_ps_mask(top[v], half_masked, _CMP_GT_OQ);
                const __m512 keep = _mm512_maskz_mov_ps(had, exp2_512(_mm512_sub_ps(top[v], best)));
                __m512 p[BLOCK];
                __m512i pt[BLOCK / 2];
                for (int j = 0; j < BLOCK; j += 2) {
                    const __mmask16 live0 = _mm512_cmp_ps_mask(s[j], half_masked, _CMP_GT_OQ),
                                    live1 = _mm512_cmp_ps_mask(s[j + 1], half_masked, _CMP_GT_OQ);
                    p[j] = _mm512_maskz_mov_ps(live0, exp2_512(_mm512_sub_ps(s[j], best)));
                    p[j + 1] = _mm512_maskz_mov_ps(live1, exp2_512(_mm512_sub_ps(s[j + 1], best)));
                    const __m512i w0 = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(p[j])),
                                  w1 = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(p[j + 1]));
                    pt[j / 2] = _mm512_or_si512(w0, _mm512_slli_epi32(w1, 16));
                }
                /* the block's weights summed as a tree: key j with key j + half, halving (the
                   order task_keys takes across its lanes) */
                for (int half = BLOCK / 2; half >= 1; half /= 2)
                    for (int j = 0; j < half; j++)
                        p[j] = _mm512_add_ps(p[j], p[j + half]);
                const __m512 sum = p[0];
                total[v] = _mm512_fmadd_ps(total[v], keep, sum);
                top[v] = best;
                for (int64_t d0 = 0; d0 < dim; d0 += 8) {      /* outputs of 8 dimensions: 8 independent sums */
                    __m512 acc[8];
                    for (int k = 0; k < 8; k++) acc[k] = _mm512_mul_ps(_mm512_loadu_ps(ot[v][d0 + k]), keep);
                    for (int j = 0; j < BLOCK / 2; j++) {
                        const __m512bh pv = (__m512bh)pt[j];
                        for (int k = 0; k < 8; k++)
                            acc[k] = _mm512_dpbf16_ps(acc[k], pv, BCAST(vp[j][d0 + k]));
                    }
                    for (int k = 0; k < 8; k++) _mm512_storeu_ps(ot[v][d0 + k], acc[k]);
                }
            }
        }
        for (int i = 0; i < nq; i++) {
            const int v = i / LANES, lane = i % LANES;
            finish(&ot[v][0][lane], LANES, ((float *)&top[v])[lane], ((float *)&total[v])[lane], dim, out + ats[i],
                   lse + rows[i]);
        }
    }
}

/* The same attention for a task of a few queries (a decode step's: the group's query heads for
   one id), with keys in the lanes instead: sixteen keys a vector, so a lane does not go unused
   for want of queries (a decode task has 3 for 16 lanes). Every query takes the very operations
   task_lanes gives it, in the same order: a score is the same chain of `vdpbf16ps` over the
   pairs of dimensions, a block's weights are summed by the same tree (across lanes here, across
   vectors there), its output the same chain over pairs of keys. So an id's result is the same
   bits in either task; tests/test_kernels.py holds them to it. */
#define KEYS_MAX 8        /* queries up to which a task puts keys in the lanes */

/* rows r[0..15] of 16 uint32 become its columns: the blocks off the diagonal swapped, halving.
   Stage b: row i (i & b == 0) keeps its left half of each 2b-wide block and takes row i+b's;
   row i+b takes row i's right halves and keeps its own. */
#define SWAP_UP(b, c) (((c) & (b)) ? 16 + (c) - (b) : (c))
#define SWAP_LOW(b, c) (((c) & (b)) ? 16 + (c) : (c) + (b))
#define SWAP_IDX(F, b) _mm512_set_epi32(F(b, 15), F(b, 14), F(b, 13), F(b, 12), F(b, 11), F(b, 10), F(b, 9), F(b, 8), \
                                        F(b, 7), F(b, 6), F(b, 5), F(b, 4), F(b, 3), F(b, 2), F(b, 1), F(b, 0))
static inline __attribute__((always_inline)) void transpose_stage(__m512i r[16], const int b, const __m512i up,
                                                                    const __m512i low) {
#pragma GCC unroll 16
    for (int i = 0; i < 16; i++)
        if (!(i & b)) {
            const __m512i x = r[i], y = r[i + b];
            r[i] = _mm512_permutex2var_epi32(x, up, y);
            r[i + b] = _mm512_permutex2var_epi32(x, low, y);
        }
}

static inline __attribute__((always_inline)) void transpose16(__m512i r[16]) {
    transpose_stage(r, 8, SWAP_IDX(SWAP_UP, 8), SWAP_IDX(SWAP_LOW, 8));
    transpose_stage(r, 4, SWAP_IDX(SWAP_UP, 4), SWAP_IDX(SWAP_LOW, 4));
    transpose_stage(r, 2, SWAP_IDX(SWAP_UP, 2), SWAP_IDX(SWAP_LOW, 2));
    transpose_stage(r, 1, SWAP_IDX(SWAP_UP, 1), SWAP_IDX(SWAP_LOW, 1));
}

/* one block of keys for M queries (M a constant in each copy, so the sums stay in registers);
   VC: output vectors a pass over the values */
static inline __attribute__((always_inline)) void keys_block(
        const int M, const int VC, const uint32_t (*qp)[MAX_DIM / 2], const uint32_t (*kt)[BLOCK],
        const uint32_t (*vp)[MAX_DIM], int64_t pairs, int64_t dim, int64_t t0, const int32_t *limits, float scale,
        float *top, float *total, float (*acc)[MAX_DIM]) {
    __m512 a[KEYS_MAX][2];
    for (int i = 0; i < M; i++) a[i][0] = a[i][1] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; p++) {
        const __m512bh k0 = (__m512bh)_mm512_loadu_si512(&kt[p][0]), k1 = (__m512bh)_mm512_loadu_si512(&kt[p][16]);
        for (int i = 0; i < M; i++) {
            const __m512bh qb = BCAST(qp[i][p]);
            a[i][0] = _mm512_dpbf16_ps(a[i][0], qb, k0);
            a[i][1] = _mm512_dpbf16_ps(a[i][1], qb, k1);
        }
    }
    const __m512 masked = _mm512_set1_ps(MASKED), half_masked = _mm512_set1_ps(MASKED / 2);
    const __m512i pos0 = _mm512_add_epi32(_mm512_set1_epi32((int)t0),
                                          _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
    const __m512i pos1 = _mm512_add_epi32(pos0, _mm512_set1_epi32(16));
    __m512 keep[KEYS_MAX];
    uint32_t pp[KEYS_MAX][BLOCK / 2];                 /* weights as bfloat16, in pairs of keys */
    for (int i = 0; i < M; i++) {
        const __m512i limit = _mm512_set1_epi32(limits[i]);
        const __m512 s0 = _mm512_mask_mul_ps(masked, _mm512_cmple_epi32_mask(pos0, limit), a[i][0], _mm512_set1_ps(scale * LOG2E)),
                     s1 = _mm512_mask_mul_ps(masked, _mm512_cmple_epi32_mask(pos1, limit), a[i][1], _mm512_set1_ps(scale * LOG2E));
        const __m512 was = _mm512_set1_ps(top[i]);
        const __m512 best = _mm512_max_ps(was, _mm512_set1_ps(_mm512_reduce_max_ps(_mm512_max_ps(s0, s1))));
        const __mmask16 had = _mm512_cmp_ps_mask(was, half_masked, _CMP_GT_OQ);
        keep[i] = _mm512_maskz_mov_ps(had, exp2_512(_mm512_sub_ps(was, best)));
        const __m512 p0 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s0, half_masked, _CMP_GT_OQ), exp2_512(_mm512_sub_ps(s0, best))),
                     p1 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s1, half_masked, _CMP_GT_OQ), exp2_512(_mm512_sub_ps(s1, best)));
        _mm256_storeu_si256((__m256i *)&pp[i][0], (__m256i)_mm512_cvtneps_pbh(p0));
        _mm256_storeu_si256((__m256i *)&pp[i][8], (__m256i)_mm512_cvtneps_pbh(p1));
        /* task_lanes' tree: key j + key j+16, then + 8, 4, 2, 1 */
        __m512 sum = _mm512_add_ps(p0, p1);
        sum = _mm512_add_ps(sum, _mm512_shuffle_f32x4(sum, sum, 0x4E));
        sum = _mm512_add_ps(sum, _mm512_shuffle_f32x4(sum, sum, 0xB1));
        sum = _mm512_add_ps(sum, _mm512_permute_ps(sum, 0x4E));
        sum = _mm512_add_ps(sum, _mm512_permute_ps(sum, 0xB1));
        total[i] = _mm512_cvtss_f32(_mm512_fmadd_ps(_mm512_set1_ps(total[i]), keep[i], sum));
        top[i] = _mm512_cvtss_f32(best);
    }
    for (int64_t d0 = 0; d0 < dim; d0 += 16 * VC) {
        __m512 o[KEYS_MAX][4];
        for (int i = 0; i < M; i++)
            for (int k = 0; k < VC; k++) o[i][k] = _mm512_mul_ps(_mm512_loadu_ps(&acc[i][d0 + 16 * k]), keep[i]);
        for (int j = 0; j < BLOCK / 2; j++)
            for (int k = 0; k < VC; k++) {
                const __m512bh v = (__m512bh)_mm512_loadu_si512(&vp[j][d0 + 16 * k]);
                for (int i = 0; i < M; i++) o[i][k] = _mm512_dpbf16_ps(o[i][k], BCAST(pp[i][j]), v);
            }
        for (int i = 0; i < M; i++)
            for (int k = 0; k < VC; k++) _mm512_storeu_ps(&acc[i][d0 + 16 * k], o[i][k]);
    }
}

static void task_keys(const float *q, const int64_t *qs, const uint16_t *ks, const uint16_t *vs, int64_t h,
                      int64_t first, int64_t n_ids, const int64_t *positions, int64_t start, int64_t heads,
                      int64_t group, int64_t tokens, int64_t dim, int64_t capacity, float scale,
                      const float *init_out, const float *init_lse, float *out, float *lse) {
    const int m = (int)(group * n_ids);
    const int64_t pairs = dim / 2;
    uint32_t qp[KEYS_MAX][MAX_DIM / 2];
    float acc[KEYS_MAX][MAX_DIM], top[KEYS_MAX], total[KEYS_MAX];
    int32_t limits[KEYS_MAX];
    int64_t rows[KEYS_MAX], ats[KEYS_MAX];
    int64_t last = start - 1;
    for (int i = 0; i < m; i++) {                  /* as task_lanes sets up a lane */
        const int64_t g = i / n_ids, t = first + i % n_ids;
        rows[i] = (h * group + g) * tokens + t;
        ats[i] = ((t * heads + h) * group + g) * dim;
        limits[i] = (int32_t)positions[t];
        if (limits[i] > last)
            last = limits[i];
        const float *qr = q + h * qs[0] + g * qs[1] + t * qs[2];
        for (int64_t p = 0; p < pairs; p++) {
            __m128bh two = _mm_cvtneps_pbh(_mm_set_ps(0.0f, 0.0f, qr[2 * p + 1], qr[2 * p]));
            memcpy(&qp[i][p], &two, sizeof(uint32_t));
        }
        const int joined = init_out != NULL && init_lse[rows[i]] > MASKED;
        for (int64_t d = 0; d < dim; d++) acc[i][d] = joined ? init_out[ats[i] + d] : 0.0f;
        top[i] = joined ? init_lse[rows[i]] * LOG2E : MASKED;
        total[i] = joined ? 1.0f : 0.0f;
    }
    if (last >= capacity)
        last = capacity - 1;
    uint32_t kpad[BLOCK * MAX_DIM / 2], kt[MAX_DIM / 2][BLOCK], vp[BLOCK / 2][MAX_DIM];
    uint16_t vpad[BLOCK * MAX_DIM];
    for (int64_t t0 = start; t0 <= last; t0 += BLOCK) {
        const int64_t n = last - t0 + 1 < BLOCK ? last - t0 + 1 : BLOCK;
        const uint32_t *kw;
        const uint16_t *vb;
        block_at(ks, vs, t0, n, dim, kpad, vpad, &kw, &vb);
        for (int half = 0; half < BLOCK; half += 16)          /* the block's keys, pair by pair */
            for (int64_t p0 = 0; p0 < pairs; p0 += 16) {
                __m512i r[16];
#pragma GCC unroll 16
                for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512(kw + (half + i) * pairs + p0);
                transpose16(r);
#pragma GCC unroll 16
                for (int i = 0; i < 16; i++) _mm512_storeu_si512(&kt[p0 + i][half], r[i]);
            }
        interleave_values(vb, dim, vp);
#define KEYS_CASE(M) case M: { if (dim % 64 == 0) keys_block(M, 4, qp, kt, vp, pairs, dim, t0, limits, scale, top, total, acc); \
                               else keys_block(M, 2, qp, kt, vp, pairs, dim, t0, limits, scale, top, total, acc); } break;
        switch (m) {
            KEYS_CASE(1) KEYS_CASE(2) KEYS_CASE(3) KEYS_CASE(4) KEYS_CASE(5) KEYS_CASE(6) KEYS_CASE(7) KEYS_CASE(8)
        }
#undef KEYS_CASE
    }
    for (int i = 0; i < m; i++)
        finish(acc[i], 1, top[i], total[i], dim, out + ats[i], lse + rows[i]);
}
#endif

INLINE void attend(const float *q, const int64_t *qs, const void *keys, const void *values, const int64_t *slots,
                   const int64_t *offsets, const int64_t *positions, int64_t start, int64_t rows,
                   int64_t heads, int64_t group, int64_t tokens, int64_t dim, int64_t capacity, float scale,
                   const float *init_out, const float *init_lse, float *out, float *lse, int threads, const int bf16) {
    const int64_t size = bf16 ? 2 : 4;       /* bytes an element of keys and values takes */
    /* Rows that read one slot (every row reading the shared root) are one row here: their ids
       share tasks, so a task's queries fill its vectors and the root's keys are read once a task,
       not once a row. Each id still sees only its own positions (a query's limit is its own),
       and a block past a query's limit leaves its sums exactly as they were, so its result is
       the same bits in a task of its row's ids or of every row's. */
    int same_slot = rows > 1;
    for (int64_t b = 1; b < rows && same_slot; b++)
        same_slot = slots[b] == slots[0];
    const int64_t merged[2] = {offsets[0], offsets[rows]};
    if (same_slot) {
        offsets = merged;
        rows = 1;
    }
    /* one task per (row, kv head, chunk of at most CHUNK of the row's ids): a prefill's many ids
       spread over the threads, and a task's scores stay small */
    int64_t task_start[rows + 1];            /* rows: at most the engine's slots */
    task_start[0] = 0;
    for (int64_t b = 0; b < rows; b++)
        task_start[b + 1] = task_start[b] + heads * ((offsets[b + 1] - offsets[b] + CHUNK - 1) / CHUNK);
    const int64_t tasks = task_start[rows];
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t task = 0; task < tasks; task++) {
        int64_t b = 0, high = rows - 1;         /* the row whose tasks hold this one: a binary search */
        while (b < high) {
            const int64_t mid = (b + high + 1) / 2;
            if (task_start[mid] <= task)
                b = mid;
            else
                high = mid - 1;
        }
        const int64_t chunks = (task_start[b + 1] - task_start[b]) / heads, local = task - task_start[b];
        const int64_t h = local / chunks, chunk = local % chunks;
        const int64_t first = offsets[b] + chunk * CHUNK;
        const int64_t n_ids = offsets[b + 1] - first < CHUNK ? offsets[b + 1] - first : CHUNK;
        if (n_ids <= 0 || group <= 0)
            continue;
        const char *ks = (const char *)keys + (slots[b] * heads + h) * capacity * dim * size;
        const char *vs = (const char *)values + (slots[b] * heads + h) * capacity * dim * size;
#ifdef LANES_KERNEL
        if (bf16 && dim % 32 == 0 && dim <= MAX_DIM) {
            if (group * n_ids <= KEYS_MAX) {
                task_keys(q, qs, (const uint16_t *)ks, (const uint16_t *)vs, h, first, n_ids, positions, start, heads,
                          group, tokens, dim, capacity, scale, init_out, init_lse, out, lse);
                continue;
            }
            task_lanes(q, qs, (const uint16_t *)ks, (const uint16_t *)vs, h, first, n_ids, positions, start, heads,
                       group, tokens,
                       dim, capacity, scale, init_out, init_lse, out, lse);
            continue;
        }
#endif
        task_scalar(q, qs, ks, vs, h, first, n_ids, positions, start, heads, group, tokens, dim, capacity, scale,
                    init_out, init_lse, out, lse, bf16);
    }
}

void cai_decode_attention(const float *q, const int64_t *q_strides, const float *keys, const float *values, const int64_t *slots,
                          const int64_t *offsets, const int64_t *positions, int64_t start, int64_t rows,
                          int64_t heads, int64_t group, int64_t tokens, int64_t dim, int64_t capacity, float scale,
                          const float *init_out, const float *init_lse, float *out, float *lse, int threads) {
    attend(q, q_strides, keys, values, slots, offsets, positions, start, rows, heads, group, tokens, dim, capacity, scale,
           init_out, init_lse, out, lse, threads, 0);
}

void cai_decode_attention_bf16(const float *q, const int64_t *q_strides, const uint16_t *keys, const uint16_t *values, const int64_t *slots,
                               const int64_t *offsets, const int64_t *positions, int64_t start, int64_t rows,
                               int64_t heads, int64_t group, int64_t tokens, int64_t dim, int64_t capacity,
                               float scale, const float *init_out, const float *init_lse, float *out, float *lse,
                               int threads) {
    attend(q, q_strides, keys, values, slots, offsets, positions, start, rows, heads, group, tokens, dim, capacity, scale,
           init_out, init_lse, out, lse, threads, 1);
}
