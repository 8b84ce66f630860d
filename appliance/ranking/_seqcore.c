/* The sequence encoder's query for one history in C: seqmodel.SASRec's forward pass (the numpy one is
 * sequence_numpy.NumpySasrec._forward), for the real positions only and, in the last block, the newest one.
 *
 * Why: the ranker encodes a household's history on every event batch (so the next Rank finds its query
 * ready). As numpy that is ~60 small array calls, each holding the GIL, and under a 64-client load they
 * queued the gRPC threads behind them (Rank p99 went up 4x where ONNX Runtime, which releases the GIL,
 * did not). Here it is one call that releases the GIL for the whole pass. No numpy C API: arrays come in
 * through the buffer protocol (the caller allocates the output). Sums are sequential float32 where numpy
 * and ONNX Runtime use their own orders, and GELU uses libm's erff: the query agrees with ONNX Runtime's
 * to ~1e-6 (the bundle's parity tolerance is 1e-4; tests/ranking/test_sequence_numpy.py holds them).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_buffers.h"

/* AVX2 + FMA where the CPU has them (chosen at load time); the helpers are inlined into each clone. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SC_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SC_CLONES
#endif
#define SC_INLINE static inline __attribute__((always_inline))

/* y = LayerNorm(x) * w + b over d values */
SC_INLINE void layer_norm(const float *x, float *y, int d, const float *w, const float *b, float eps)
{
    float m = 0.0f, v = 0.0f;
    for (int k = 0; k < d; k++)
        m += x[k];
    m /= (float)d;
    for (int k = 0; k < d; k++) {
        float c = x[k] - m;
        v += c * c;
    }
    float r = 1.0f / sqrtf(v / (float)d + eps);
    for (int k = 0; k < d; k++)
        y[k] = (x[k] - m) * r * w[k] + b[k];
}

/* y[n, dout] = x[n, din] @ W[din, dout] + b (b NULL: no bias), with the rows of x, W and y ldx, ldw and
 * ldy floats apart (column ranges of wider matrices). Register-blocked with GCC/Clang vector types: two rows x 32 columns of y stay in
 * eight 8-float registers for the whole sum over din (each W row is read once per row pair, y is written
 * once); the naive loop reloaded and stored y for every term and ran at a quarter of this speed. */
typedef float v8 __attribute__((vector_size(32)));

SC_INLINE v8 load8(const float *p)
{
    v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

SC_INLINE void linear(const float *x, int ldx, int n, int din, const float *W, int ldw, const float *b,
                      int dout, float *y, int ldy)
{
    int j0 = 0;
    const v8 zero = {0};
    for (; j0 + 32 <= dout; j0 += 32) {
        const v8 b0 = b ? load8(b + j0) : zero, b1 = b ? load8(b + j0 + 8) : zero;
        const v8 b2 = b ? load8(b + j0 + 16) : zero, b3 = b ? load8(b + j0 + 24) : zero;
        int i = 0;
        for (; i + 2 <= n; i += 2) {
            v8 a0 = b0, a1 = b1, a2 = b2, a3 = b3, c0 = b0, c1 = b1, c2 = b2, c3 = b3;
            const float *x0 = x + (size_t)i * ldx, *x1 = x0 + ldx;
            for (int k = 0; k < din; k++) {
                const float *wk = W + (size_t)k * ldw + j0;
                const v8 w0 = load8(wk), w1 = load8(wk + 8), w2 = load8(wk + 16), w3 = load8(wk + 24);
                const float u = x0[k], v = x1[k];
                a0 += u * w0; a1 += u * w1; a2 += u * w2; a3 += u * w3;
                c0 += v * w0; c1 += v * w1; c2 += v * w2; c3 += v * w3;
            }
            float *y0 = y + (size_t)i * ldy + j0, *y1 = y0 + ldy;
            memcpy(y0, &a0, 32); memcpy(y0 + 8, &a1, 32); memcpy(y0 + 16, &a2, 32); memcpy(y0 + 24, &a3, 32);
            memcpy(y1, &c0, 32); memcpy(y1 + 8, &c1, 32); memcpy(y1 + 16, &c2, 32); memcpy(y1 + 24, &c3, 32);
        }
        for (; i < n; i++) {
            v8 a0 = b0, a1 = b1, a2 = b2, a3 = b3;
            const float *x0 = x + (size_t)i * ldx;
            for (int k = 0; k < din; k++) {
                const float *wk = W + (size_t)k * ldw + j0, u = x0[k];
                a0 += u * load8(wk); a1 += u * load8(wk + 8); a2 += u * load8(wk + 16); a3 += u * load8(wk + 24);
            }
            float *y0 = y + (size_t)i * ldy + j0;
            memcpy(y0, &a0, 32); memcpy(y0 + 8, &a1, 32); memcpy(y0 + 16, &a2, 32); memcpy(y0 + 24, &a3, 32);
        }
    }
    for (int i = 0; i < n && j0 < dout; i++) {  /* the columns past the last whole block */
        for (int j = j0; j < dout; j++) {
            float acc = b ? b[j] : 0.0f;
            for (int k = 0; k < din; k++)
                acc += x[(size_t)i * ldx + k] * W[(size_t)k * ldw + j];
            y[(size_t)i * ldy + j] = acc;
        }
    }
}

/* One block's parameters, packed in this order by sequence_numpy.NumpySasrec (floats). */
enum { LN1W, LN1B, QKVW, QKVB, PROJW, PROJB, LN2W, LN2B, FF0W, FF0B, FF3W, FF3B, N_PARTS };

SC_INLINE void block_offsets(int d, size_t off[N_PARTS + 1])
{
    const size_t len[N_PARTS] = {d, d, (size_t)d * 3 * d, 3 * (size_t)d, (size_t)d * d, d, d, d,
                                 (size_t)d * d, d, (size_t)d * d, d};
    off[0] = 0;
    for (int p = 0; p < N_PARTS; p++)
        off[p + 1] = off[p] + len[p];
}

typedef struct {
    const float *item, *pos, *blocks, *final_ln;
    const int64_t *idx;
    int n, d, heads, n_blocks, max_len;
    float eps;
} Pass;

/* The forward pass into out[d]; scratch: 7 n d + n floats. Each block works on whole matrices (its
 * query rows r0..n-1 at once), so every product is one register-blocked `linear`. */
SC_CLONES static void forward(const Pass *p, float *scratch, float *out)
{
    const int n = p->n, d = p->d, dh = d / p->heads, d3 = 3 * d;
    size_t off[N_PARTS + 1];
    block_offsets(d, off);
    float *x = scratch, *qkv = x + (size_t)n * d, *h = qkv + (size_t)n * d3, *y = h + (size_t)n * d;
    float *t = y + (size_t)n * d, *att = t + (size_t)n * d;
    const float scale = sqrtf((float)d), att_scale = 1.0f / sqrtf((float)dh);
    for (int i = 0; i < n; i++) {
        const float keep = p->idx[i] > 0 ? 1.0f : 0.0f;
        const float *e = p->item + (size_t)p->idx[i] * d, *ps = p->pos + (size_t)(p->max_len - n + i) * d;
        for (int k = 0; k < d; k++)
            x[(size_t)i * d + k] = (e[k] * scale + ps[k]) * keep;
    }
    for (int b = 0; b < p->n_blocks; b++) {
        const float *w = p->blocks + (size_t)b * off[N_PARTS];
        const int r0 = b == p->n_blocks - 1 ? n - 1 : 0;  /* the last block: the newest position only */
        const int m = n - r0;                               /* query rows */
        for (int i = 0; i < n; i++)
            layer_norm(x + (size_t)i * d, h + (size_t)i * d, d, w + off[LN1W], w + off[LN1B], p->eps);
        /* keys and values of every position; queries of the query rows only */
        linear(h, d, n, d, w + off[QKVW] + d, d3, w + off[QKVB] + d, 2 * d, qkv + d, d3);
        linear(h + (size_t)r0 * d, d, m, d, w + off[QKVW], d3, w + off[QKVB], d, qkv + (size_t)r0 * d3, d3);
        for (int i = r0; i < n; i++) {
            for (int hh = 0; hh < p->heads; hh++) {
                const float *q = qkv + (size_t)i * d3 + hh * dh;
                float mx = -INFINITY, sum = 0.0f;
                for (int j = 0; j < n; j++) {  /* causal, padding masked, a position always sees itself */
                    if (!((j <= i && p->idx[j] > 0) || j == i)) {
                        att[j] = -INFINITY;
                        continue;
                    }
                    const float *kj = qkv + (size_t)j * d3 + d + hh * dh;
                    float sc = 0.0f;
                    for (int c = 0; c < dh; c++)
                        sc += q[c] * kj[c];
                    att[j] = sc * att_scale;
                    if (att[j] > mx)
                        mx = att[j];
                }
                for (int j = 0; j < n; j++) {
                    att[j] = att[j] == -INFINITY ? 0.0f : expf(att[j] - mx);
                    sum += att[j];
                }
                float *yh = y + (size_t)(i - r0) * d + hh * dh;
                for (int c = 0; c < dh; c++)
                    yh[c] = 0.0f;
                for (int j = 0; j < n; j++) {
                    if (att[j] == 0.0f)
                        continue;
                    const float a = att[j] / sum, *vj = qkv + (size_t)j * d3 + 2 * d + hh * dh;
                    for (int c = 0; c < dh; c++)
                        yh[c] += a * vj[c];
                }
            }
        }
        linear(y, d, m, d, w + off[PROJW], d, w + off[PROJB], d, t, d);  /* attention out, + residual */
        for (int i = 0; i < m; i++)
            for (int k = 0; k < d; k++)
                t[(size_t)i * d + k] += x[(size_t)(r0 + i) * d + k];
        for (int i = 0; i < m; i++)                                  /* feed-forward, + residual */
            layer_norm(t + (size_t)i * d, h + (size_t)i * d, d, w + off[LN2W], w + off[LN2B], p->eps);
        linear(h, d, m, d, w + off[FF0W], d, w + off[FF0B], d, y, d);
        for (size_t k = 0; k < (size_t)m * d; k++)
            y[k] = 0.5f * y[k] * (1.0f + erff(y[k] * 0.70710678118654752f));
        linear(y, d, m, d, w + off[FF3W], d, w + off[FF3B], d, h, d);
        for (int i = 0; i < m; i++) {
            const float keep = p->idx[r0 + i] > 0 ? 1.0f : 0.0f;
            for (int k = 0; k < d; k++)
                x[(size_t)(r0 + i) * d + k] = (t[(size_t)i * d + k] + h[(size_t)i * d + k]) * keep;
        }
    }
    layer_norm(x + (size_t)(n - 1) * d, out, d, p->final_ln, p->final_ln + d, p->eps);
}

PyDoc_STRVAR(query_doc,
"query(item, pos, blocks, final_ln, idx, out, heads, eps)\n\n"
"The SASRec query after the history idx (int64, catalog row + 1 each, 0 = padding, newest last, 1..max_len\n"
"of them) into out (float32 [d], writable). item: float32 [n_items + 1, d]; pos: float32 [max_len, d];\n"
"blocks: float32, each block's parameters packed (LN1 w, b; QKV W [d, 3d], b; proj W, b; LN2 w, b;\n"
"FF0 W, b; FF3 W, b; W as x @ W); final_ln: float32 [2 d] (w then b). The GIL is released.");

static PyObject *query(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Buf item, pos, blocks, fln, idx, out;
    PyObject *res = NULL;
    item.held = pos.held = blocks.held = fln.held = idx.held = out.held = 0;
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "query takes 8 arguments");
        return NULL;
    }
    long heads = PyLong_AsLong(args[6]);
    double eps = PyFloat_AsDouble(args[7]);
    if (PyErr_Occurred())
        return NULL;
    if (get_buf(args[0], &item, 4, -1, 0, "item") || get_buf(args[1], &pos, 4, -1, 0, "pos") ||
        get_buf(args[2], &blocks, 4, -1, 0, "blocks") || get_buf(args[3], &fln, 4, -1, 0, "final_ln") ||
        get_buf(args[4], &idx, 8, -1, 0, "idx") || get_buf(args[5], &out, 4, -1, 1, "out"))
        goto done;
    Py_ssize_t d = out.view.len / 4, n = idx.view.len / 8;
    if (d < 1 || d > 4096 || heads < 1 || d % heads) {
        PyErr_Format(PyExc_ValueError, "d = %zd (out's length) must be 1..4096 and a multiple of heads = %ld",
                     d, heads);
        goto done;
    }
    size_t off[N_PARTS + 1];
    block_offsets((int)d, off);
    Py_ssize_t n_rows = item.view.len / 4 / d, max_len = pos.view.len / 4 / d;
    if (item.view.len != n_rows * d * 4 || pos.view.len != max_len * d * 4 || fln.view.len != 2 * d * 4 ||
        blocks.view.len == 0 || (size_t)(blocks.view.len / 4) % off[N_PARTS]) {
        PyErr_SetString(PyExc_ValueError, "item, pos, blocks or final_ln: not a whole number of d-wide parts");
        goto done;
    }
    if (n < 1 || n > max_len) {
        PyErr_Format(PyExc_ValueError, "idx: %zd positions, expected 1..%zd", n, max_len);
        goto done;
    }
    const int64_t *ix = idx.view.buf;
    for (Py_ssize_t i = 0; i < n; i++)
        if (ix[i] < 0 || ix[i] >= n_rows) {
            PyErr_Format(PyExc_IndexError, "idx[%zd] = %lld outside 0..%zd", i, (long long)ix[i], n_rows - 1);
            goto done;
        }
    Pass p = {item.view.buf, pos.view.buf, blocks.view.buf, fln.view.buf, ix, (int)n, (int)d, (int)heads,
              (int)((size_t)(blocks.view.len / 4) / off[N_PARTS]), (int)max_len, (float)eps};
    float *scratch = malloc(sizeof(float) * ((size_t)7 * n * d + n));
    if (!scratch) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    forward(&p, scratch, out.view.buf);
    Py_END_ALLOW_THREADS
    free(scratch);
    res = Py_NewRef(Py_None);
done:
    release(&item); release(&pos); release(&blocks); release(&fln); release(&idx); release(&out);
    return res;
}

static PyMethodDef methods[] = {
    {"query", (PyCFunction)(void (*)(void))query, METH_FASTCALL, query_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_seqcore", "The sequence encoder's query in C (see appliance/ranking/sequence_numpy.py).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__seqcore(void)
{
    return PyModule_Create(&module);
}
