/* The buffer-protocol helpers the C modules of appliance/ranking share (_rankcore.c, _seqcore.c): arrays
 * come in as C-contiguous buffers (no numpy C API), each checked for its item size and count, and released
 * on every path out. Header-only (static functions): each module is its own translation unit. */
#ifndef APPLIANCE_RANKING_BUFFERS_H
#define APPLIANCE_RANKING_BUFFERS_H

#include <Python.h>  /* the including file defines PY_SSIZE_T_CLEAN before its own Python.h */

typedef struct {
    Py_buffer view;
    int held;
} Buf;

/* A C-contiguous buffer of `count` items of `itemsize` bytes (count < 0: any multiple of itemsize). */
static int get_buf(PyObject *obj, Buf *b, Py_ssize_t itemsize, Py_ssize_t count, int writable, const char *name)
{
    b->held = 0;
    if (PyObject_GetBuffer(obj, &b->view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0) {
        PyErr_Format(PyExc_TypeError, "%s: a C-contiguous%s buffer expected", name, writable ? " writable" : "");
        return -1;
    }
    b->held = 1;
    if (b->view.len % itemsize || (count >= 0 && b->view.len != count * itemsize)) {
        if (count >= 0)
            PyErr_Format(PyExc_ValueError, "%s: %zd bytes, expected %zd items of %zd bytes", name, b->view.len,
                         count, itemsize);
        else
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

#endif
