/* Decode attention over each conversation's own cached positions, for cai's engine on a CPU.

   A decode step asks, for every row of the batch and every kv head, for a handful of queries (the
   query heads that share the kv head, times the step's 1 + draft ids) against that row's cached
   keys and values. As a batched matrix product that is thousands of tiny GEMMs, which PyTorch
   runs at a fifth of memory speed, and every row is padded to the longest row's length. Here each
   (row, kv head) is one task that streams its own keys and values once, up to that row's own
   length, with an online softmax: the work the memory bus allows and no more.

   The ids of all rows are packed into one sequence of `tokens` ids: row b owns ids
   offsets[b] .. offsets[b + 1] - 1, and id t sits at cache position positions[t].

   q      [heads, group, tokens, dim]   queries (query head h*group + g reads kv head h)
   keys,
   values [slots, heads, capacity, dim] the engine's cache; row b reads slot slots[b]
   keys read by id t of row b: positions start .. positions[t], inclusive (causal)
   out    [heads, group, tokens, dim]   softmax-weighted values
   lse    [heads, group, tokens]        log-sum-exp of each query's scaled scores (what joins this
                                        part to another under one softmax); -1e30 when it saw no key
   init_out, init_lse                   (or NULL) another part's softmax-weighted values and
                                        log-sum-exps, same layout: the softmax starts from that part
                                        (the shared root's) instead of from nothing, so out and lse
                                        come back joined with it, with no pass of their own

   Keys and values are float32 (cai_decode_attention) or bfloat16 (cai_decode_attention_bf16, half
   the bytes to stream; widened to float32 as they are loaded, all arithmetic float32); one body
   serves both, specialized at compile time.

   Built on first use by cai/backends/kernels.py with the machine's compiler (-O3 -march=native
   -ffast-math -fopenmp); no infinities are used, so fast-math is safe. Thread pool: the process's
   libgomp, which PyTorch has already loaded. */

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

INLINE void attend(const float *q, const void *keys, const void *values, const int64_t *slots,
                   const int64_t *offsets, const int64_t *positions, int64_t start, int64_t rows,
                   int64_t heads, int64_t group, int64_t tokens, int64_t dim, int64_t capacity, float scale,
                   const float *init_out, const float *init_lse, float *out, float *lse, int threads, const int bf16) {
    const int64_t size = bf16 ? 2 : 4;       /* bytes an element of keys and values takes */
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
        {
            const int64_t first = offsets[b] + chunk * CHUNK;
            const int64_t n_ids = offsets[b + 1] - first < CHUNK ? offsets[b + 1] - first : CHUNK, m = group * n_ids;
            if (m <= 0)
                continue;
            const char *ks = (const char *)keys + (slots[b] * heads + h) * capacity * dim * size;
            const char *vs = (const char *)values + (slots[b] * heads + h) * capacity * dim * size;
            /* query i of this task: query head h*group + i / n_ids, id first + i % n_ids */
            const float *qp[m];
            float *op[m], *lp[m];
            float top[m], total[m], scores[m][BLOCK];
            int64_t limit[m], last = start - 1;
            for (int64_t i = 0; i < m; i++) {
                const int64_t row = (h * group + i / n_ids) * tokens + first + i % n_ids;
                qp[i] = q + row * dim;
                op[i] = out + row * dim;
                lp[i] = lse + row;
                limit[i] = positions[first + i % n_ids];
                if (limit[i] > last)
                    last = limit[i];
                if (init_out != NULL && init_lse[row] > MASKED) {
                    /* the other part's state: its weights sum to 1 at its own log-sum-exp */
                    top[i] = init_lse[row];
                    total[i] = 1.0f;
                    memcpy(op[i], init_out + row * dim, sizeof(float) * dim);
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
                    float sum = 0.0f;
                    for (int j = 0; j < BLOCK; j++)
                        sum += s[j];
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
    }
}

void cai_decode_attention(const float *q, const float *keys, const float *values, const int64_t *slots,
                          const int64_t *offsets, const int64_t *positions, int64_t start, int64_t rows,
                          int64_t heads, int64_t group, int64_t tokens, int64_t dim, int64_t capacity, float scale,
                          const float *init_out, const float *init_lse, float *out, float *lse, int threads) {
    attend(q, keys, values, slots, offsets, positions, start, rows, heads, group, tokens, dim, capacity, scale,
           init_out, init_lse, out, lse, threads, 0);
}

void cai_decode_attention_bf16(const float *q, const uint16_t *keys, const uint16_t *values, const int64_t *slots,
                               const int64_t *offsets, const int64_t *positions, int64_t start, int64_t rows,
                               int64_t heads, int64_t group, int64_t tokens, int64_t dim, int64_t capacity,
                               float scale, const float *init_out, const float *init_lse, float *out, float *lse,
                               int threads) {
    attend(q, keys, values, slots, offsets, positions, start, rows, heads, group, tokens, dim, capacity, scale,
           init_out, init_lse, out, lse, threads, 1);
}
