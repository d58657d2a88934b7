/* Fused CPU refill of HeteroCache's dynamic slots in the block layout (one call per layer and step).
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
 * The ``counts[i]`` best pages of sequence i are wanted; each wanted page that is not resident is
 * copied, as one block of ``unit`` tokens, from the tier into the unit slot of a resident page that
 * is not wanted any more (k-th incoming page of a sequence into its k-th freed slot, both in
 * ascending order). Unit slot k of sequence i = storage slots [k * unit, (k + 1) * unit) of row
 * ``seq_row[i]`` of bucket ``seq_bucket[i]``, whose keys / values / int32 positions start at the
 * addresses ``bucket_keys[b]`` / ``bucket_values[b]`` / ``bucket_positions[b]`` with
 * ``bucket_capacity[b]`` slots per row. Updates ``resident``, ``current`` and the storage in place;
 * returns the number of pages moved (-1 when a sequence's sets do not pair up, -2 out of memory).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <stddef.h>

typedef struct { float score; int32_t page; } entry;

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

/* acc[r][t] += sum_c w[r][c] * row_c[t] for NR query rows at once (each summary entry is widened to
 * float once for all of them), over ``channels`` rows of ``length`` entries, 2 channels per pass */
#define ROWS_KERNEL(TYPE, NR)                                                                        \
    static void rows_##TYPE##_##NR(float *restrict acc, const TYPE *restrict s, const float *w,       \
                                   int64_t wstride, int64_t channels, int64_t length) {              \
        int64_t c = 0;                                                                               \
        for (; c + 2 <= channels; c += 2) {                                                          \
            float a[NR], b[NR];                                                                      \
            for (int r = 0; r < NR; r++) { a[r] = w[r * wstride + c]; b[r] = w[r * wstride + c + 1]; } \
            const TYPE *restrict r0 = s + c * length, *restrict r1 = r0 + length;                    \
            for (int64_t t = 0; t < length; t++) {                                                   \
                const float x = (float)r0[t], y = (float)r1[t];                                      \
                for (int r = 0; r < NR; r++) acc[r * length + t] += a[r] * x + b[r] * y;             \
            }                                                                                        \
        }                                                                                            \
        for (; c < channels; c++) {                                                                  \
            const TYPE *restrict r0 = s + c * length;                                                \
            for (int64_t t = 0; t < length; t++) {                                                   \
                const float x = (float)r0[t];                                                        \
                for (int r = 0; r < NR; r++) acc[r * length + t] += w[r * wstride + c] * x;          \
            }                                                                                        \
        }                                                                                            \
    }
#define ROWS_KERNELS(TYPE) ROWS_KERNEL(TYPE, 1) ROWS_KERNEL(TYPE, 2) ROWS_KERNEL(TYPE, 3) ROWS_KERNEL(TYPE, 4)
ROWS_KERNELS(int8_t)
ROWS_KERNELS(float)

/* acc (rows, length) = w (rows, channels) @ s (channels, length), 4 query rows per sweep */
static void scores(float *acc, const void *s, int is_int8, const float *w, int64_t rows, int64_t channels,
                   int64_t length) {
    memset(acc, 0, sizeof(float) * (size_t)(rows * length));
    for (int64_t r = 0; r < rows; r += 4) {
        const int64_t nr = rows - r < 4 ? rows - r : 4;
        float *a = acc + r * length;
        const float *wr = w + r * channels;
        if (is_int8) {
            const int8_t *si = s;
            if (nr == 1) rows_int8_t_1(a, si, wr, channels, channels, length);
            else if (nr == 2) rows_int8_t_2(a, si, wr, channels, channels, length);
            else if (nr == 3) rows_int8_t_3(a, si, wr, channels, channels, length);
            else rows_int8_t_4(a, si, wr, channels, channels, length);
        } else {
            const float *sf = s;
            if (nr == 1) rows_float_1(a, sf, wr, channels, channels, length);
            else if (nr == 2) rows_float_2(a, sf, wr, channels, channels, length);
            else if (nr == 3) rows_float_3(a, sf, wr, channels, channels, length);
            else rows_float_4(a, sf, wr, channels, channels, length);
        }
    }
}

/* descending score, then ascending page (a total order: the selection is deterministic) */
static int better(const entry *a, const entry *b) {
    return a->score > b->score || (a->score == b->score && a->page < b->page);
}

static void swap_entries(entry *a, entry *b) { entry t = *a; *a = *b; *b = t; }

/* move the k best entries of e[0..n) to the front (quickselect, any order inside) */
static void select_best(entry *e, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        entry pivot = e[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (better(&e[i], &pivot)) i++;
            while (better(&pivot, &e[j])) j--;
            if (i <= j) { swap_entries(&e[i], &e[j]); i++; j--; }
        }
        if (k - 1 <= j) hi = j;
        else if (k - 1 >= i) lo = i;
        else break;
    }
}

typedef struct {
    int64_t n, rows, dim, channels, pages, group;
    const float *queries, *qmat, *qscale;
    float alpha;
    const void *summaries;
    int32_t summary_int8;
    const float *base;
    float stick;
    int32_t page_lse;
    uint8_t *resident;
    int64_t width;  /* row stride of ``current`` (the largest count) */
    const int64_t *counts;
    int64_t *current;
    const char *tier_keys, *tier_values;
    int64_t token_bytes;
    const int64_t *page_positions;
    int64_t unit;
    const int64_t *seq_bucket, *seq_row, *bucket_keys, *bucket_values, *bucket_positions, *bucket_capacity;
} job;

/* one sequence: pages moved, -1 when its sets do not pair up, -2 out of memory */
static int64_t refill_one(const job *J, int64_t i) {
    const int64_t rows = J->rows, dim = J->dim, channels = J->channels, pages = J->pages, group = J->group;
    const int64_t length = pages * group, width = J->counts[i];
    if (pages <= 0 || width <= 0) return 0;
    float *qp = malloc(sizeof(float) * rows * channels);
    float *acc = malloc(sizeof(float) * rows * length);
    float *bound = malloc(sizeof(float) * rows * pages);
    float *sums = malloc(sizeof(float) * pages);
    entry *order = malloc(sizeof(entry) * pages);
    uint8_t *wanted = malloc((size_t)pages);
    int64_t *incoming = malloc(sizeof(int64_t) * (width > 0 ? width : 1));
    int64_t moved = 0;
    if (!qp || !acc || !bound || !sums || !order || !wanted || !incoming) { moved = -2; goto done; }
    const float *q = J->queries + i * rows * dim;
    const float *b = J->base + i * pages;
    uint8_t *res = J->resident + i * pages;
    int64_t *cur = J->current + i * J->width;
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t c = 0; c < channels; c++) {
            float v;
            if (J->qmat) {
                const float *m = J->qmat + i * dim * channels + c;
                v = 0.0f;
                for (int64_t d = 0; d < dim; d++) v += q[r * dim + d] * m[d * channels];
            } else {
                v = q[r * dim + c];
            }
            if (J->qscale) v *= J->qscale[i * channels + c];
            qp[r * channels + c] = J->alpha * v;
        }
    }
    const size_t element = J->summary_int8 ? 1 : sizeof(float);
    scores(acc, (const char *)J->summaries + (size_t)(i * channels * length) * element, J->summary_int8, qp, rows,
           channels, length);
    for (int64_t r = 0; r < rows; r++) {
        const float *accr = acc + r * length;
        float top = -INFINITY;
        float *out = bound + r * pages;
        for (int64_t p = 0; p < pages; p++) out[p] = accr[p];
        for (int64_t g = 1; g < group; g++)
            for (int64_t p = 0; p < pages; p++) out[p] = maxf(out[p], accr[g * pages + p]);
        if (J->page_lse && group > 1) { /* max + log sum exp(t - max) */
            for (int64_t p = 0; p < pages; p++) sums[p] = 0.0f;
            for (int64_t g = 0; g < group; g++)
                for (int64_t p = 0; p < pages; p++) sums[p] += exp_nonpositive(accr[g * pages + p] - out[p]);
            for (int64_t p = 0; p < pages; p++) out[p] += log_atleast1(sums[p]);
        }
        for (int64_t p = 0; p < pages; p++) {
            out[p] += b[p];
            top = maxf(top, out[p]);
        }
        if (top < -1e30f) top = -1e30f;
        for (int64_t p = 0; p < pages; p++) out[p] -= top;
    }
    for (int64_t p = 0; p < pages; p++) {
        float best = bound[p];
        for (int64_t r = 1; r < rows; r++) best = maxf(best, bound[r * pages + p]);
        if (J->stick != 0.0f && res[p]) best += J->stick;
        order[p].score = best;
        order[p].page = (int32_t)p;
    }
    select_best(order, pages, width);
    memset(wanted, 0, (size_t)pages);
    for (int64_t k = 0; k < width; k++) wanted[order[k].page] = 1;
    int64_t m = 0;
    for (int64_t p = 0; p < pages; p++)
        if (wanted[p] && !res[p]) incoming[m++] = p;
    int64_t used = 0;
    const int64_t unit = J->unit, token_bytes = J->token_bytes, unit_bytes = unit * token_bytes;
    const int64_t bucket = J->seq_bucket[i], row_start = J->seq_row[i] * J->bucket_capacity[bucket];
    char *keys = (char *)(intptr_t)J->bucket_keys[bucket] + row_start * token_bytes;
    char *values = (char *)(intptr_t)J->bucket_values[bucket] + row_start * token_bytes;
    int32_t *positions = (int32_t *)(intptr_t)J->bucket_positions[bucket] + row_start;
    for (int64_t k = 0; k < width && used < m; k++) {
        if (wanted[cur[k]]) continue;
        const int64_t p = incoming[used++];
        const int64_t src = i * pages + p;
        memcpy(keys + k * unit_bytes, J->tier_keys + src * unit_bytes, (size_t)unit_bytes);
        memcpy(values + k * unit_bytes, J->tier_values + src * unit_bytes, (size_t)unit_bytes);
        for (int64_t u = 0; u < unit; u++) positions[k * unit + u] = (int32_t)J->page_positions[src * unit + u];
        cur[k] = p;
    }
    if (used != m) { moved = -1; goto done; }
    moved = m;
    memcpy(res, wanted, (size_t)pages);
done:
    free(qp); free(acc); free(bound); free(sums); free(order); free(wanted); free(incoming);
    return moved;
}

int64_t hc_refill(
    int64_t n, int64_t rows, int64_t dim, int64_t channels, int64_t pages, int64_t group,
    const float *queries, const float *qmat, const float *qscale, float alpha,
    const void *summaries, int32_t summary_int8, const float *base, float stick, int32_t page_lse,
    uint8_t *resident, int64_t width, const int64_t *counts, int64_t *current,
    const char *tier_keys, const char *tier_values, int64_t token_bytes, const int64_t *page_positions, int64_t unit,
    const int64_t *seq_bucket, const int64_t *seq_row, const int64_t *buckets)
{
    /* buckets: 4 x nb addresses / capacities (keys, values, positions, capacity), see ``job`` */
    int64_t nb = 0;
    for (int64_t i = 0; i < n; i++) nb = seq_bucket[i] + 1 > nb ? seq_bucket[i] + 1 : nb;
    const job J = {n, rows, dim, channels, pages, group, queries, qmat, qscale, alpha, summaries, summary_int8,
                   base, stick, page_lse, resident, width, counts, current, tier_keys, tier_values, token_bytes, page_positions,
                   unit, seq_bucket, seq_row, buckets, buckets + nb, buckets + 2 * nb, buckets + 3 * nb};
    int64_t moved = 0, failed = 0;
    /* sequences are independent (their own pages, slots and storage rows); with -fopenmp they share
       the OpenMP runtime torch already loaded (libgomp), so torch.set_num_threads applies */
#pragma omp parallel for schedule(static) reduction(+ : moved) reduction(min : failed) if (n > 1)
    for (int64_t i = 0; i < n; i++) {
        const int64_t one = refill_one(&J, i);
        if (one < 0) failed = one < failed ? one : failed;
        else moved += one;
    }
    return failed < 0 ? failed : moved;
}
