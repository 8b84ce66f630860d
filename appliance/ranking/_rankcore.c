/* The Rank path's per-candidate arithmetic in C: ids to catalog rows, then scores, MMR and the shown
 * titles' per-signal terms, each in one call; then the reasons' walk and the RankedItems' wire bytes
 * (appliance/ranking/native.py is the Python side).
 *
 * Why: as numpy, a Rank over 1,000 candidates is a few dozen calls on ~1,000-element arrays, and each
 * call's fixed cost is most of its price. Here the same steps are plain loops. No numpy C API: arrays
 * come in through the buffer protocol (the caller allocates the outputs), so the module builds against
 * Python's headers alone and loads in a few hundred kB (numba did the same loops at +130 MB of RSS).
 *
 * The arithmetic is the numpy path's (ranker.py), step for step in float32, and the two z-scored signals'
 * sums are numpy's pairwise float32 sums (same blocks, same order), so scores are bit-identical; only the
 * dot products (MMR similarity, the top k's collaborative/session/content terms) are sequential sums where
 * numpy calls BLAS, equal up to the last bits. Compiled with -ffp-contract=off: no fused multiply-add
 * (aarch64's default), which would change roundings. The GIL is released while the loops run.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the wire encoder writes floats in host order: little-endian hosts only"
#endif

#include "_buffers.h"

/* ---- candidate_rows ------------------------------------------------------------------------------ */

PyDoc_STRVAR(candidate_rows_doc,
"candidate_rows(ids, bits, base, keep, out) -> (count, unknown)\n\n"
"Catalog rows of int64 `ids` through the rank bitmap (bits: uint64, bit id set for a title; base: int32,\n"
"titles before each word; rows in id order: Catalog.id_bits), each once, ascending, only where the bool\n"
"mask `keep` allows: written to out[:count] (int64, len(ids) + 1 items at least). `unknown`: how many ids\n"
"are not titles.");

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RC_POPCNT_CLONES __attribute__((target_clones("popcnt", "default")))
#else
#define RC_POPCNT_CLONES
#endif

/* Mark the rows of the ids in `mark` (a bit per row, and a last word where ids that are not titles land);
 * returns how many are not titles. Branch-free, every read in bounds whatever the id. */
RC_POPCNT_CLONES static Py_ssize_t mark_rows(const int64_t *x, Py_ssize_t n_ids, const uint64_t *bits,
                                              const int32_t *base, Py_ssize_t words, const uint8_t *ok,
                                              Py_ssize_t n, uint64_t *mark, Py_ssize_t sink)
{
    Py_ssize_t unknown = 0;
    for (Py_ssize_t i = 0; i < n_ids; i++) {
        uint64_t v = (uint64_t)x[i];
        int inside = v < (uint64_t)words * 64;
        Py_ssize_t w = inside ? (Py_ssize_t)(v >> 6) : 0;
        uint64_t word = bits[w], below = (1ULL << (v & 63)) - 1;
        int64_t r = (int64_t)base[w] + __builtin_popcountll(word & below);
        int valid = inside & (int)((word >> (v & 63)) & 1) & (r < n);
        unknown += !valid;
        Py_ssize_t src = valid ? (Py_ssize_t)r : 0;
        Py_ssize_t at = valid ? src : sink;
        mark[at >> 6] |= (uint64_t)(valid & (ok[src] != 0)) << (at & 63);
    }
    return unknown;
}

static PyObject *candidate_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Buf ids, bits, base, keep, out;
    PyObject *res = NULL;
    ids.held = bits.held = base.held = keep.held = out.held = 0;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "candidate_rows takes 5 arguments");
        return NULL;
    }
    if (get_buf(args[0], &ids, 8, -1, 0, "ids") || get_buf(args[1], &bits, 8, -1, 0, "bits") ||
        get_buf(args[2], &base, 4, bits.view.len / 8, 0, "base") || get_buf(args[3], &keep, 1, -1, 0, "keep") ||
        get_buf(args[4], &out, 8, -1, 1, "out"))
        goto done;
    Py_ssize_t n_ids = ids.view.len / 8, words = bits.view.len / 8, n = keep.view.len;
    if (out.view.len / 8 < n_ids + 1) {
        PyErr_SetString(PyExc_ValueError, "out: len(ids) + 1 items needed");
        goto done;
    }
    if (words == 0 || n == 0) {
        res = Py_BuildValue("nn", (Py_ssize_t)0, n_ids);
        goto done;
    }
    Py_ssize_t mark_words = n / 64 + 2, count = 0, unknown;
    uint64_t *mark = calloc((size_t)mark_words, sizeof(uint64_t));
    if (!mark) {
        PyErr_NoMemory();
        goto done;
    }
    int64_t *o = out.view.buf;
    Py_BEGIN_ALLOW_THREADS
    unknown = mark_rows(ids.view.buf, n_ids, bits.view.buf, base.view.buf, words, keep.view.buf, n, mark,
                        (mark_words - 1) * 64);
    for (Py_ssize_t w = 0; w < mark_words - 1; w++) {  /* the marked rows, ascending */
        uint64_t b = mark[w];
        while (b) {
            o[count++] = w * 64 + __builtin_ctzll(b);
            b &= b - 1;
        }
    }
    Py_END_ALLOW_THREADS
    free(mark);
    res = Py_BuildValue("nn", count, unknown);
done:
    release(&ids); release(&bits); release(&base); release(&keep); release(&out);
    return res;
}

/* ---- numpy's float32 reductions ------------------------------------------------------------------- */

#define PW_BLOCKSIZE 128

/* numpy's pairwise summation of float32 (umath loops_utils: 8 accumulators per block of <= 128, halves
 * split on multiples of 8), so a sum here is the bits np.add.reduce gives. */
static float pairwise_sum(const float *a, Py_ssize_t n)
{
    if (n < 8) {
        float res = 0.0f;
        for (Py_ssize_t i = 0; i < n; i++)
            res += a[i];
        return res;
    }
    if (n <= PW_BLOCKSIZE) {
        float r[8], res;
        Py_ssize_t i;
        for (int j = 0; j < 8; j++)
            r[j] = a[j];
        for (i = 8; i < n - (n % 8); i += 8)
            for (int j = 0; j < 8; j++)
                r[j] += a[i + j];
        res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++)
            res += a[i];
        return res;
    }
    Py_ssize_t n2 = n / 2;
    n2 -= n2 % 8;
    return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

/* np.add.reduce of a float32 vector: an initial 0 plus the pairwise sum. */
static float reduce_add(const float *a, Py_ssize_t n)
{
    return 0.0f + pairwise_sum(a, n);
}

/* ranker._zscore: x = weight * (x - mean) / std over x (over x[mask] when mask; 0 outside the mask, 0
 * everywhere when std is 0). `tmp`: n floats of scratch. */
static void zscore(float *x, const uint8_t *mask, Py_ssize_t n, double weight, float *tmp)
{
    Py_ssize_t m = 0;
    if (mask) {
        for (Py_ssize_t i = 0; i < n; i++)
            if (mask[i])
                tmp[m++] = x[i];
    } else {
        memcpy(tmp, x, (size_t)n * sizeof(float));
        m = n;
    }
    float mean = (float)((double)reduce_add(tmp, m) / (double)m);
    for (Py_ssize_t i = 0; i < m; i++) {
        float d = tmp[i] - mean;
        tmp[i] = d * d;
    }
    float sd = sqrtf((float)((double)reduce_add(tmp, m) / (double)m));
    if (sd <= 0.0f) {
        memset(x, 0, (size_t)n * sizeof(float));
        return;
    }
    float f = (float)(weight / (double)sd);
    for (Py_ssize_t i = 0; i < n; i++)
        x[i] = (mask && !mask[i]) ? 0.0f : (x[i] - mean) * f;
}

/* ---- MMR ------------------------------------------------------------------------------------------- */

typedef struct {
    float s;  /* score (NaN counts as -inf) */
    int32_t i;
} Key;

/* a before b: higher score, then lower index (a stable sort by score, descending). */
static inline int before(Key a, Key b)
{
    return a.s > b.s || (a.s == b.s && a.i < b.i);
}

/* Sort keys in `before` order: insertion sort for short runs (the pool: ~100), else a merge sort. */
static void sort_keys(Key *keys, Py_ssize_t n, Key *tmp)
{
    if (n <= 32) {
        for (Py_ssize_t i = 1; i < n; i++) {
            Key x = keys[i];
            Py_ssize_t j = i;
            while (j > 0 && before(x, keys[j - 1])) {
                keys[j] = keys[j - 1];
                j--;
            }
            keys[j] = x;
        }
        return;
    }
    Py_ssize_t h = n / 2;
    sort_keys(keys, h, tmp);
    sort_keys(keys + h, n - h, tmp);
    if (!before(keys[h], keys[h - 1]))
        return;  /* already in order */
    memcpy(tmp, keys, (size_t)h * sizeof(Key));
    Py_ssize_t i = 0, j = h, o = 0;
    while (i < h && j < n)
        keys[o++] = before(keys[j], tmp[i]) ? keys[j++] : tmp[i++];
    while (i < h)
        keys[o++] = tmp[i++];
}

/* acc[i] += col[i] * x: the similarity sums, one coordinate at a time (vectorised across titles; each
 * title's sum is still in coordinate order). Not inlined: inlined, gcc lost `restrict` and stayed scalar. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RC_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define RC_CLONES
#endif

/* (On x86-64 also built for AVX2, chosen at load time: the same arithmetic, 8 titles per instruction.) */
RC_CLONES __attribute__((noinline)) static void axpy(float *restrict acc, const float *restrict col, float x,
                                                     Py_ssize_t m)
{
    for (Py_ssize_t i = 0; i < m; i++)
        acc[i] += col[i] * x;
}

/* Move the `k` first keys in `before` order to keys[0:k] (unordered): quickselect, a total order. */
static void select_first(Key *keys, Py_ssize_t n, Py_ssize_t k)
{
    Py_ssize_t lo = 0, hi = n - 1;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        /* median of three to keys[mid] */
        if (before(keys[mid], keys[lo])) { Key t = keys[mid]; keys[mid] = keys[lo]; keys[lo] = t; }
        if (before(keys[hi], keys[lo])) { Key t = keys[hi]; keys[hi] = keys[lo]; keys[lo] = t; }
        if (before(keys[hi], keys[mid])) { Key t = keys[hi]; keys[hi] = keys[mid]; keys[mid] = t; }
        Key pivot = keys[mid];
        Py_ssize_t i = lo, j = hi;
        while (i <= j) {
            while (before(keys[i], pivot)) i++;
            while (before(pivot, keys[j])) j--;
            if (i <= j) {
                Key t = keys[i]; keys[i] = keys[j]; keys[j] = t;
                i++; j--;
            }
        }
        if (k - 1 <= j) hi = j;
        else if (k - 1 >= i) lo = i;
        else break;
    }
}

/* Candidate indices in the order to show (written to `order`, `want` of them): greedy MMR, argmax of
 * (1 - lam) rel - lam max sim to the picks, over the best `pool_max` by score (rel rescaled to [0, 1 - lam]
 * over the pool), then by score. As ranker._mmr, which states the float32 steps. -1 on no memory. */
static int mmr(const int64_t *rows, const float *score, Py_ssize_t c, const float *M, Py_ssize_t d,
               double lam, Py_ssize_t pool_max, Py_ssize_t want, int64_t *order)
{
    Py_ssize_t pool_n = c < pool_max ? c : pool_max;
    Key *keys = malloc((size_t)c * sizeof(Key) * 2);  /* and the merge sort's scratch */
    if (!keys)
        return -1;
    Key *tmp = keys + c;
    for (Py_ssize_t i = 0; i < c; i++) {
        keys[i].s = isnan(score[i]) ? -INFINITY : score[i];
        keys[i].i = (int32_t)i;
    }
    if (want > pool_n) {
        sort_keys(keys, c, tmp);  /* the pool, then the rest by score */
    } else {
        if (pool_n < c)
            select_first(keys, c, pool_n);
        sort_keys(keys, pool_n, tmp);
    }
    Py_ssize_t n_pick = want < pool_n ? want : pool_n;
    if (lam > 0.0 && pool_n > 1) {
        /* The pool's rows of M (3 MB for 10k titles: mostly not in cache) are read below; start loading
         * them now, so the misses overlap instead of stalling the copy one row at a time. */
        for (Py_ssize_t i = 0; i < pool_n; i++) {
            const char *row = (const char *)(M + rows[keys[i].i] * d);
            for (Py_ssize_t b = 0; b < d * (Py_ssize_t)sizeof(float); b += 64)
                __builtin_prefetch(row + b);
        }
    }
    if (lam <= 0.0 || pool_n <= 1) {
        for (Py_ssize_t q = 0; q < want; q++)
            order[q] = keys[q].i;
        free(keys);
        return 0;
    }
    float *base = malloc((size_t)pool_n * sizeof(float));
    if (!base) {
        free(keys);
        return -1;
    }
    for (Py_ssize_t i = 0; i < pool_n; i++)
        base[i] = score[keys[i].i];
    float lo = base[pool_n - 1];
    for (Py_ssize_t i = 0; i < pool_n; i++)
        base[i] -= lo;
    double top = (double)base[0] > 1e-9 ? (double)base[0] : 1e-9;
    float topf = (float)top, keep_rel = (float)(1.0 - lam);
    for (Py_ssize_t i = 0; i < pool_n; i++)
        base[i] = (base[i] / topf) * keep_rel;
    /* Only titles within lam of the n_pick-th best relevance can ever be picked (see ranker._mmr). */
    float floor_ = base[n_pick - 1] - (float)(lam * 1.001);
    Py_ssize_t m = 0;
    while (m < pool_n && base[m] >= floor_)
        m++;
    float *McT = malloc((size_t)(d * m + 3 * m) * sizeof(float));  /* the pool's rows of M, transposed */
    if (!McT) {
        free(base);
        free(keys);
        return -1;
    }
    float *val = McT + d * m, *acc = val + m;
    for (Py_ssize_t i = 0; i < m; i++) {
        const float *src = M + rows[keys[i].i] * d;
        for (Py_ssize_t t = 0; t < d; t++)
            McT[t * m + i] = src[t];
        val[i] = base[i];
    }
    float neg_lam = (float)(-lam);
    Py_ssize_t j = 0;
    order[0] = keys[0].i;
    for (Py_ssize_t p = 1; p < n_pick; p++) {
        for (Py_ssize_t i = 0; i < m; i++)
            acc[i] = 0.0f;
        for (Py_ssize_t t = 0; t < d; t++)
            axpy(acc, McT + t * m, McT[t * m + j], m);
        for (Py_ssize_t i = 0; i < m; i++) {
            float v = i == j ? -INFINITY : acc[i] * neg_lam + base[i];
            if (v < val[i])
                val[i] = v;
        }
        Py_ssize_t best = 0;
        for (Py_ssize_t i = 1; i < m; i++)
            if (val[i] > val[best])
                best = i;
        j = best;
        order[p] = keys[j].i;
    }
    /* want > pool_n: every pool title was picked; then the rest by score (keys is fully sorted). */
    for (Py_ssize_t q = n_pick; q < want; q++)
        order[q] = keys[q].i;
    free(McT);
    free(base);
    free(keys);
    return 0;
}

/* ---- score_and_pick ------------------------------------------------------------------------------- */

enum { SEQ, NEXT, CF, SESSION, CONTENT, POP, CTX, AFFECT, N_SIGNALS };
#define SEQ_USED 1
#define NEXT_USED 2

static double as_double(PyObject *o, int *err)
{
    double v = PyFloat_AsDouble(o);
    if (v == -1.0 && PyErr_Occurred())
        *err = 1;
    return v;
}

PyDoc_STRVAR(score_and_pick_doc,
"score_and_pick(rows, base, seq_known, w_seq, use_next, w_next, ctx, aff, strength, M, diversity,\n"
"               pool_max, F, taste, G, session_w, content_w, pop_z, w_pop, order, top_score, T) -> flags\n\n"
"Score the candidate catalog rows (int64), pick the len(order) to show and split their scores into the\n"
"signals' terms. base: float32 [3, catalog] (raw sequence and 'next' scores, the other state terms);\n"
"seq_known (bool per title; None: no sequence signal), ctx and aff (float32 per title, or None): the\n"
"request's context prior and mood affinity (aff times strength). Writes order (int64 indices into rows),\n"
"top_score (float32) and T (float32 [8, len(order)], SIGNALS order). flags: 1 sequence used, 2 next used.");

static PyObject *score_and_pick(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    enum { A_ROWS, A_BASE, A_SEQK, A_WSEQ, A_USENEXT, A_WNEXT, A_CTX, A_AFF, A_STRENGTH, A_M, A_DIV, A_POOL,
           A_F, A_TASTE, A_G, A_SW, A_CW, A_POPZ, A_WPOP, A_ORDER, A_TOP, A_T, N_ARGS };
    Buf rows, base, seqk, ctx, aff, M, F, taste, G, sw, cw, popz, order, tops, T;
    Buf *all[] = {&rows, &base, &seqk, &ctx, &aff, &M, &F, &taste, &G, &sw, &cw, &popz, &order, &tops, &T};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        all[i]->held = 0;
    PyObject *res = NULL;
    float *scratch = NULL;
    if (nargs != N_ARGS) {
        PyErr_Format(PyExc_TypeError, "score_and_pick takes %d arguments", (int)N_ARGS);
        return NULL;
    }
    int err = 0;
    double w_seq = as_double(args[A_WSEQ], &err), w_next = as_double(args[A_WNEXT], &err);
    double strength_d = as_double(args[A_STRENGTH], &err), lam = as_double(args[A_DIV], &err);
    double w_pop = as_double(args[A_WPOP], &err);
    int use_next = PyObject_IsTrue(args[A_USENEXT]);
    Py_ssize_t pool_max = PyLong_AsSsize_t(args[A_POOL]);
    if (err || use_next < 0 || (pool_max == -1 && PyErr_Occurred()))
        return NULL;
    if (get_buf(args[A_POPZ], &popz, 4, -1, 0, "pop_z"))
        goto done;
    Py_ssize_t n = popz.view.len / 4;  /* catalog size */
    int use_seq = args[A_SEQK] != Py_None, use_ctx = args[A_CTX] != Py_None, use_aff = args[A_AFF] != Py_None;
    int use_taste = args[A_TASTE] != Py_None;
    if (get_buf(args[A_ROWS], &rows, 8, -1, 0, "rows") || get_buf(args[A_BASE], &base, 4, 3 * n, 0, "base") ||
        (use_seq && get_buf(args[A_SEQK], &seqk, 1, n, 0, "seq_known")) ||
        (use_ctx && get_buf(args[A_CTX], &ctx, 4, n, 0, "ctx")) ||
        (use_aff && get_buf(args[A_AFF], &aff, 4, n, 0, "aff")) ||
        get_buf(args[A_M], &M, 4, -1, 0, "M") || get_buf(args[A_F], &F, 4, -1, 0, "F") ||
        (use_taste && get_buf(args[A_TASTE], &taste, 4, -1, 0, "taste")) ||
        get_buf(args[A_G], &G, 4, -1, 0, "G") || get_buf(args[A_SW], &sw, 4, -1, 0, "session_w") ||
        get_buf(args[A_CW], &cw, 4, -1, 0, "content_w") || get_buf(args[A_ORDER], &order, 8, -1, 1, "order"))
        goto done;
    Py_ssize_t c = rows.view.len / 8, k = order.view.len / 8;
    Py_ssize_t dM = n ? M.view.len / 4 / n : 0, dF = use_taste ? taste.view.len / 4 : 0, dG = sw.view.len / 4;
    if (get_buf(args[A_TOP], &tops, 4, k, 1, "top_score") || get_buf(args[A_T], &T, 4, N_SIGNALS * k, 1, "T"))
        goto done;
    if (M.view.len != n * dM * 4 || (use_taste && F.view.len != n * dF * 4) || G.view.len != n * dG * 4 ||
        cw.view.len != dG * 4) {
        PyErr_SetString(PyExc_ValueError, "M, F, taste, G, session_w, content_w: shapes do not match the catalog");
        goto done;
    }
    if (k > c || (c > 0 && k < 1)) {
        PyErr_SetString(PyExc_ValueError, "order: between 1 and len(rows) items");
        goto done;
    }
    const int64_t *r_ = rows.view.buf;
    for (Py_ssize_t i = 0; i < c; i++)
        if (r_[i] < 0 || r_[i] >= n) {
            PyErr_SetString(PyExc_IndexError, "rows: a row outside the catalog");
            goto done;
        }
    scratch = malloc((size_t)(4 * c + 1) * sizeof(float) + (size_t)c + 1);
    if (!scratch) {
        PyErr_NoMemory();
        goto done;
    }
    int flags = 0, failed = 0;
    Py_BEGIN_ALLOW_THREADS
    const float *B = base.view.buf, *ctxv = ctx.view.buf, *affv = aff.view.buf;
    float *b0 = scratch, *b1 = b0 + c, *score = b1 + c, *tmp = score + c;
    uint8_t *known = (uint8_t *)(tmp + c + 1);
    int any_next = 0;
    for (Py_ssize_t i = 0; i < c; i++) {
        b0[i] = B[r_[i]];
        b1[i] = B[n + r_[i]];
        any_next |= b1[i] != 0.0f;
    }
    if (use_seq) {
        const uint8_t *sk = seqk.view.buf;
        Py_ssize_t nk = 0;
        for (Py_ssize_t i = 0; i < c; i++)
            nk += (known[i] = sk[r_[i]] != 0);
        if (nk) {
            zscore(b0, nk != c ? known : NULL, c, w_seq, tmp);
            flags |= SEQ_USED;
        } else {
            memset(b0, 0, (size_t)c * sizeof(float));
        }
    }
    if (use_next && any_next) {
        zscore(b1, NULL, c, w_next, tmp);
        flags |= NEXT_USED;
    }
    float strength = (float)strength_d;
    for (Py_ssize_t i = 0; i < c; i++) {  /* the numpy path's order: ((b0 + b1) + rest) + ctx + aff */
        float s = (b0[i] + b1[i]) + B[2 * n + r_[i]];
        if (use_ctx)
            s += ctxv[r_[i]];
        if (use_aff)
            s += affv[r_[i]] * strength;
        score[i] = s;
    }
    int64_t *o = order.view.buf;
    if (c && mmr(r_, score, c, M.view.buf, dM, lam, pool_max, k, o) < 0)
        failed = 1;
    if (!failed) {
        float *Tv = T.view.buf, *top = tops.view.buf;
        const float *Fv = F.view.buf, *tv = taste.view.buf, *Gv = G.view.buf, *swv = sw.view.buf,
                    *cwv = cw.view.buf, *pz = popz.view.buf;
        float wp = (float)w_pop;
        memset(Tv, 0, (size_t)(N_SIGNALS * k) * sizeof(float));
        for (Py_ssize_t q = 0; q < k; q++) {
            Py_ssize_t i = o[q];
            int64_t r = r_[i];
            top[q] = score[i];
            Tv[SEQ * k + q] = b0[i];
            Tv[NEXT * k + q] = b1[i];
            if (use_taste) {
                float t = 0.0f;
                for (Py_ssize_t e = 0; e < dF; e++)
                    t += Fv[r * dF + e] * tv[e];
                Tv[CF * k + q] = t;
            }
            float a = 0.0f, b = 0.0f;
            for (Py_ssize_t g = 0; g < dG; g++) {
                a += Gv[r * dG + g] * swv[g];
                b += Gv[r * dG + g] * cwv[g];
            }
            Tv[SESSION * k + q] = a;
            Tv[CONTENT * k + q] = b;
            if (w_pop != 0.0)
                Tv[POP * k + q] = pz[r] * wp;
            if (use_ctx)
                Tv[CTX * k + q] = ctxv[r];
            if (use_aff)
                Tv[AFFECT * k + q] = affv[r] * strength;
        }
    }
    Py_END_ALLOW_THREADS
    if (failed)
        PyErr_NoMemory();
    else
        res = PyLong_FromLong(flags);
done:
    free(scratch);
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        release(all[i]);
    return res;
}

/* ---- reasons ---------------------------------------------------------------------------------------- */

/* Signals of item q (column q of T [8, k]) by value, descending, ties by the lower signal: numpy's stable
 * argsort of -T. */
static void signal_order(const float *T, Py_ssize_t k, Py_ssize_t q, int *order)
{
    for (int j = 0; j < N_SIGNALS; j++) {
        int x = j;
        int p = j;
        float v = T[j * k + q];
        while (p > 0 && v > T[order[p - 1] * k + q]) {
            order[p] = order[p - 1];
            p--;
        }
        order[p] = x;
    }
}

/* reasons.reason_floor of the item's strongest value. */
static inline double reason_floor(double top, double min_abs, double min_share)
{
    return min_share * top > min_abs ? min_share * top : min_abs;
}

static int get_T(PyObject *obj, Buf *b, Py_ssize_t *k)
{
    if (get_buf(obj, b, 4, -1, 0, "T"))
        return -1;
    if ((b->view.len / 4) % N_SIGNALS) {
        PyErr_SetString(PyExc_ValueError, "T: float32 [8, k] expected");
        return -1;
    }
    *k = b->view.len / 4 / N_SIGNALS;
    return 0;
}

PyDoc_STRVAR(strong_signals_doc,
"strong_signals(T, min_abs, min_share) -> int\n\n"
"Bit j set: signal j is not below some item's reason floor (the signals whose reason texts are needed).");

static PyObject *strong_signals(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Buf T;
    Py_ssize_t k;
    int err = 0;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "strong_signals takes 3 arguments");
        return NULL;
    }
    double min_abs = as_double(args[1], &err), min_share = as_double(args[2], &err);
    if (err || get_T(args[0], &T, &k)) {
        if (!err) release(&T);
        return NULL;
    }
    const float *t = T.view.buf;
    long mask = 0;
    int order[N_SIGNALS];
    for (Py_ssize_t q = 0; q < k; q++) {
        signal_order(t, k, q, order);
        double floor_ = reason_floor(t[order[0] * k + q], min_abs, min_share);
        for (int o = 0; o < N_SIGNALS; o++) {
            if ((double)t[order[o] * k + q] < floor_)
                break;
            mask |= 1L << order[o];
        }
    }
    release(&T);
    return PyLong_FromLong(mask);
}

PyDoc_STRVAR(pick_reasons_doc,
"pick_reasons(T, made, names, min_abs, min_share, max_reasons) -> list\n\n"
"Per item (column of T), reasons.strong_from_made: walk its signals by value while not below its floor,\n"
"take made[j][item] = (text, named id) where there is one, one reason per named title, at most\n"
"max_reasons; each as a (text, names[j], value, named id) tuple. made[j] is None for a signal never read.\n"
"An item with no reason gets an empty list (the caller's fallback).");

static PyObject *pick_reasons(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Buf T;
    Py_ssize_t k;
    int err = 0;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "pick_reasons takes 6 arguments");
        return NULL;
    }
    PyObject *made = args[1], *names = args[2];
    double min_abs = as_double(args[3], &err), min_share = as_double(args[4], &err);
    Py_ssize_t max_reasons = PyLong_AsSsize_t(args[5]);
    if (err || (max_reasons == -1 && PyErr_Occurred()))
        return NULL;
    if (!PyList_Check(made) || PyList_GET_SIZE(made) != N_SIGNALS || !PyTuple_Check(names) ||
        PyTuple_GET_SIZE(names) != N_SIGNALS) {
        PyErr_SetString(PyExc_TypeError, "made: a list of 8, names: a tuple of 8");
        return NULL;
    }
    if (get_T(args[0], &T, &k))
        return NULL;
    for (int j = 0; j < N_SIGNALS; j++) {
        PyObject *col = PyList_GET_ITEM(made, j);
        if (col != Py_None && (!PyList_Check(col) || PyList_GET_SIZE(col) != k)) {
            release(&T);
            PyErr_SetString(PyExc_TypeError, "made[j]: None or a list with one entry per item");
            return NULL;
        }
    }
    const float *t = T.view.buf;
    PyObject *out = PyList_New(k);
    if (!out) {
        release(&T);
        return NULL;
    }
    int order[N_SIGNALS];
    long long named[N_SIGNALS];
    for (Py_ssize_t q = 0; q < k; q++) {
        PyObject *rs = PyList_New(0);
        if (!rs)
            goto fail;
        PyList_SET_ITEM(out, q, rs);
        signal_order(t, k, q, order);
        double floor_ = reason_floor(t[order[0] * k + q], min_abs, min_share);
        int n_named = 0;
        for (int o = 0; o < N_SIGNALS && PyList_GET_SIZE(rs) < max_reasons; o++) {
            int j = order[o];
            double value = t[j * k + q];
            if (value < floor_)
                break;
            PyObject *col = PyList_GET_ITEM(made, j);
            if (col == Py_None)
                continue;
            PyObject *m = PyList_GET_ITEM(col, q);
            if (m == Py_None)
                continue;
            if (!PyTuple_Check(m) || PyTuple_GET_SIZE(m) != 2) {
                PyErr_SetString(PyExc_TypeError, "made[j][i]: None or a (text, named id) tuple");
                goto fail;
            }
            PyObject *text = PyTuple_GET_ITEM(m, 0), *id = PyTuple_GET_ITEM(m, 1);
            long long nid = PyLong_AsLongLong(id);
            if (nid == -1 && PyErr_Occurred())
                goto fail;
            if (nid) {
                int seen = 0;
                for (int a = 0; a < n_named; a++)
                    seen |= named[a] == nid;
                if (seen)
                    continue;  /* one reason per named title */
                named[n_named++] = nid;
            }
            PyObject *v = PyFloat_FromDouble(value);
            if (!v)
                goto fail;
            PyObject *r = PyTuple_Pack(4, text, PyTuple_GET_ITEM(names, j), v, id);
            Py_DECREF(v);
            if (!r || PyList_Append(rs, r) < 0) {
                Py_XDECREF(r);
                goto fail;
            }
            Py_DECREF(r);
        }
    }
    release(&T);
    return out;
fail:
    release(&T);
    Py_DECREF(out);
    return NULL;
}

/* ---- the RankedItems' wire bytes --------------------------------------------------------------------- */

typedef struct {
    char *p;
    Py_ssize_t n, cap;
} Out;

static int out_reserve(Out *o, Py_ssize_t extra)
{
    if (o->n + extra <= o->cap)
        return 0;
    Py_ssize_t cap = o->cap ? o->cap : 256;
    while (cap < o->n + extra)
        cap *= 2;
    char *p = realloc(o->p, (size_t)cap);
    if (!p) {
        PyErr_NoMemory();
        return -1;
    }
    o->p = p;
    o->cap = cap;
    return 0;
}

static int put(Out *o, const void *src, Py_ssize_t len)
{
    if (out_reserve(o, len))
        return -1;
    memcpy(o->p + o->n, src, (size_t)len);
    o->n += len;
    return 0;
}

static int put_varint(Out *o, uint64_t v)
{
    unsigned char b[10];
    int n = 0;
    while (v > 0x7F) {
        b[n++] = (unsigned char)((v & 0x7F) | 0x80);
        v >>= 7;
    }
    b[n++] = (unsigned char)v;
    return put(o, b, n);
}

static int put_byte(Out *o, unsigned char b)
{
    return put(o, &b, 1);
}

/* tag, length, bytes: a length-delimited field */
static int put_ld(Out *o, unsigned char tag, const char *src, Py_ssize_t len)
{
    return put_byte(o, tag) || put_varint(o, (uint64_t)len) || put(o, src, len);
}

/* a string field, left out when empty (proto3) */
static int put_str(Out *o, unsigned char tag, PyObject *s)
{
    Py_ssize_t len;
    const char *u = PyUnicode_AsUTF8AndSize(s, &len);
    if (!u)
        return -1;
    return len ? put_ld(o, tag, u, len) : 0;
}

/* a float field, left out when its 32 bits are 0 (-0.0 is kept) */
static int put_f32(Out *o, unsigned char tag, float v)
{
    uint32_t bits;
    memcpy(&bits, &v, 4);
    if (!bits)
        return 0;
    return put_byte(o, tag) || put(o, &v, 4);  /* little-endian hosts only (x86-64, aarch64) */
}

static int put_sub(Out *o, unsigned char tag, const Out *body)
{
    return put_ld(o, tag, body->p ? body->p : "", body->n);
}

static struct {
    int ready;
    unsigned char item, id, title, score, reason, r_text, r_signal, r_weight, r_because;
} wire;

PyDoc_STRVAR(configure_wire_doc,
"configure_wire(item, item_id, title, score, reasons, text, signal, weight, because_item_id)\n\n"
"The one-byte tags of RankResponse.items and of the RankedItem and Reason fields (from the descriptors).");

static PyObject *configure_wire(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned char t[9];
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "configure_wire takes 9 tags");
        return NULL;
    }
    for (int i = 0; i < 9; i++) {
        long v = PyLong_AsLong(args[i]);
        if (v == -1 && PyErr_Occurred())
            return NULL;
        if (v < 8 || v > 0x7F) {
            PyErr_SetString(PyExc_ValueError, "tags must be one byte (field numbers 1..15)");
            return NULL;
        }
        t[i] = (unsigned char)v;
    }
    wire.item = t[0]; wire.id = t[1]; wire.title = t[2]; wire.score = t[3]; wire.reason = t[4];
    wire.r_text = t[5]; wire.r_signal = t[6]; wire.r_weight = t[7]; wire.r_because = t[8];
    wire.ready = 1;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(encode_items_doc,
"encode_items(ids, titles, scores, T, reasons, contrib_prefixes) -> bytes\n\n"
"The RankResponse.items fields of a ranking, byte for byte what rankpath.ResponseEncoder writes: ids (list\n"
"of int), titles (list of str), scores (float32 [k]), T (float32 [8, k]: each item's contributions),\n"
"reasons (per item, (text, signal, weight, because_item_id) tuples), contrib_prefixes (8 bytes: all of\n"
"a contribution but its value's 4 bytes).");

static PyObject *encode_items(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "encode_items takes 6 arguments");
        return NULL;
    }
    if (!wire.ready) {
        PyErr_SetString(PyExc_RuntimeError, "configure_wire first");
        return NULL;
    }
    PyObject *ids = args[0], *titles = args[1], *reasons = args[4], *prefixes = args[5];
    Buf sc, T;
    sc.held = T.held = 0;
    Py_ssize_t k;
    Out out = {0}, item = {0}, rsn = {0};
    PyObject *res = NULL;
    if (get_T(args[3], &T, &k) || get_buf(args[2], &sc, 4, k, 0, "scores"))
        goto done;
    if (!PyList_Check(ids) || !PyList_Check(titles) || !PyList_Check(reasons) || PyList_GET_SIZE(ids) != k ||
        PyList_GET_SIZE(titles) != k || PyList_GET_SIZE(reasons) != k || !PyTuple_Check(prefixes) ||
        PyTuple_GET_SIZE(prefixes) != N_SIGNALS) {
        PyErr_SetString(PyExc_TypeError, "ids, titles, reasons: lists of k; contrib_prefixes: a tuple of 8");
        goto done;
    }
    const float *t = T.view.buf, *scores = sc.view.buf;
    for (Py_ssize_t q = 0; q < k; q++) {
        item.n = 0;
        long long id = PyLong_AsLongLong(PyList_GET_ITEM(ids, q));
        if (id == -1 && PyErr_Occurred())
            goto done;
        if (id && (put_byte(&item, wire.id) || put_varint(&item, (uint64_t)id)))
            goto done;
        if (put_str(&item, wire.title, PyList_GET_ITEM(titles, q)) || put_f32(&item, wire.score, scores[q]))
            goto done;
        PyObject *rs = PyList_GET_ITEM(reasons, q);
        if (!PyList_Check(rs)) {
            PyErr_SetString(PyExc_TypeError, "reasons: a list per item");
            goto done;
        }
        for (Py_ssize_t a = 0; a < PyList_GET_SIZE(rs); a++) {
            PyObject *r = PyList_GET_ITEM(rs, a);
            if (!PyTuple_Check(r) || PyTuple_GET_SIZE(r) != 4) {
                PyErr_SetString(PyExc_TypeError, "a reason: a (text, signal, weight, because_item_id) tuple");
                goto done;
            }
            rsn.n = 0;
            double w = PyFloat_AsDouble(PyTuple_GET_ITEM(r, 2));
            long long b = PyLong_AsLongLong(PyTuple_GET_ITEM(r, 3));
            if (PyErr_Occurred())
                goto done;
            if (put_str(&rsn, wire.r_text, PyTuple_GET_ITEM(r, 0)) ||
                put_str(&rsn, wire.r_signal, PyTuple_GET_ITEM(r, 1)) || put_f32(&rsn, wire.r_weight, (float)w) ||
                (b && (put_byte(&rsn, wire.r_because) || put_varint(&rsn, (uint64_t)b))) ||
                put_sub(&item, wire.reason, &rsn))
                goto done;
        }
        for (int j = 0; j < N_SIGNALS; j++) {  /* every contribution, zeros written out too */
            PyObject *pre = PyTuple_GET_ITEM(prefixes, j);
            if (!PyBytes_Check(pre)) {
                PyErr_SetString(PyExc_TypeError, "contrib_prefixes: bytes");
                goto done;
            }
            float v = t[j * k + q];
            if (put(&item, PyBytes_AS_STRING(pre), PyBytes_GET_SIZE(pre)) || put(&item, &v, 4))
                goto done;
        }
        if (put_sub(&out, wire.item, &item))
            goto done;
    }
    res = PyBytes_FromStringAndSize(out.p ? out.p : "", out.n);
done:
    free(out.p);
    free(item.p);
    free(rsn.p);
    release(&sc);
    release(&T);
    return res;
}

PyDoc_STRVAR(reduce_add_doc, "reduce_add(v) -> float: np.add.reduce of a float32 vector, the same bits (tests).");

static PyObject *py_reduce_add(PyObject *self, PyObject *arg)
{
    Buf v;
    if (get_buf(arg, &v, 4, -1, 0, "v"))
        return NULL;
    float s = reduce_add(v.view.buf, v.view.len / 4);
    release(&v);
    return PyFloat_FromDouble((double)s);
}

static PyMethodDef methods[] = {
    {"candidate_rows", (PyCFunction)(void (*)(void))candidate_rows, METH_FASTCALL, candidate_rows_doc},
    {"score_and_pick", (PyCFunction)(void (*)(void))score_and_pick, METH_FASTCALL, score_and_pick_doc},
    {"strong_signals", (PyCFunction)(void (*)(void))strong_signals, METH_FASTCALL, strong_signals_doc},
    {"pick_reasons", (PyCFunction)(void (*)(void))pick_reasons, METH_FASTCALL, pick_reasons_doc},
    {"configure_wire", (PyCFunction)(void (*)(void))configure_wire, METH_FASTCALL, configure_wire_doc},
    {"encode_items", (PyCFunction)(void (*)(void))encode_items, METH_FASTCALL, encode_items_doc},
    {"reduce_add", py_reduce_add, METH_O, reduce_add_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_rankcore", "The Rank path's per-candidate loops (see appliance/ranking/native.py).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__rankcore(void)
{
    return PyModule_Create(&module);
}
