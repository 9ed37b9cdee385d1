/* torchlazy._drawcore: torch's CPU float32 `uniform_` and `normal_` kernels, bit for bit, from a generator state.
 *
 * No torch headers. A state is the 5,056 bytes of `torch.Generator.get_state()` (see torchlazy._rng): a head
 * (u64 seed, i32 left, i32 seeded, u64 next) then the MT19937 block as 624 little-endian u64. Each function fills
 * `n` float32 at a caller-given address exactly as torch's kernel would from that state, and returns the state
 * torch would hold afterwards.
 *
 * The arithmetic follows torch's kernels operation by operation, fused multiply-adds included (torch's kernels are
 * compiled with FMA contraction; every FMA here is written out, and the file is compiled with contraction off so
 * the compiler adds none): `uniform_` is fma(u, to - from, from) with u the low 24 bits of a word times 2^-24
 * (a value that rounds to `to` becomes `from`);
 * `normal_` (n >= 16) fills the tensor with such uniforms, then turns each block of 16 into 8 Box-Muller pairs with
 * 8-lane Cephes-style log and sincos polynomials (the AVX2 kernel torch runs on x86-64), and redraws the last 16
 * when n is not a multiple of 16. Nothing here asks the caller to trust it: torchlazy._drawkernels compares these
 * functions with torch's own kernels before it uses them, and the tests compare them over millions of values.
 *
 * Only x86-64 with AVX2 and FMA has these kernels (`available()`); elsewhere torchlazy runs torch's kernels.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "mt19937.h"
#include "prefault.h"

#define STATE_BYTES 5056
#define BLOCK_AT 24

typedef struct {
    uint32_t s[MT_N];
    int64_t next; /* index of the next word served from s */
    int32_t left; /* torch's counter: left - 1 words remain before a refill (625 - next after one) */
} gen_t;

static void gen_load(gen_t *g, const unsigned char *state) {
    int32_t left;
    memcpy(&left, state + 8, 4);
    g->left = left;
    g->next = (int64_t)load64(state + 16);
    load_block(state + BLOCK_AT, g->s);
}

static void gen_store(const gen_t *g, unsigned char *state) {
    memcpy(state + 8, &g->left, 4);
    store64(state + 16, (uint64_t)g->next);
    store_block(state + BLOCK_AT, g->s);
}

/* Words the block still serves before torch refills it; refill first when none. */
static int64_t gen_ready(gen_t *g) {
    int64_t ready = g->left - 1;
    if (ready <= 0) {
        refill(g->s);
        g->next = 0;
        g->left = MT_N + 1;
        ready = MT_N;
    }
    return ready;
}

static void gen_take(gen_t *g, int64_t k) {
    g->next += k;
    g->left -= (int32_t)k;
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define HAVE_KERNELS 1
#include <immintrin.h>

#define AVX2 __attribute__((target("avx2,fma")))

static int cpu_ok(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/* u = (temper(word) & (2^24 - 1)) * 2^-24, then v = fma(u, scale, shift), for k words of the block; torch maps
 * a v that rounded up to `top` back to `shift` (values stay in [from, to)). */
AVX2 static void uniforms(const uint32_t *w, float *out, int64_t k, float scale, float shift, float top) {
    const __m256i low24 = _mm256_set1_epi32(0xFFFFFF);
    const __m256 unit = _mm256_set1_ps(0x1p-24f), sc = _mm256_set1_ps(scale), sh = _mm256_set1_ps(shift);
    const __m256 tp = _mm256_set1_ps(top);
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
        __m256i y = _mm256_loadu_si256((const __m256i *)(w + i));
        y = _mm256_xor_si256(y, _mm256_srli_epi32(y, 11));
        y = _mm256_xor_si256(y, _mm256_and_si256(_mm256_slli_epi32(y, 7), _mm256_set1_epi32((int)0x9d2c5680u)));
        y = _mm256_xor_si256(y, _mm256_and_si256(_mm256_slli_epi32(y, 15), _mm256_set1_epi32((int)0xefc60000u)));
        y = _mm256_xor_si256(y, _mm256_srli_epi32(y, 18));
        __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(y, low24)), unit);
        const __m256 v = _mm256_fmadd_ps(u, sc, sh);
        _mm256_storeu_ps(out + i, _mm256_blendv_ps(v, sh, _mm256_cmp_ps(v, tp, _CMP_EQ_OQ)));
    }
    for (; i < k; i++) {
        uint32_t y = w[i];
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c5680u;
        y ^= (y << 15) & 0xefc60000u;
        y ^= y >> 18;
        const float v = fmaf((float)(y & 0xFFFFFFu) * 0x1p-24f, scale, shift);
        out[i] = v == top ? shift : v;
    }
}

/* n uniforms from the generator, as torch's uniform_real_distribution<float>(from, to) serves them. */
AVX2 static void draw_uniforms(gen_t *g, float *out, int64_t n, float from, float to) {
    while (n > 0) {
        int64_t k = gen_ready(g);
        if (k > n) k = n;
        uniforms(g->s + g->next, out, k, to - from, from, to);
        gen_take(g, k);
        out += k;
        n -= k;
    }
}

#define PS(v) _mm256_set1_ps(v)

/* log(x) for x in (0, 1], Cephes polynomial, torch's operation order and fusions. */
AVX2 static __m256 log8(__m256 x) {
    const __m256 one = PS(1.0f);
    const __m256 invalid = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LE_OS);
    x = _mm256_max_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x00800000)));
    __m256i ei = _mm256_srli_epi32(_mm256_castps_si256(x), 23);
    x = _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(~0x7f800000)));
    x = _mm256_or_ps(x, PS(0.5f));
    ei = _mm256_sub_epi32(ei, _mm256_set1_epi32(0x7f));
    __m256 e = _mm256_add_ps(_mm256_cvtepi32_ps(ei), one);
    const __m256 below = _mm256_cmp_ps(x, PS(0.707106781186547524f), _CMP_LT_OS);
    const __m256 tmp = _mm256_and_ps(x, below);
    x = _mm256_sub_ps(x, one);
    e = _mm256_sub_ps(e, _mm256_and_ps(one, below));
    x = _mm256_add_ps(x, tmp);
    const __m256 z = _mm256_mul_ps(x, x);
    __m256 y = PS(7.0376836292E-2f);
    y = _mm256_fmadd_ps(y, x, PS(-1.1514610310E-1f));
    y = _mm256_fmadd_ps(y, x, PS(1.1676998740E-1f));
    y = _mm256_fmadd_ps(y, x, PS(-1.2420140846E-1f));
    y = _mm256_fmadd_ps(y, x, PS(1.4249322787E-1f));
    y = _mm256_fmadd_ps(y, x, PS(-1.6668057665E-1f));
    y = _mm256_fmadd_ps(y, x, PS(2.0000714765E-1f));
    y = _mm256_fmadd_ps(y, x, PS(-2.4999993993E-1f));
    y = _mm256_fmadd_ps(y, x, PS(3.3333331174E-1f));
    y = _mm256_mul_ps(y, x);
    y = _mm256_fmadd_ps(y, z, _mm256_mul_ps(e, PS(-2.12194440e-4f)));
    y = _mm256_fnmadd_ps(z, PS(0.5f), y);
    x = _mm256_add_ps(x, y);
    x = _mm256_fmadd_ps(e, PS(0.693359375f), x);
    return _mm256_or_ps(x, invalid);
}

/* sin and cos of x >= 0, Cephes polynomials over octants, torch's operation order and fusions. */
AVX2 static void sincos8(__m256 x, __m256 *s, __m256 *c) {
    const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u));
    __m256 sign_sin = _mm256_and_ps(x, sign);
    x = _mm256_andnot_ps(sign, x);
    __m256i j = _mm256_cvttps_epi32(_mm256_mul_ps(x, PS(1.27323954473516f)));
    j = _mm256_and_si256(_mm256_add_epi32(j, _mm256_set1_epi32(1)), _mm256_set1_epi32(~1));
    const __m256 y = _mm256_cvtepi32_ps(j);
    const __m256 swap = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(j, _mm256_set1_epi32(4)), 29));
    const __m256 poly = _mm256_castsi256_ps(
        _mm256_cmpeq_epi32(_mm256_and_si256(j, _mm256_set1_epi32(2)), _mm256_setzero_si256()));
    x = _mm256_fmadd_ps(y, PS(-0.78515625f), x);
    x = _mm256_fmadd_ps(y, PS(-2.4187564849853515625e-4f), x);
    x = _mm256_fmadd_ps(y, PS(-3.77489497744594108e-8f), x);
    const __m256 sign_cos = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_andnot_si256(_mm256_sub_epi32(j, _mm256_set1_epi32(2)), _mm256_set1_epi32(4)), 29));
    sign_sin = _mm256_xor_ps(sign_sin, swap);
    const __m256 z = _mm256_mul_ps(x, x);
    __m256 yc = _mm256_fmadd_ps(PS(2.443315711809948E-005f), z, PS(-1.388731625493765E-003f));
    yc = _mm256_fmadd_ps(yc, z, PS(4.166664568298827E-002f));
    yc = _mm256_mul_ps(yc, z);
    yc = _mm256_fmsub_ps(yc, z, _mm256_mul_ps(z, PS(0.5f)));
    yc = _mm256_add_ps(yc, PS(1.0f));
    __m256 ys = _mm256_fmadd_ps(PS(-1.9515295891E-4f), z, PS(8.3321608736E-3f));
    ys = _mm256_fmadd_ps(ys, z, PS(-1.6666654611E-1f));
    ys = _mm256_mul_ps(ys, z);
    ys = _mm256_fmadd_ps(ys, x, x);
    /* select, as torch does: with masked parts and subtractions (these decide the sign of a zero) */
    const __m256 sin_s = _mm256_and_ps(poly, ys), sin_c = _mm256_andnot_ps(poly, yc);
    *s = _mm256_xor_ps(_mm256_add_ps(sin_c, sin_s), sign_sin);
    *c = _mm256_xor_ps(_mm256_add_ps(_mm256_sub_ps(yc, sin_c), _mm256_sub_ps(ys, sin_s)), sign_cos);
}

/* One block of 16 uniforms -> 16 normals: u1 = 1 - data[0:8], u2 = data[8:16]. */
AVX2 static void box_muller16(float *data, __m256 mean, __m256 std) {
    const __m256 u1 = _mm256_sub_ps(PS(1.0f), _mm256_loadu_ps(data));
    const __m256 u2 = _mm256_loadu_ps(data + 8);
    const __m256 radius = _mm256_sqrt_ps(_mm256_mul_ps(PS(-2.0f), log8(u1)));
    __m256 s, c;
    sincos8(_mm256_mul_ps(PS((float)(2.0 * 3.14159265358979323846)), u2), &s, &c);
    _mm256_storeu_ps(data, _mm256_fmadd_ps(_mm256_mul_ps(radius, c), std, mean));
    _mm256_storeu_ps(data + 8, _mm256_fmadd_ps(_mm256_mul_ps(radius, s), std, mean));
}

#define SLAB 4096 /* uniforms made, then transformed while still in cache */

AVX2 static void draw_normals(gen_t *g, float *out, int64_t n, float mean, float std) {
    const __m256 m = PS(mean), sd = PS(std);
    const int64_t whole = n / 16 * 16;
    for (int64_t at = 0; at < n; at += SLAB) {
        const int64_t k = n - at < SLAB ? n - at : SLAB;
        draw_uniforms(g, out + at, k, 0.0f, 1.0f);
        for (int64_t b = at; b + 16 <= at + k && b + 16 <= whole; b += 16) box_muller16(out + b, m, sd);
    }
    if (n != whole) { /* the ragged end: torch redraws the last 16 and transforms them once more */
        draw_uniforms(g, out + n - 16, 16, 0.0f, 1.0f);
        box_muller16(out + n - 16, m, sd);
    }
}
#else
#define HAVE_KERNELS 0
#endif

static int kernels_ok(void) {
#if HAVE_KERNELS
    static int known = -1;
    if (known < 0) known = cpu_ok();
    return known;
#else
    return 0;
#endif
}

/* kind(state, address, n, a, b) -> state after; the caller guarantees `n` float32 writable at `address`. */
static PyObject *draw(PyObject *args, int normal) {
    Py_buffer buf;
    unsigned long long addr;
    Py_ssize_t n;
    float a, b;
    if (!PyArg_ParseTuple(args, "y*Knff", &buf, &addr, &n, &a, &b)) return NULL;
    if (buf.len != STATE_BYTES || n < 0 || (normal && n < 16)) {
        PyErr_Format(PyExc_ValueError, "expected a %d-byte generator state and n >= %d, got %zd bytes and n=%zd",
                     STATE_BYTES, normal ? 16 : 0, buf.len, n);
        PyBuffer_Release(&buf);
        return NULL;
    }
    if (!kernels_ok()) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_RuntimeError, "this CPU has no AVX2/FMA: use torch's kernels");
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(buf.buf, STATE_BYTES);
    PyBuffer_Release(&buf);
    if (out == NULL) return NULL;
#if HAVE_KERNELS
    gen_t g;
    unsigned char *state = (unsigned char *)PyBytes_AS_STRING(out);
    gen_load(&g, state);
    if (g.left < 1 || g.next < 0 || g.next + g.left - 1 > MT_N) {
        Py_DECREF(out);
        PyErr_Format(PyExc_ValueError, "not a consistent MT19937 state: next=%lld, left=%d", (long long)g.next,
                     (int)g.left);
        return NULL;
    }
    float *data = (float *)(uintptr_t)addr;
    Py_BEGIN_ALLOW_THREADS
    prefault((char *)data, (size_t)n * sizeof(float));
    if (normal)
        draw_normals(&g, data, n, a, b);
    else
        draw_uniforms(&g, data, n, a, b);
    Py_END_ALLOW_THREADS
    gen_store(&g, state);
#else
    (void)addr, (void)a, (void)b;
#endif
    return out;
}

static PyObject *py_uniform(PyObject *self, PyObject *args) { return draw(args, 0); }
static PyObject *py_normal(PyObject *self, PyObject *args) { return draw(args, 1); }
static PyObject *py_available(PyObject *self, PyObject *args) { return PyBool_FromLong(kernels_ok()); }

static PyMethodDef methods[] = {
    {"uniform_f32", py_uniform, METH_VARARGS, "uniform_f32(state, address, n, from, to) -> state after"},
    {"normal_f32", py_normal, METH_VARARGS, "normal_f32(state, address, n, mean, std) -> state after (n >= 16)"},
    {"available", py_available, METH_NOARGS, "available() -> whether this CPU runs these kernels"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_drawcore",
                                    "torch's CPU float32 uniform_ and normal_ kernels, bit for bit", -1, methods};

PyMODINIT_FUNC PyInit__drawcore(void) { return PyModule_Create(&module); }
