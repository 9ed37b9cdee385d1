/* torchlazy._mtcore: the heavy loops of torchlazy._rng (MT19937 refills and jump-ahead), bytes in, bytes out.
 *
 * No torch headers. Blocks are 624 little-endian u64 words (torch's own layout of the MT state); polynomials over
 * GF(2) are little-endian bit strings (bit i = coefficient of x^i) of 312 u64 words. The characteristic polynomial
 * comes from the caller (its exponents as little-endian u32), so _rng.py stays the one place that holds it.
 * Every function gives the same bits as the pure-Python path of _rng.py; the tests compare the two.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "isa.h"
#include "mt19937.h"

#define DEG 19937                    /* degree of phi */
#define PWORDS 312                   /* u64 words of a reduced polynomial (19968 bits) */
#define SQWORDS (2 * PWORDS)         /* u64 words of its square */
#define MAX_TERMS 512
#define WINDOW_BLOCKS 33             /* ceil((DEG + MT_N - 1) / MT_N) */

static int check_block(const Py_buffer *buf) {
    if (buf->len != 8 * MT_N) {
        PyErr_Format(PyExc_ValueError, "expected a block of %d bytes (624 u64), got %zd", 8 * MT_N, buf->len);
        return -1;
    }
    return 0;
}

/* advance(block, n_blocks) -> block after n_blocks refills */
static PyObject *mt_advance(PyObject *self, PyObject *args) {
    Py_buffer buf;
    long long n;
    uint32_t s[MT_N];
    if (!PyArg_ParseTuple(args, "y*L", &buf, &n)) return NULL;
    if (n < 0) { /* a generator only moves forward (an unchecked -1 would be 2**64 - 1 refills) */
        PyBuffer_Release(&buf);
        PyErr_Format(PyExc_ValueError, "n_blocks must be >= 0, got %lld", n);
        return NULL;
    }
    if (check_block(&buf) < 0) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    load_block(buf.buf, s);
    PyBuffer_Release(&buf);
    Py_BEGIN_ALLOW_THREADS
    for (long long k = 0; k < n; k++) refill(s);
    Py_END_ALLOW_THREADS
    PyObject *out = PyBytes_FromStringAndSize(NULL, 8 * MT_N);
    if (out == NULL) return NULL;
    store_block((unsigned char *)PyBytes_AS_STRING(out), s);
    return out;
}

static uint64_t spread32(uint64_t x) { /* bit i -> bit 2i */
    x &= 0xFFFFFFFFull;
    x = (x | (x << 16)) & 0x0000FFFF0000FFFFull;
    x = (x | (x << 8)) & 0x00FF00FF00FF00FFull;
    x = (x | (x << 4)) & 0x0F0F0F0F0F0F0F0Full;
    x = (x | (x << 2)) & 0x3333333333333333ull;
    x = (x | (x << 1)) & 0x5555555555555555ull;
    return x;
}

static void xor_at(uint64_t *p, long bit, uint64_t w) { /* p ^= w << bit */
    long word = bit >> 6;
    int off = (int)(bit & 63);
    p[word] ^= w << off;
    if (off) p[word + 1] ^= w >> (64 - off);
}

typedef struct {
    int n;            /* terms below the top one */
    int t[MAX_TERMS]; /* their exponents, ascending */
} terms_t;

/* q (SQWORDS words, degree < 2 * DEG) -> q mod phi in its first PWORDS words.
 * Folding one word at a time from the top is safe because every low term is below DEG - 64. */
static void reduce(uint64_t *q, const terms_t *phi) {
    for (long w = SQWORDS - 1; w >= PWORDS; w--) {
        uint64_t v = q[w];
        if (!v) continue;
        q[w] = 0;
        long base = 64 * w - DEG;
        for (int k = 0; k < phi->n; k++) xor_at(q, base + phi->t[k], v);
    }
    int top = DEG - 64 * (PWORDS - 1); /* first bit of word PWORDS-1 at or above x^DEG */
    uint64_t v = q[PWORDS - 1] >> top;
    if (v) {
        q[PWORDS - 1] &= (1ull << top) - 1;
        for (int k = 0; k < phi->n; k++) xor_at(q, phi->t[k], v);
    }
}

static void powmod(unsigned long long d, const terms_t *phi, uint64_t *p) {
    uint64_t q[SQWORDS + 1];
    memset(p, 0, PWORDS * sizeof(uint64_t));
    p[0] = 1;
    int bits = 0;
    while (bits < 64 && (d >> bits)) bits++;
    for (int b = bits - 1; b >= 0; b--) {
        memset(q, 0, sizeof(q));
        for (int i = 0; i < PWORDS; i++) {
            q[2 * i] = spread32(p[i]);
            q[2 * i + 1] = spread32(p[i] >> 32);
        }
        reduce(q, phi);
        if ((d >> b) & 1u) { /* multiply by x */
            for (int i = PWORDS - 1; i > 0; i--) q[i] = (q[i] << 1) | (q[i - 1] >> 63);
            q[0] <<= 1;
            reduce(q, phi);
        }
        memcpy(p, q, PWORDS * sizeof(uint64_t));
    }
}

/* powmod(d, phi_terms) -> x^d mod phi, 312 u64 little-endian */
static PyObject *mt_powmod(PyObject *self, PyObject *args) {
    unsigned long long d;
    Py_buffer tb;
    terms_t phi;
    uint64_t p[PWORDS];
    if (!PyArg_ParseTuple(args, "Ky*", &d, &tb)) return NULL;
    int n = (int)(tb.len / 4);
    if (tb.len % 4 || n < 2 || n > MAX_TERMS) {
        PyBuffer_Release(&tb);
        PyErr_SetString(PyExc_ValueError, "phi_terms: expected 2..512 little-endian u32 exponents");
        return NULL;
    }
    const unsigned char *tp = tb.buf;
    for (int k = 0; k < n; k++)
        phi.t[k] = (int)(tp[4 * k] | (tp[4 * k + 1] << 8) | (tp[4 * k + 2] << 16) | ((uint32_t)tp[4 * k + 3] << 24));
    PyBuffer_Release(&tb);
    if (phi.t[n - 1] != DEG || phi.t[n - 2] > DEG - 65) {
        PyErr_SetString(PyExc_ValueError, "phi_terms: expected ascending exponents ending in 19937, the others < 19873");
        return NULL;
    }
    phi.n = n - 1;
    Py_BEGIN_ALLOW_THREADS
    powmod(d, &phi, p);
    Py_END_ALLOW_THREADS
    PyObject *out = PyBytes_FromStringAndSize(NULL, 8 * PWORDS);
    if (out == NULL) return NULL;
    for (int i = 0; i < PWORDS; i++) store64((unsigned char *)PyBytes_AS_STRING(out) + 8 * i, p[i]);
    return out;
}

/* acc = XOR over the terms x^i of g of the window's words from i on: ~10,000 terms of 624 words, the cost of a jump */
TL_CLONES static void accumulate(const uint64_t *g, const uint32_t *win, uint32_t *acc, int *terms) {
    int n = 0;
    for (int w = 0; w < PWORDS; w++) {
        for (uint64_t v = g[w]; v; v &= v - 1) terms[n++] = 64 * w + __builtin_ctzll(v);
    }
    memset(acc, 0, sizeof(uint32_t) * MT_N);
    int k = 0;
    for (; k + 8 <= n; k += 8) { /* eight windows per pass: an eighth of the loads and stores of acc */
        const uint32_t *a = win + terms[k], *b = win + terms[k + 1], *c = win + terms[k + 2], *d = win + terms[k + 3];
        const uint32_t *e = win + terms[k + 4], *f = win + terms[k + 5], *p = win + terms[k + 6], *q = win + terms[k + 7];
        for (int j = 0; j < MT_N; j++) acc[j] ^= (a[j] ^ b[j]) ^ (c[j] ^ d[j]) ^ (e[j] ^ f[j]) ^ (p[j] ^ q[j]);
    }
    for (; k < n; k++) {
        const uint32_t *a = win + terms[k];
        for (int j = 0; j < MT_N; j++) acc[j] ^= a[j];
    }
}

/* combine(g, block) -> g(T) applied to a generated block: word j is the XOR of x[i + j] over the terms x^i of g */
static PyObject *mt_combine(PyObject *self, PyObject *args) {
    Py_buffer gb, bb;
    uint64_t g[PWORDS];
    uint32_t acc[MT_N];
    if (!PyArg_ParseTuple(args, "y*y*", &gb, &bb)) return NULL;
    if (gb.len != 8 * PWORDS || check_block(&bb) < 0) {
        if (gb.len != 8 * PWORDS) PyErr_Format(PyExc_ValueError, "expected a polynomial of %d bytes", 8 * PWORDS);
        PyBuffer_Release(&gb);
        PyBuffer_Release(&bb);
        return NULL;
    }
    /* the window of generated words, then the exponents of g's terms */
    uint32_t *win = PyMem_RawMalloc(sizeof(uint32_t) * MT_N * WINDOW_BLOCKS + sizeof(int) * 64 * PWORDS);
    if (win == NULL) {
        PyBuffer_Release(&gb);
        PyBuffer_Release(&bb);
        return PyErr_NoMemory();
    }
    for (int i = 0; i < PWORDS; i++) g[i] = load64((const unsigned char *)gb.buf + 8 * i);
    load_block(bb.buf, win);
    PyBuffer_Release(&gb);
    PyBuffer_Release(&bb);
    Py_BEGIN_ALLOW_THREADS
    for (int k = 1; k < WINDOW_BLOCKS; k++) {
        memcpy(win + k * MT_N, win + (k - 1) * MT_N, sizeof(uint32_t) * MT_N);
        refill(win + k * MT_N);
    }
    accumulate(g, win, acc, (int *)(win + MT_N * WINDOW_BLOCKS));
    Py_END_ALLOW_THREADS
    PyMem_RawFree(win);
    PyObject *out = PyBytes_FromStringAndSize(NULL, 8 * MT_N);
    if (out == NULL) return NULL;
    store_block((unsigned char *)PyBytes_AS_STRING(out), acc);
    return out;
}

static PyMethodDef methods[] = {
    {"advance", mt_advance, METH_VARARGS, "advance(block, n_blocks) -> the block after n_blocks MT19937 refills"},
    {"powmod", mt_powmod, METH_VARARGS, "powmod(d, phi_terms) -> x^d mod phi as 312 little-endian u64"},
    {"combine", mt_combine, METH_VARARGS, "combine(g, block) -> g(T) applied to a generated block"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_mtcore", "MT19937 jump-ahead core of torchlazy._rng",
                                    -1, methods};

PyMODINIT_FUNC PyInit__mtcore(void) { return PyModule_Create(&module); }
