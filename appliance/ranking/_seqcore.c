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

typedef struct {
    Py_buffer view;
    int held;
} Buf;

static int get_buf(PyObject *obj, Buf *b, Py_ssize_t itemsize, int writable, const char *name)
{
    b->held = 0;
    if (PyObject_GetBuffer(obj, &b->view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0) {
        PyErr_Format(PyExc_TypeError, "%s: a C-contiguous%s buffer expected", name, writable ? " writable" : "");
        return -1;
    }
    b->held = 1;
    if (b->view.len % itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, not a whole number of %zd-byte items", name,
                     b->view.len, itemsize);
        return -1;
    }
    return 0;
}

static void release(Buf *b)
{
    if (b->held) {
        PyBuffer_Release(&b->view);
        b->held = 0;
    }
}

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

/* y[n, dout] = x[n, din] @ W[din, dout] + b. Register-blocked: two rows x 32 columns of y stay in
 * registers for the whole sum over din (each W row is read once per row pair, y is written once); the
 * naive loop reloaded and stored y for every term and ran at a quarter of this speed. */
#define SC_JB 32
SC_INLINE void linear(const float *x, int n, int din, const float *W, const float *b, int dout, float *y)
{
    int j0 = 0;
    for (; j0 + SC_JB <= dout; j0 += SC_JB) {
        int i = 0;
        for (; i + 2 <= n; i += 2) {
            float a0[SC_JB], a1[SC_JB];
            const float *x0 = x + (size_t)i * din, *x1 = x0 + din;
            for (int j = 0; j < SC_JB; j++)
                a0[j] = a1[j] = b[j0 + j];
            for (int k = 0; k < din; k++) {
                const float *wk = W + (size_t)k * dout + j0, u = x0[k], v = x1[k];
                for (int j = 0; j < SC_JB; j++) {
                    a0[j] += u * wk[j];
                    a1[j] += v * wk[j];
                }
            }
            memcpy(y + (size_t)i * dout + j0, a0, sizeof a0);
            memcpy(y + (size_t)(i + 1) * dout + j0, a1, sizeof a1);
        }
        for (; i < n; i++) {
            float a0[SC_JB];
            const float *x0 = x + (size_t)i * din;
            for (int j = 0; j < SC_JB; j++)
                a0[j] = b[j0 + j];
            for (int k = 0; k < din; k++) {
                const float *wk = W + (size_t)k * dout + j0, u = x0[k];
                for (int j = 0; j < SC_JB; j++)
                    a0[j] += u * wk[j];
            }
            memcpy(y + (size_t)i * dout + j0, a0, sizeof a0);
        }
    }
    for (int i = 0; i < n && j0 < dout; i++) {  /* the columns past the last whole block */
        float *yi = y + (size_t)i * dout;
        for (int j = j0; j < dout; j++) {
            float s = b[j];
            for (int k = 0; k < din; k++)
                s += x[(size_t)i * din + k] * W[(size_t)k * dout + j];
            yi[j] = s;
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

/* The forward pass into out[d]; scratch: (5 n + 3) d + n floats. */
SC_CLONES static void forward(const Pass *p, float *scratch, float *out)
{
    const int n = p->n, d = p->d, dh = d / p->heads;
    size_t off[N_PARTS + 1];
    block_offsets(d, off);
    float *x = scratch, *qkv = x + (size_t)n * d, *h = qkv + (size_t)n * 3 * d, *att = h + (size_t)n * d;
    float *y = att + n, *t = y + d, *u = t + d;
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
        for (int i = 0; i < n; i++)
            layer_norm(x + (size_t)i * d, h + (size_t)i * d, d, w + off[LN1W], w + off[LN1B], p->eps);
        linear(h, n, d, w + off[QKVW], w + off[QKVB], 3 * d, qkv);
        for (int i = r0; i < n; i++) {
            float *xi = x + (size_t)i * d;
            for (int hh = 0; hh < p->heads; hh++) {
                const float *q = qkv + (size_t)i * 3 * d + hh * dh;
                float mx = -INFINITY, sum = 0.0f;
                for (int j = 0; j < n; j++) {  /* causal, padding masked, a position always sees itself */
                    if (!((j <= i && p->idx[j] > 0) || j == i)) {
                        att[j] = -INFINITY;
                        continue;
                    }
                    const float *kj = qkv + (size_t)j * 3 * d + d + hh * dh;
                    float s = 0.0f;
                    for (int c = 0; c < dh; c++)
                        s += q[c] * kj[c];
                    att[j] = s * att_scale;
                    if (att[j] > mx)
                        mx = att[j];
                }
                for (int j = 0; j < n; j++) {
                    att[j] = att[j] == -INFINITY ? 0.0f : expf(att[j] - mx);
                    sum += att[j];
                }
                float *yh = y + hh * dh;
                for (int c = 0; c < dh; c++)
                    yh[c] = 0.0f;
                for (int j = 0; j < n; j++) {
                    if (att[j] == 0.0f)
                        continue;
                    const float a = att[j] / sum, *vj = qkv + (size_t)j * 3 * d + 2 * d + hh * dh;
                    for (int c = 0; c < dh; c++)
                        yh[c] += a * vj[c];
                }
            }
            linear(y, 1, d, w + off[PROJW], w + off[PROJB], d, t);  /* attention out: residual */
            for (int k = 0; k < d; k++)
                t[k] += xi[k];
            layer_norm(t, u, d, w + off[LN2W], w + off[LN2B], p->eps);  /* feed-forward: residual */
            linear(u, 1, d, w + off[FF0W], w + off[FF0B], d, y);
            for (int k = 0; k < d; k++)
                y[k] = 0.5f * y[k] * (1.0f + erff(y[k] * 0.70710678118654752f));
            linear(y, 1, d, w + off[FF3W], w + off[FF3B], d, u);
            const float keep = p->idx[i] > 0 ? 1.0f : 0.0f;
            for (int k = 0; k < d; k++)  /* x[i] is read by no later row of this block: qkv holds k, v */
                xi[k] = (t[k] + u[k]) * keep;
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
    if (get_buf(args[0], &item, 4, 0, "item") || get_buf(args[1], &pos, 4, 0, "pos") ||
        get_buf(args[2], &blocks, 4, 0, "blocks") || get_buf(args[3], &fln, 4, 0, "final_ln") ||
        get_buf(args[4], &idx, 8, 0, "idx") || get_buf(args[5], &out, 4, 1, "out"))
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
    float *scratch = malloc(sizeof(float) * ((size_t)(5 * n + 3) * d + n));
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
