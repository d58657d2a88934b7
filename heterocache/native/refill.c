/* Fused CPU refill of HeteroCache's dynamic slots (one call per layer and decode step).
 *
 * Same result as the PyTorch path in heterocache/methods/heterocache/dynamic.py (``unit_scores`` +
 * ``choose`` + ``DynamicRetrieval._swap_blocks`` with a same-memory tier), which is its reference in
 * tests/test_native.py:
 *
 *   qp[r, c]    = alpha * (sum_d q[r, d] * qmat[d, c]) * qscale[c]      (qmat NULL: q[r, c] itself)
 *   t[r, g, p]  = sum_c qp[r, c] * summary[c, g * P + p]       (token g of page p)
 *   bound[r, p] = base[p] + logsumexp_{g < G} t[r, g, p]     (``page_lse``; else max_{g < G})
 *   score[p]    = max_r (bound[r, p] - max(max_p' bound[r, p'], -1e30)) + stick * resident[p]
 *
 * The summaries come in the block layout the Python side gives them (``to_blocks``): per sequence,
 * each block of BLOCK pages as ``[g][c][k]`` (``summary[c, g * P + b * BLOCK + k]``), the last block
 * of ``nb`` <= BLOCK pages likewise with ``nb`` for BLOCK; the C x G x P entries of a sequence in all,
 * so every scoring task reads one contiguous run, which the hardware prefetcher streams.
 *
 * Drift gate (``drift`` > 0): a sequence whose qp is within ``drift`` (relative Frobenius distance) of
 * the qp it last refilled with keeps its pages this call (``due``; counted in ``skipped``).
 *
 * The ``counts[i]`` best pages of sequence i are wanted (descending score, then ascending page: ties
 * go to the lower page); each wanted page that is not resident is copied, as one block of ``unit``
 * tokens, from the tier into the unit slot of a resident page that is not wanted any more (k-th
 * incoming page of a sequence into its k-th freed slot, both in ascending order). Unit slot k of
 * sequence i = storage slots [k * unit, (k + 1) * unit) of row ``seq_row[i]`` of bucket
 * ``seq_bucket[i]``, whose keys / values / int32 positions start at the addresses in ``buckets``.
 * Updates ``resident``, ``current`` and the storage in place; returns the number of pages moved (-1
 * when a sequence's sets do not pair up, -2 out of memory).
 *
 * Three parallel phases (OpenMP, torch's own runtime): (A) the page bounds, one task per block of
 * BLOCK pages of every sequence, each block's token logits computed in registers and reduced in L1;
 * (B) per sequence: the scores, a radix selection of the best pages, the pairing of incoming pages
 * with freed slots; (C) the page copies, one task per page moved. Tasks are spread evenly, so a few
 * sequences (batch 1: one per KV head) still keep every thread busy.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <stddef.h>

#define BLOCK 64 /* pages per scoring task (a multiple of 8) */

/* The job, filled by heterocache/native/__init__.py (``RefillJob``; every field 8 bytes). */
typedef struct {
    int64_t n, rows, dim, channels, pages, group;
    const float *queries, *qmat, *qscale;
    double alpha;
    const void *summaries;
    int64_t summary_int8;
    const float *base;
    double stick;
    int64_t page_lse;
    uint8_t *resident;
    int64_t width; /* row stride of ``current`` (the largest count) */
    const int64_t *counts;
    int64_t *current;
    const char *tier_keys, *tier_values;
    int64_t token_bytes;
    const int64_t *page_positions;
    int64_t unit;
    const int64_t *seq_bucket, *seq_row;
    int64_t nbuckets;
    const int64_t *buckets; /* 4 x nbuckets: keys, values, positions addresses, then capacities */
    /* drift gate (``refresh_drift``): sequence i is refilled only when its projected queries qp moved
     * by more than ``drift`` (relative Frobenius distance) from ``anchors[i]`` (n, anchor_rows, C), the
     * qp of its last refill (``anchored[i]``); drift 0: every step. Refilled sequences store their qp */
    double drift;
    float *anchors;
    uint8_t *anchored;
    int64_t anchor_rows;
    int64_t skipped; /* out: sequences not refilled this call */
} hc_job;

/* exp(x) for x <= 0 and log(x) for x >= 1 as branch-free polynomials that vectorise (Cephes'
 * single-precision coefficients: ~1 ulp, like torch's exp / log) */
static inline float exp_nonpositive(float x) {
    uint32_t magnitude; /* max(x, -87) on the bits (x <= 0: a larger magnitude is a larger uint) */
    memcpy(&magnitude, &x, sizeof magnitude);
    magnitude = magnitude < 0xC2AE0000u ? magnitude : 0xC2AE0000u; /* -87.0f; exp(-87) is ~1e-38 */
    memcpy(&x, &magnitude, sizeof x);
    const float n = (float)((int32_t)(x * 1.44269504088896341f + 128.5f) - 128); /* round(x / ln 2) */
    x = x - n * 0.693359375f + n * 2.12194440e-4f;
    const float z = x * x;
    float y = 1.9875691500e-4f;
    y = y * x + 1.3981999507e-3f;
    y = y * x + 8.3334519073e-3f;
    y = y * x + 4.1665795894e-2f;
    y = y * x + 1.6666665459e-1f;
    y = y * x + 5.0000001201e-1f;
    y = y * z + x + 1.0f;
    const int32_t bits = ((int32_t)n + 127) * 8388608; /* 2^n */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

static inline float log_atleast1(float x) {
    int32_t bits;
    memcpy(&bits, &x, sizeof bits);
    const int32_t e = (bits - 0x3f3504f3) >> 23; /* x = m 2^e, m in [sqrt(1/2), sqrt(2)) */
    bits -= e * 8388608;
    float m;
    memcpy(&m, &bits, sizeof m);
    m -= 1.0f;
    const float fe = (float)e, z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    y += -2.12194440e-4f * fe;
    y += -0.5f * z;
    return m + y + 0.693359375f * fe;
}

/* max without libm's fmaxf call (scores are never NaN) */
static inline float maxf(float a, float b) { return a > b ? a : b; }

/* out[(r * G + g) * BLOCK + k] = t[r0 + r, g, p0 + k] for the BLOCK pages of one block (``s``: its
 * summaries, ``[g][c][k]``) and NR query rows at once: each summary entry is widened once for all of
 * them. Portable version: loops the compiler vectorises; with AVX2, explicit vectors whose
 * accumulators stay in registers. */
#define LOGITS(TYPE, NR)                                                                                    \
    static void portable_##TYPE##_##NR(float *restrict out, const TYPE *restrict s, const float *restrict qp, \
                                       int64_t channels, int64_t group, int64_t nb) {                       \
        for (int64_t g = 0; g < group; g++) {                                                               \
            float acc[NR][BLOCK];                                                                           \
            for (int r = 0; r < NR; r++)                                                                    \
                for (int64_t p = 0; p < BLOCK; p++) acc[r][p] = 0.0f;                                       \
            for (int64_t c = 0; c < channels; c++) {                                                        \
                const TYPE *restrict row = s + (g * channels + c) * nb;                                     \
                float w[NR];                                                                                \
                for (int r = 0; r < NR; r++) w[r] = qp[r * channels + c];                                   \
                for (int64_t p = 0; p < nb; p++) {                                                          \
                    const float x = (float)row[p];                                                          \
                    for (int r = 0; r < NR; r++) acc[r][p] += w[r] * x;                                     \
                }                                                                                           \
            }                                                                                               \
            for (int r = 0; r < NR; r++) memcpy(out + (r * group + g) * BLOCK, acc[r], sizeof(float) * BLOCK); \
        }                                                                                                   \
    }
#define LOGITS_ALL(TYPE) LOGITS(TYPE, 1) LOGITS(TYPE, 2) LOGITS(TYPE, 3) LOGITS(TYPE, 4)

#if defined(__AVX2__) && defined(__FMA__) && !defined(HC_PORTABLE)
#define HC_AVX2 1
#include <immintrin.h>
static inline __m256 load8_int8_t(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline __m256 load8_float(const float *p) { return _mm256_loadu_ps(p); }

/* 16 pages a pass (2 vectors sharing the row weights, accumulators in registers), then 8; a last
 * partial vector is read from a zero-padded copy (never past the run) */
#define VECTOR(TYPE, NR)                                                                                    \
    static void avx2_##TYPE##_##NR(float *out, const TYPE *s, const float *qp, int64_t channels, int64_t group, \
                                   int64_t nb) {                                                            \
        for (int64_t g = 0; g < group; g++) {                                                               \
            const TYPE *base = s + g * channels * nb;                                                       \
            float *o = out + g * BLOCK;                                                                     \
            int64_t v = 0;                                                                                  \
            for (; v + 16 <= nb; v += 16) {                                                                 \
                __m256 a[NR], b[NR];                                                                        \
                for (int r = 0; r < NR; r++) a[r] = b[r] = _mm256_setzero_ps();                             \
                for (int64_t c = 0; c < channels; c++) {                                                    \
                    const __m256 x = load8_##TYPE(base + c * nb + v);                                       \
                    const __m256 y = load8_##TYPE(base + c * nb + v + 8);                                   \
                    for (int r = 0; r < NR; r++) {                                                          \
                        const __m256 w = _mm256_broadcast_ss(qp + r * channels + c);                        \
                        a[r] = _mm256_fmadd_ps(w, x, a[r]);                                                 \
                        b[r] = _mm256_fmadd_ps(w, y, b[r]);                                                 \
                    }                                                                                       \
                }                                                                                           \
                for (int r = 0; r < NR; r++) {                                                              \
                    _mm256_storeu_ps(o + r * group * BLOCK + v, a[r]);                                      \
                    _mm256_storeu_ps(o + r * group * BLOCK + v + 8, b[r]);                                  \
                }                                                                                           \
            }                                                                                               \
            for (; v < nb; v += 8) {                                                                        \
                __m256 a[NR];                                                                               \
                for (int r = 0; r < NR; r++) a[r] = _mm256_setzero_ps();                                    \
                for (int64_t c = 0; c < channels; c++) {                                                    \
                    __m256 x;                                                                               \
                    if (v + 8 <= nb) {                                                                      \
                        x = load8_##TYPE(base + c * nb + v);                                                \
                    } else {                                                                                \
                        TYPE pad[8] = {0};                                                                  \
                        memcpy(pad, base + c * nb + v, sizeof(TYPE) * (size_t)(nb - v));                    \
                        x = load8_##TYPE(pad);                                                              \
                    }                                                                                       \
                    for (int r = 0; r < NR; r++)                                                            \
                        a[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(qp + r * channels + c), x, a[r]);        \
                }                                                                                           \
                for (int r = 0; r < NR; r++) _mm256_storeu_ps(o + r * group * BLOCK + v, a[r]);             \
            }                                                                                               \
        }                                                                                                   \
    }
#define VECTOR_ALL(TYPE) VECTOR(TYPE, 1) VECTOR(TYPE, 2) VECTOR(TYPE, 3) VECTOR(TYPE, 4)
VECTOR_ALL(int8_t)
VECTOR_ALL(float)
#define KERNEL(TYPE, NR) avx2_##TYPE##_##NR
#define KERNEL_NAME "avx2"
#else
LOGITS_ALL(int8_t)
LOGITS_ALL(float)
#define KERNEL(TYPE, NR) portable_##TYPE##_##NR
#define KERNEL_NAME "portable"
#endif

/* o[p] = b[p] + logsumexp_g t[g * BLOCK + p] (``lse``; else max_g) for p in [from, to); returns
 * max(best, o[from..to)) where best is the maximum of o[0..from) (or -inf) */
static float page_bounds(const float *t, int64_t group, int lse, const float *b, float *o, int64_t from, int64_t to) {
    float best = -INFINITY;
    for (int64_t p = 0; p < from; p++) best = maxf(best, o[p]);
    for (int64_t p = from; p < to; p++) {
        float m = t[p];
        for (int64_t g = 1; g < group; g++) m = maxf(m, t[g * BLOCK + p]);
        if (lse) { /* max + log sum exp(t - max) */
            float sum = 0.0f;
            for (int64_t g = 0; g < group; g++) sum += exp_nonpositive(t[g * BLOCK + p] - m);
            m += log_atleast1(sum);
        }
        o[p] = m + b[p];
        best = maxf(best, o[p]);
    }
    return best;
}

#if defined(HC_AVX2)
/* exp_nonpositive and log_atleast1 on 8 lanes (the same steps and coefficients) */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256i whole = _mm256_sub_epi32(
        _mm256_cvttps_epi32(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(128.5f))),
        _mm256_set1_epi32(128));
    const __m256 n = _mm256_cvtepi32_ps(whole);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), x);
    const __m256 z = _mm256_mul_ps(x, x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, z, x), _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(whole, _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

static inline __m256 log8(__m256 x) {
    __m256i bits = _mm256_castps_si256(x);
    const __m256i e = _mm256_srai_epi32(_mm256_sub_epi32(bits, _mm256_set1_epi32(0x3f3504f3)), 23);
    bits = _mm256_sub_epi32(bits, _mm256_slli_epi32(e, 23));
    const __m256 m = _mm256_sub_ps(_mm256_castsi256_ps(bits), _mm256_set1_ps(1.0f));
    const __m256 fe = _mm256_cvtepi32_ps(e), z = _mm256_mul_ps(m, m);
    __m256 y = _mm256_set1_ps(7.0376836292e-2f);
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.1514610310e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.1676998740e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.2420140846e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.4249322787e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.6668057665e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(2.0000714765e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-2.4999993993e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(3.3333331174e-1f));
    y = _mm256_mul_ps(_mm256_mul_ps(y, m), z);
    y = _mm256_fmadd_ps(fe, _mm256_set1_ps(-2.12194440e-4f), y);
    y = _mm256_fmadd_ps(z, _mm256_set1_ps(-0.5f), y);
    return _mm256_fmadd_ps(fe, _mm256_set1_ps(0.693359375f), _mm256_add_ps(m, y));
}

/* page_bounds on whole vectors of 8 pages from 0; returns where it stopped */
static int64_t avx2_bounds(const float *t, int64_t group, int lse, const float *b, float *o, int64_t nb) {
    int64_t p = 0;
    for (; p + 8 <= nb; p += 8) {
        __m256 m = _mm256_loadu_ps(t + p);
        for (int64_t g = 1; g < group; g++) m = _mm256_max_ps(m, _mm256_loadu_ps(t + g * BLOCK + p));
        if (lse) {
            __m256 sum = _mm256_setzero_ps();
            for (int64_t g = 0; g < group; g++)
                sum = _mm256_add_ps(sum, exp8(_mm256_sub_ps(_mm256_loadu_ps(t + g * BLOCK + p), m)));
            m = _mm256_add_ps(m, log8(sum));
        }
        _mm256_storeu_ps(o + p, _mm256_add_ps(m, _mm256_loadu_ps(b + p)));
    }
    return p;
}
#define VECTOR_BOUNDS(t, group, lse, b, o, nb) avx2_bounds(t, group, lse, b, o, nb)
#else
#define VECTOR_BOUNDS(t, group, lse, b, o, nb) 0
#endif

/* which logits kernel this build uses (tests run both), and the block layout's pages per block */
const char *hc_kernel(void) { return KERNEL_NAME; }
int64_t hc_block(void) { return BLOCK; }

/* ask for the summaries of block ``block`` of sequence i ahead of use */
static void prefetch_block(const hc_job *J, int64_t i, int64_t block) {
    const int64_t pages = J->pages, p0 = block * BLOCK, nb = pages - p0 < BLOCK ? pages - p0 : BLOCK;
    const int64_t element = J->summary_int8 ? 1 : (int64_t)sizeof(float), row = J->group * J->channels * element;
    const char *s = (const char *)J->summaries + (i * pages + p0) * row;
    for (int64_t at = 0; at < nb * row; at += 64) __builtin_prefetch(s + at, 0, 3);
}

/* phase A, one task: bound[r, p0 + k] for k < nb and every query row; returns each row's max in top */
static void block_bounds(const hc_job *J, int64_t i, const float *qp, float *bound, float *top, float *tokens,
                         int64_t block) {
    const int64_t rows = J->rows, channels = J->channels, pages = J->pages, group = J->group;
    const int64_t p0 = block * BLOCK, nb = pages - p0 < BLOCK ? pages - p0 : BLOCK;
    const size_t element = J->summary_int8 ? 1 : sizeof(float);
    const void *s = (const char *)J->summaries + (size_t)((i * pages + p0) * group * channels) * element;
    for (int64_t r = 0; r < rows; r += 4) {
        const int64_t nr = rows - r < 4 ? rows - r : 4;
        float *out = tokens + r * group * BLOCK;
        const float *w = qp + r * channels;
        if (J->summary_int8) {
            const int8_t *si = s;
            if (nr == 1) KERNEL(int8_t, 1)(out, si, w, channels, group, nb);
            else if (nr == 2) KERNEL(int8_t, 2)(out, si, w, channels, group, nb);
            else if (nr == 3) KERNEL(int8_t, 3)(out, si, w, channels, group, nb);
            else KERNEL(int8_t, 4)(out, si, w, channels, group, nb);
        } else {
            const float *sf = s;
            if (nr == 1) KERNEL(float, 1)(out, sf, w, channels, group, nb);
            else if (nr == 2) KERNEL(float, 2)(out, sf, w, channels, group, nb);
            else if (nr == 3) KERNEL(float, 3)(out, sf, w, channels, group, nb);
            else KERNEL(float, 4)(out, sf, w, channels, group, nb);
        }
    }
    const float *b = J->base + i * pages + p0;
    const int lse = J->page_lse && group > 1;
    for (int64_t r = 0; r < rows; r++) {
        const float *t = tokens + r * group * BLOCK;
        float *o = bound + r * pages + p0;
        top[r] = page_bounds(t, group, lse, b, o, VECTOR_BOUNDS(t, group, lse, b, o, nb), nb);
    }
}

/* a float's order as an unsigned key (larger float, larger key; scores are never NaN) */
static inline uint32_t order_key(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return bits & 0x80000000u ? ~bits : bits | 0x80000000u;
}

/* wanted[p] = 1 for the k best pages (largest key, then lowest page): radix selection, 8 bits a pass,
 * each pass over the candidates left by the previous one (compacted into ``spare``, pages entries);
 * four interleaved histograms keep equal digits from serialising the counts */
static void select_best(const uint32_t *keys, int64_t pages, int64_t k, uint8_t *wanted, uint32_t *spare) {
    uint32_t prefix = 0, mask = 0;
    int64_t need = k, m = pages; /* need: how many of the m candidates (matching prefix under mask) to take */
    const uint32_t *from = keys;
    for (int shift = 24; shift >= 0; shift -= 8) {
        uint32_t count[4][256];
        memset(count, 0, sizeof count);
        int64_t p = 0;
        for (; p + 4 <= m; p += 4) {
            count[0][(from[p] >> shift) & 255u]++;
            count[1][(from[p + 1] >> shift) & 255u]++;
            count[2][(from[p + 2] >> shift) & 255u]++;
            count[3][(from[p + 3] >> shift) & 255u]++;
        }
        for (; p < m; p++) count[0][(from[p] >> shift) & 255u]++;
        int bin = 255;
        for (; bin > 0; bin--) {
            const int64_t c = (int64_t)count[0][bin] + count[1][bin] + count[2][bin] + count[3][bin];
            if (c >= need) break;
            need -= c;
        }
        prefix |= (uint32_t)bin << shift;
        mask |= 255u << shift;
        if (shift == 0) break;
        int64_t kept = 0; /* in place when from == spare: the write index never passes the read one */
        for (p = 0; p < m; p++) {
            const uint32_t key = from[p];
            spare[kept] = key;
            kept += (key & mask) == prefix;
        }
        m = kept;
        from = spare;
    }
    /* every key above the threshold ``prefix``, then the first ``need`` equal to it */
    for (int64_t p = 0; p < pages; p++) {
        const int take = keys[p] > prefix || (keys[p] == prefix && need > 0);
        need -= keys[p] == prefix && need > 0;
        wanted[p] = (uint8_t)take;
    }
}

typedef struct { int64_t seq, slot, page; } move;

/* phase B, one sequence: choose its pages and pair the incoming ones with freed slots (written to
 * moves); returns how many, or -1 when the sets do not pair up */
static int64_t plan(const hc_job *J, int64_t i, const float *bound, const float *tops, int64_t blocks,
                    uint32_t *keys, uint32_t *spare, uint8_t *wanted, move *moves) {
    const int64_t rows = J->rows, pages = J->pages, width = J->counts[i];
    if (pages <= 0 || width <= 0) return 0;
    uint8_t *res = J->resident + i * pages;
    const int64_t *cur = J->current + i * J->width;
    const float stick = (float)J->stick;
    float top[rows];
    for (int64_t r = 0; r < rows; r++) {
        float t = -INFINITY;
        for (int64_t k = 0; k < blocks; k++) t = maxf(t, tops[k * rows + r]);
        top[r] = t < -1e30f ? -1e30f : t;
    }
    for (int64_t p = 0; p < pages; p++) {
        float best = bound[p] - top[0];
        for (int64_t r = 1; r < rows; r++) best = maxf(best, bound[r * pages + p] - top[r]);
        if (stick != 0.0f && res[p]) best += stick;
        keys[p] = order_key(best);
    }
    select_best(keys, pages, width < pages ? width : pages, wanted, spare);
    int64_t m = 0, next = 0;
    for (int64_t k = 0; k < width; k++) {
        if (wanted[cur[k]]) continue;
        while (next < pages && !(wanted[next] && !res[next])) next++;
        if (next == pages) return -1;
        moves[m++] = (move){i, k, next++};
    }
    while (next < pages && !(wanted[next] && !res[next])) next++;
    if (next != pages) return -1; /* an incoming page without a freed slot */
    memcpy(res, wanted, (size_t)pages);
    return m;
}

/* phase C, one page: tier -> its unit slot */
static void copy_page(const hc_job *J, const move *mv) {
    const int64_t i = mv->seq, unit = J->unit, token_bytes = J->token_bytes, unit_bytes = unit * token_bytes;
    const int64_t nb = J->nbuckets, bucket = J->seq_bucket[i];
    const int64_t row_start = J->seq_row[i] * J->buckets[3 * nb + bucket];
    char *keys = (char *)(intptr_t)J->buckets[bucket] + row_start * token_bytes;
    char *values = (char *)(intptr_t)J->buckets[nb + bucket] + row_start * token_bytes;
    int32_t *positions = (int32_t *)(intptr_t)J->buckets[2 * nb + bucket] + row_start;
    const int64_t src = i * J->pages + mv->page, k = mv->slot;
    memcpy(keys + k * unit_bytes, J->tier_keys + src * unit_bytes, (size_t)unit_bytes);
    memcpy(values + k * unit_bytes, J->tier_values + src * unit_bytes, (size_t)unit_bytes);
    for (int64_t u = 0; u < unit; u++) positions[k * unit + u] = (int32_t)J->page_positions[src * unit + u];
    J->current[i * J->width + k] = mv->page;
}

/* scratch that lives as long as its thread (OpenMP keeps its pool): no malloc per call */
static _Thread_local char *scratch[2];
static _Thread_local size_t scratch_bytes[2];

static void *grow(int which, size_t bytes) {
    if (bytes > scratch_bytes[which]) {
        free(scratch[which]);
        scratch[which] = malloc(bytes);
        scratch_bytes[which] = scratch[which] ? bytes : 0;
    }
    return scratch[which];
}

static size_t aligned(size_t bytes) { return (bytes + 63) & ~(size_t)63; }

/* refill sequence i this call? (the drift gate; stores its qp as the new anchor when it is) */
static int due(hc_job *J, int64_t i, const float *qp) {
    const int64_t size = J->rows * J->channels;
    if (!J->anchors) return 1;
    if (J->rows != J->anchor_rows) { /* a multi-token step: refill, no anchor of that shape */
        J->anchored[i] = 0;
        return 1;
    }
    float *anchor = J->anchors + i * size;
    if (J->drift > 0 && J->anchored[i]) {
        float moved = 0.0f, length = 0.0f;
        for (int64_t k = 0; k < size; k++) {
            const float d = qp[k] - anchor[k];
            moved += d * d;
            length += anchor[k] * anchor[k];
        }
        if (moved < (float)(J->drift * J->drift) * length) return 0;
    }
    memcpy(anchor, qp, sizeof(float) * (size_t)size);
    J->anchored[i] = 1;
    return 1;
}

int64_t hc_refill(hc_job *J) {
    const int64_t n = J->n, rows = J->rows, dim = J->dim, channels = J->channels, pages = J->pages;
    J->skipped = 0;
    if (n <= 0 || pages <= 0 || rows <= 0) return 0;
    const int64_t blocks = (pages + BLOCK - 1) / BLOCK;
    int64_t width_total = 0;
    for (int64_t i = 0; i < n; i++) width_total += J->counts[i] > 0 ? J->counts[i] : 0;
    /* shared: qp (n, rows, C) of every sequence, then, sized for all n, what the refilled ones need:
       bound (n, rows, P), tops (n, blocks, rows), moves, per-sequence move offsets, their ids */
    const size_t at_bound = aligned(sizeof(float) * n * rows * channels);
    const size_t at_tops = at_bound + aligned(sizeof(float) * n * rows * pages);
    const size_t at_moves = at_tops + aligned(sizeof(float) * n * blocks * rows);
    const size_t at_counts = at_moves + aligned(sizeof(move) * (width_total > 0 ? width_total : 1));
    const size_t at_ids = at_counts + aligned(sizeof(int64_t) * (n + 1));
    char *shared = grow(0, at_ids + aligned(sizeof(int64_t) * n));
    if (!shared) return -2;
    float *qp = (float *)shared, *bound = (float *)(shared + at_bound), *tops = (float *)(shared + at_tops);
    move *moves = (move *)(shared + at_moves);
    int64_t *planned = (int64_t *)(shared + at_counts), *ids = (int64_t *)(shared + at_ids);
    for (int64_t i = 0; i < n; i++) { /* the query rows in the index's channels: a few thousand flops */
        const float *q = J->queries + i * rows * dim, *scale = J->qscale ? J->qscale + i * channels : NULL;
        for (int64_t r = 0; r < rows; r++) {
            float *out = qp + (i * rows + r) * channels;
            if (J->qmat) { /* row r of q @ qmat, the channels innermost (contiguous, vectorised) */
                const float *m = J->qmat + i * dim * channels;
                for (int64_t c = 0; c < channels; c++) out[c] = 0.0f;
                for (int64_t d = 0; d < dim; d++) {
                    const float x = q[r * dim + d];
                    for (int64_t c = 0; c < channels; c++) out[c] += x * m[d * channels + c];
                }
            } else {
                for (int64_t c = 0; c < channels; c++) out[c] = q[r * dim + c];
            }
            for (int64_t c = 0; c < channels; c++) out[c] *= (float)J->alpha * (scale ? scale[c] : 1.0f);
        }
    }
    /* the sequences refilled now (ids[0..active)); the moves of the a-th start at planned[a] */
    int64_t active = 0;
    planned[0] = 0;
    for (int64_t i = 0; i < n; i++)
        if (due(J, i, qp + i * rows * channels)) {
            ids[active] = i;
            planned[active + 1] = planned[active] + (J->counts[i] > 0 ? J->counts[i] : 0);
            active++;
        }
    J->skipped = n - active;
    if (!active) return 0;
    int64_t got[active];
    int64_t failed = 0, total = 0;
#pragma omp parallel
    {
        const size_t logits = aligned(sizeof(float) * rows * J->group * BLOCK);
        char *mine = grow(1, logits + 2 * aligned(sizeof(uint32_t) * pages) + aligned((size_t)pages));
        if (!mine) {
#pragma omp atomic write
            failed = -2;
        }
        float *tokens = (float *)mine;
        uint32_t *keys = (uint32_t *)(mine + logits);
        uint32_t *spare = (uint32_t *)((char *)keys + aligned(sizeof(uint32_t) * pages));
        uint8_t *wanted = (uint8_t *)spare + aligned(sizeof(uint32_t) * pages);
#pragma omp for schedule(static)
        for (int64_t task = 0; task < active * blocks; task++) { /* A: page bounds */
            const int64_t a = task / blocks, i = ids[a], block = task % blocks;
            if (task + 1 < active * blocks) prefetch_block(J, ids[(task + 1) / blocks], (task + 1) % blocks);
            if (mine)
                block_bounds(J, i, qp + i * rows * channels, bound + a * rows * pages, tops + task * rows, tokens,
                             block);
        }
#pragma omp for schedule(static)
        for (int64_t a = 0; a < active; a++) { /* B: choose and pair */
            got[a] = mine ? plan(J, ids[a], bound + a * rows * pages, tops + a * blocks * rows, blocks, keys, spare,
                                 wanted, moves + planned[a])
                          : -2;
            if (got[a] < 0) {
#pragma omp atomic write
                failed = got[a];
            }
        }
#pragma omp single
        if (!failed) /* the moves of every sequence, one after the other */
            for (int64_t a = 0; a < active; a++) {
                memmove(moves + total, moves + planned[a], sizeof(move) * (size_t)got[a]);
                total += got[a];
            }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < total; j++) copy_page(J, &moves[j]); /* C: one task per page */
    }
    if (failed < 0) return failed;
    return total;
}
