/* torchlazy._countercore: the compiled path of torchlazy._counter.
 *
 * Fills a raw buffer (an address from `tensor.data_ptr()`, no torch headers)
 * with elements [start, start + count) of a counter-based random stream:
 * Philox-4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy
 * as 1, 2, 3", SC11) keyed by two 64-bit integers.  Element i is a pure function
 * of (key, i, law, parameters, dtype), so any slice in any thread gives the same
 * bits.  The pure-torch path in _counter.py performs the same IEEE operations in
 * the same order; this file must be compiled with -ffp-contract=off and without
 * -ffast-math, and uses no libm function whose last bit may differ from torch's
 * (log, sin, cos, exp and even sqrt are written below from +, -, *, /, floor and
 * exponent bit handling).  Normals into dtypes of at most 24 bits run in float32
 * (the *_f32 / *f functions), the rest in double.
 *
 * Keep every constant and every operation order in step with _counter.py (a step computed here in a
 * cheaper form with the same IEEE result is marked "same bits").
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "isa.h"
#include "prefault.h"

#if defined(__GNUC__)
#define TL_INLINE static inline __attribute__((always_inline))
#define TL_PREFETCH_W(p) __builtin_prefetch((p), 1, 3)
#else
#define TL_INLINE static inline
#define TL_PREFETCH_W(p) ((void)(p))
#endif

/* law codes (same table as _counter._LAWS) */
enum { UNIFORM, NORMAL, BERNOULLI, EXPONENTIAL, LOG_NORMAL, CAUCHY, GEOMETRIC, RANDOM, TRUNC_NORMAL };
/* dtype codes (same table as _counter._DTYPES) */
enum { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL };

/* The stream's element order: groups of GROUP consecutive Philox blocks; within a group, lane l of
   block j is element l * GROUP + j (lanes: 4 words, or 2 word pairs for 53-bit lanes).  So each lane
   is a contiguous run of elements and no interleaving pass is needed.  Part of the stream's
   definition: changing GROUP changes the values (_counter._GROUP must match). */
#define GROUP 512
#define CHUNK (4 * GROUP) /* elements per inner pass (narrow lanes); scratch stays in L1/L2 */
#define MAX_ATTEMPTS 65536

static const double TWO_M32 = 2.3283064365386963e-10; /* 2**-32 */
static const double TWO_M53 = 1.1102230246251565e-16; /* 2**-53 */
static const double SQRT2 = 1.4142135623730951;
static const double LN2 = 0.6931471805599453;
static const double LN2_HI = 0.6931471803691238; /* ln 2 with 32 trailing zero bits */
static const double LN2_LO = 1.9082146973659064e-10;
static const double INV_LN2 = 1.4426950408889634;
static const double HALF_PI = 1.5707963267948966;
static const double TWO_52 = 4503599627370496.0;

typedef struct {
    uint32_t k0, k1, c2, c3;
} tl_key;

/* bit casts through a union (defined in C11; unlike memcpy, gcc vectorizes them inside loops) */
typedef union {
    double d;
    uint64_t u;
} tl_pun;
TL_INLINE uint64_t dbits(double d) {
    tl_pun p;
    p.d = d;
    return p.u;
}
TL_INLINE double bitsd(uint64_t b) {
    tl_pun p;
    p.u = b;
    return p.d;
}
typedef union {
    float f;
    uint32_t u;
} tl_fpun;
TL_INLINE uint32_t fbits(float f) {
    tl_fpun p;
    p.f = f;
    return p.u;
}
TL_INLINE float bitsf(uint32_t b) {
    tl_fpun p;
    p.u = b;
    return p.f;
}

/* uint32 -> double, exactly, in a form that vectorizes without unsigned converts */
TL_INLINE double u32d(uint32_t x) { return (double)(int32_t)(x ^ 0x80000000u) + 2147483648.0; }

/* ---- Philox-4x32-10 over a run of consecutive blocks, structure of arrays ---- */

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

static void philox_scalar(uint64_t blk0, size_t nb, uint32_t attempt_bits, tl_key key, uint32_t *restrict x0,
                          uint32_t *restrict x1, uint32_t *restrict x2, uint32_t *restrict x3) {
    for (size_t j = 0; j < nb; j++) {
        uint64_t blk = blk0 + j;
        uint32_t c0 = (uint32_t)blk, c1 = (uint32_t)(blk >> 32) | attempt_bits, c2 = key.c2, c3 = key.c3;
        uint32_t k0 = key.k0, k1 = key.k1;
        for (int r = 0; r < 10; r++) {
            uint64_t p0 = (uint64_t)PHILOX_M0 * c0;
            uint64_t p1 = (uint64_t)PHILOX_M1 * c2;
            uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
            uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
            c1 = (uint32_t)p1;
            c3 = (uint32_t)p0;
            c0 = n0;
            c2 = n2;
            k0 += PHILOX_W0;
            k1 += PHILOX_W1;
        }
        x0[j] = c0;
        x1[j] = c1;
        x2[j] = c2;
        x3[j] = c3;
    }
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define TL_X86 1
/* Vector kernels hold one 32-bit word per 32-bit lane (block j + i in lane i).  The 32x32->64 multiply
   (vpmuludq) reads the even lanes, so each Philox multiply is two of them, on the words and on the
   words shifted down by 32; the high halves of the products are then merged back into one vector,
   and the low halves either merged the same way or recomputed by a 32-bit multiply (vpmulld).  Two
   (AVX-512) or four (AVX2) independent vectors per iteration keep the multiplier busy while one
   round's result waits on the previous.  gcc's auto-vectorization of the scalar loop emulates a full
   64-bit multiply instead (3x slower); one word per 64-bit lane (as before) spent half of each xor
   and shift on empty halves (the dense form is 1.3x faster on Zen 4). */
#define PHILOX_AVX512_VECS 2
#define PHILOX_AVX2_VECS 4

/* high and low words of the 16 products c * m */
__attribute__((target("avx512f"))) static inline void mulhilo_avx512(__m512i c, __m512i m, __m512i *hi, __m512i *lo) {
    __m512i even = _mm512_mul_epu32(c, m), odd = _mm512_mul_epu32(_mm512_srli_epi64(c, 32), m);
    *hi = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_DDBB);
    /* a merge, not vpmulld: vpmulld is as fast on Zen 4 but two slow uops on Intel's AVX-512 cores */
    *lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CCAA);
}

__attribute__((target("avx512f"))) static void philox_avx512(uint64_t blk0, size_t nb, uint32_t attempt_bits,
                                                              tl_key key, uint32_t *restrict x0,
                                                              uint32_t *restrict x1, uint32_t *restrict x2,
                                                              uint32_t *restrict x3) {
    const __m512i m0 = _mm512_set1_epi32((int)PHILOX_M0), m1 = _mm512_set1_epi32((int)PHILOX_M1);
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const size_t step = 16 * PHILOX_AVX512_VECS;
    size_t j = 0;
    for (; j + step <= nb; j += step) {
        __m512i c0[PHILOX_AVX512_VECS], c1[PHILOX_AVX512_VECS], c2[PHILOX_AVX512_VECS], c3[PHILOX_AVX512_VECS];
        for (int v = 0; v < PHILOX_AVX512_VECS; v++) {
            uint64_t blk = blk0 + j + 16 * (size_t)v;
            c0[v] = _mm512_add_epi32(_mm512_set1_epi32((int)(uint32_t)blk), lane);
            /* lanes whose low word wrapped carry into the high word */
            __mmask16 carry = _mm512_cmplt_epu32_mask(c0[v], lane);
            c1[v] = _mm512_mask_blend_epi32(carry, _mm512_set1_epi32((int)((uint32_t)(blk >> 32) | attempt_bits)),
                                            _mm512_set1_epi32((int)((uint32_t)((blk >> 32) + 1) | attempt_bits)));
            c2[v] = _mm512_set1_epi32((int)key.c2);
            c3[v] = _mm512_set1_epi32((int)key.c3);
        }
        uint32_t k0 = key.k0, k1 = key.k1;
        for (int r = 0; r < 10; r++) {
            for (int v = 0; v < PHILOX_AVX512_VECS; v++) {
                __m512i hi0, lo0, hi1, lo1;
                mulhilo_avx512(c0[v], m0, &hi0, &lo0);
                mulhilo_avx512(c2[v], m1, &hi1, &lo1);
                c0[v] = _mm512_ternarylogic_epi32(hi1, c1[v], _mm512_set1_epi32((int)k0), 0x96); /* a ^ b ^ c */
                c2[v] = _mm512_ternarylogic_epi32(hi0, c3[v], _mm512_set1_epi32((int)k1), 0x96);
                c1[v] = lo1;
                c3[v] = lo0;
            }
            k0 += PHILOX_W0;
            k1 += PHILOX_W1;
        }
        for (int v = 0; v < PHILOX_AVX512_VECS; v++) {
            _mm512_storeu_si512(x0 + j + 16 * v, c0[v]);
            _mm512_storeu_si512(x1 + j + 16 * v, c1[v]);
            _mm512_storeu_si512(x2 + j + 16 * v, c2[v]);
            _mm512_storeu_si512(x3 + j + 16 * v, c3[v]);
        }
    }
    philox_scalar(blk0 + j, nb - j, attempt_bits, key, x0 + j, x1 + j, x2 + j, x3 + j);
}

/* high and low words of the 8 products c * m (vpmulld: one uop on AMD, as fast as a shift and a blend
   on Intel's AVX2 cores) */
__attribute__((target("avx2"))) static inline void mulhilo_avx2(__m256i c, __m256i m, __m256i *hi, __m256i *lo) {
    __m256i even = _mm256_mul_epu32(c, m), odd = _mm256_mul_epu32(_mm256_srli_epi64(c, 32), m);
    *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    *lo = _mm256_mullo_epi32(c, m);
}

__attribute__((target("avx2"))) static void philox_avx2(uint64_t blk0, size_t nb, uint32_t attempt_bits, tl_key key,
                                                        uint32_t *restrict x0, uint32_t *restrict x1,
                                                        uint32_t *restrict x2, uint32_t *restrict x3) {
    const __m256i m0 = _mm256_set1_epi32((int)PHILOX_M0), m1 = _mm256_set1_epi32((int)PHILOX_M1);
    const __m256i lane = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    const __m256i sign = _mm256_set1_epi32((int)0x80000000u);
    const size_t step = 8 * PHILOX_AVX2_VECS;
    size_t j = 0;
    for (; j + step <= nb; j += step) {
        __m256i c0[PHILOX_AVX2_VECS], c1[PHILOX_AVX2_VECS], c2[PHILOX_AVX2_VECS], c3[PHILOX_AVX2_VECS];
        for (int v = 0; v < PHILOX_AVX2_VECS; v++) {
            uint64_t blk = blk0 + j + 8 * (size_t)v;
            c0[v] = _mm256_add_epi32(_mm256_set1_epi32((int)(uint32_t)blk), lane);
            /* lanes whose low word wrapped (c0 < lane, unsigned) carry into the high word: minus -1 */
            __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(lane, sign), _mm256_xor_si256(c0[v], sign));
            c1[v] = _mm256_or_si256(_mm256_sub_epi32(_mm256_set1_epi32((int)(uint32_t)(blk >> 32)), carry),
                                    _mm256_set1_epi32((int)attempt_bits));
            c2[v] = _mm256_set1_epi32((int)key.c2);
            c3[v] = _mm256_set1_epi32((int)key.c3);
        }
        uint32_t k0 = key.k0, k1 = key.k1;
        for (int r = 0; r < 10; r++) {
            for (int v = 0; v < PHILOX_AVX2_VECS; v++) {
                __m256i hi0, lo0, hi1, lo1;
                mulhilo_avx2(c0[v], m0, &hi0, &lo0);
                mulhilo_avx2(c2[v], m1, &hi1, &lo1);
                c0[v] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[v]), _mm256_set1_epi32((int)k0));
                c2[v] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[v]), _mm256_set1_epi32((int)k1));
                c1[v] = lo1;
                c3[v] = lo0;
            }
            k0 += PHILOX_W0;
            k1 += PHILOX_W1;
        }
        for (int v = 0; v < PHILOX_AVX2_VECS; v++) {
            _mm256_storeu_si256((__m256i *)(x0 + j + 8 * v), c0[v]);
            _mm256_storeu_si256((__m256i *)(x1 + j + 8 * v), c1[v]);
            _mm256_storeu_si256((__m256i *)(x2 + j + 8 * v), c2[v]);
            _mm256_storeu_si256((__m256i *)(x3 + j + 8 * v), c3[v]);
        }
    }
    philox_scalar(blk0 + j, nb - j, attempt_bits, key, x0 + j, x1 + j, x2 + j, x3 + j);
}
#endif

typedef void (*philox_fn)(uint64_t, size_t, uint32_t, tl_key, uint32_t *restrict, uint32_t *restrict,
                          uint32_t *restrict, uint32_t *restrict);
static philox_fn philox_blocks = philox_scalar; /* chosen once at import by the CPU's features */

/* ---- elementary functions from IEEE basic operations ---- */

/* Polynomial coefficients, highest degree first.  32-bit ("narrow") lanes feed dtypes of at most 24
   bits and use the shorter tails (truncation error < 1e-10); 53-bit ("wide") lanes use them all. */
static const double LOG_C[10] = {0.05263157894736842, 0.058823529411764705, 0.06666666666666667,
                                 0.07692307692307693, 0.09090909090909091,  0.1111111111111111,
                                 0.14285714285714285, 0.2,                  0.3333333333333333,
                                 1.0};
static const double SIN_C[7] = {-7.647163731819816e-13, 1.6059043836821613e-10, -2.505210838544172e-08,
                                2.7557319223985893e-06, -0.0001984126984126984, 0.008333333333333333,
                                -0.16666666666666666};
static const double COS_C[8] = {4.779477332387385e-14,  -1.1470745597729725e-11, 2.08767569878681e-09,
                                -2.755731922398589e-07, 2.48015873015873e-05,    -0.001388888888888889,
                                0.041666666666666664,   -0.5};
#define LOG_DEG(wide) ((wide) ? 10 : 6)
#define SIN_DEG(wide) ((wide) ? 7 : 5)
#define COS_DEG(wide) ((wide) ? 8 : 6)
#define NEWTON_STEPS(wide) ((wide) ? 4 : 3)

/* Horner over the last n coefficients of c (n a constant after inlining, so the loop unrolls) */
TL_INLINE double horner(const double *c, int total, int n, double z) {
    double p = c[total - n];
    for (int i = total - n + 1; i < total; i++) p = p * z + c[i];
    return p;
}

/* natural log for normal positive doubles: u = m 2^e, m in [sqrt(1/2), sqrt(2)),
   log m = 2 atanh s, s = (m - 1) / (m + 1), by its Taylor series in s^2 (|s| < 0.172) */
TL_INLINE double tl_log(double u, int wide) {
    uint64_t b = dbits(u);
    double e = bitsd((b >> 52) | 0x4330000000000000ull) - TWO_52 - 1023.0;
    double m = bitsd((b & 0x000fffffffffffffull) | 0x3ff0000000000000ull);
    e = m > SQRT2 ? e + 1.0 : e;
    m = m > SQRT2 ? m * 0.5 : m;
    double s = (m - 1.0) / (m + 1.0);
    double t = s * horner(LOG_C, 10, LOG_DEG(wide), s * s);
    return (t + t) + e * LN2;
}

/* sqrt for t >= 0 from + and * alone: torch's sqrt is not correctly rounded on every build, so neither
   path may use a hardware or libm sqrt.  Reciprocal square root from the exponent-halving guess
   (Lomont's constant, relative error < 3.5%), Newton steps (3: error < 1e-10; 4: < 1e-20), then t * y. */
TL_INLINE double tl_sqrt(double t, int wide) {
    double h = 0.5 * t;
    double y = bitsd(0x5FE6EB50C7B537A9ull - (dbits(t) >> 1));
    for (int i = 0; i < NEWTON_STEPS(wide); i++) y = y * (1.5 - (h * y) * y);
    return t > 0.0 ? t * y : 0.0;
}

/* 2**j for integral j in [-1022, 1023] */
TL_INLINE double tl_pow2(double j) {
    uint64_t n = dbits(j + 1023.0 + TWO_52) & 0x7ffull;
    return bitsd(n << 52);
}

/* exp: y = k ln2 + r, |r| <= ln2 / 2, Taylor to degree 13, then two exact power-of-two scalings */
TL_INLINE double tl_exp(double y) {
    y = y < -800.0 ? -800.0 : y;
    y = y > 800.0 ? 800.0 : y;
    double k = floor(y * INV_LN2 + 0.5);
    double r = (y - k * LN2_HI) - k * LN2_LO;
    double p = 1.6059043836821613e-10;
    p = p * r + 2.08767569878681e-09;
    p = p * r + 2.505210838544172e-08;
    p = p * r + 2.755731922398589e-07;
    p = p * r + 2.7557319223985893e-06;
    p = p * r + 2.48015873015873e-05;
    p = p * r + 0.0001984126984126984;
    p = p * r + 0.001388888888888889;
    p = p * r + 0.008333333333333333;
    p = p * r + 0.041666666666666664;
    p = p * r + 0.16666666666666666;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    double h = floor(k * 0.5);
    return (p * tl_pow2(k - h)) * tl_pow2(h);
}

/* sin and cos of 2 pi v (0 <= v <= 1): v = q/4 + r/4, |r| <= 1/2, a = r pi/2, Taylor on |a| <= pi/4,
   then a quarter-turn rotation by q mod 4 */
TL_INLINE void tl_sincos2pi(double v, int wide, double *sn, double *cs) {
    double q = floor(v * 4.0 + 0.5);
    double r = v * 4.0 - q;
    double a = r * HALF_PI;
    double z = a * a;
    double s = a + (a * z) * horner(SIN_C, 7, SIN_DEG(wide), z);
    double c = 1.0 + z * horner(COS_C, 8, COS_DEG(wide), z);
    /* quarter turns qm = q mod 4 (q >= 0 is integral: its low bits sit in the mantissa of q + 2**52),
       then swap (qm odd) and sign flips (cos: qm in {1, 2}; sin: qm in {2, 3}) as bit operations */
    uint64_t qb = dbits(q + TWO_52);
    uint64_t odd = 0 - (qb & 1u);
    uint64_t cb = dbits(c), sb = dbits(s);
    uint64_t c2 = (sb & odd) | (cb & ~odd), s2 = (cb & odd) | (sb & ~odd);
    *cs = bitsd(c2 ^ (((qb + 1u) & 2u) << 62));
    *sn = bitsd(s2 ^ ((qb & 2u) << 62));
}

/* ---- the float32 laws: normals for dtypes of at most 24 bits, in IEEE float32 arithmetic ----
   Same structure as the double functions above, with float32 constants (each the double constant
   rounded to float32; _counter.py rounds the same doubles) and shorter series (truncation < 3e-8). */

#define F32_LOG_DEG 5   /* s^9/9 last: next term < 2e-9 relative */
#define F32_SIN_DEG 4   /* a^9/9! last */
#define F32_COS_DEG 4   /* a^8/8! last */
#define F32_NEWTON_STEPS 3
static const float F_LN2_HI = 0.693138122558593750f; /* 0x3f317180: e * F_LN2_HI is exact for |e| < 128 */
static const float F_LN2_LO = (float)9.058001523953862e-06;
static const float F_HALF_PI = (float)1.5707963267948966;

TL_INLINE float hornerf(const double *c, int total, int n, float z) {
    float p = (float)c[total - n];
    for (int i = total - n + 1; i < total; i++) p = p * z + (float)c[i];
    return p;
}

/* The functions below compute what _counter.py's _log_word, _sqrt_f32 and _sincos_word compute, but some
   steps take a cheaper form with the same IEEE result (marked "same bits"; each was checked against the
   literal form for all 2**32 words, in the scalar, AVX2 and AVX-512 builds).  The float multiplier is
   the bottleneck, so multiplications by powers of two become exponent arithmetic. */

/* log of u = (a + 1) 2**-32 for a 32-bit word a (as tl_log), in two steps (see lane_values_f32): the
   reduced exponent e and s = (m - 1) / (m + 1), then the series.  u is a as a float32 (one rounding) plus
   one, scaled; near u = 1 that rounding would leave 1 - u only 2**-25 absolute precision, so when the
   reduced exponent is 0 (u > sqrt(1/2)), m - 1 = -(1 - u) is taken from the exact integer 2**32 - 1 - a
   instead (relative precision 2**-24, hence also the small Box-Muller radii) */
TL_INLINE float log_word_ratio(uint32_t a, float *e) {
    /* same bits: (float)a is correctly rounded (vcvtudq2ps, or gcc's exact split), and the scaling of
       u = (a + 1) 2**-32 only moves the exponent, so the bits of v = u 2**32 give e and m directly */
    float v = (float)a + 1.0f;
    /* e + 1 and m * 0.5 when m > sqrt 2 (same bits): adding 0x800000 - 1 - 0x3504f3 (the mantissa bits of
       sqrt 2 rounded to float32, 0x3fb504f3) to the bits of v carries into the exponent exactly then */
    uint32_t b = fbits(v) + 0x004afb0cu;
    int32_t ei = (int32_t)(b >> 23) - (127 + 32);     /* small integers: exact as float */
    float m = bitsf((b & 0x007fffffu) + 0x3f3504f4u); /* 0x3f3504f4 + 0x004afb0c = 0x3f800000 */
    float dm = ei == 0 ? (float)~a * -2.3283064365386963e-10f : m - 1.0f; /* -(x 2**-32): same bits */
    *e = (float)ei;
    return dm / (m + 1.0f);
}

TL_INLINE float log_from_ratio(float s, float e) {
    float t = s * hornerf(LOG_C, 10, F32_LOG_DEG, s * s);
    return e * F_LN2_HI + ((t + t) + e * F_LN2_LO);
}

/* sqrt(-2 l) for a log l <= 0 (as tl_sqrt): Lomont's float constant, 3 Newton steps (error < 1e-10 before
   rounding).  same bits: t = -2 l as -(l + l), and with h = 0.5 t = -l, 1.5 - (h y) y as 1.5 + (l y) y */
TL_INLINE float tl_sqrtf_m2(float l) {
    float t = -(l + l);
    float y = bitsf(0x5f375a86u - (fbits(t) >> 1));
    for (int i = 0; i < F32_NEWTON_STEPS; i++) y = y * (1.5f + (l * y) * y);
    return t > 0.0f ? t * y : 0.0f;
}

/* sin and cos of the angle of a 32-bit word w (w / 2**32 turns), reduced in integers: quarter turn
   q = round(w / 2**30) mod 4, remainder w - q 2**30 as a signed int32 in [-2**29, 2**29), so the
   angle keeps 24 significant bits of its offset from the nearest quarter turn */
TL_INLINE void tl_sincos_word(uint32_t w, float *sn, float *cs) {
    uint32_t t = w + 0x20000000u; /* q = t >> 30 */
    /* same bits: the remainder is the low 30 bits of w sign-extended, here times 4 (exact as float, and
       its rounding is 4 times the remainder's); r * F_HALF_PI with r = remainder 2**-30 is rounded as
       (4 remainder) (F_HALF_PI 2**-32), the power of two scaling staying exact (a nonzero |a| > 2**-30) */
    float a = (float)(int32_t)(w << 2) * (F_HALF_PI * 2.3283064365386963e-10f);
    float z = a * a;
    float s = a + (a * z) * hornerf(SIN_C, 7, F32_SIN_DEG, z);
    float c = 1.0f + z * hornerf(COS_C, 8, F32_COS_DEG, z);
    /* quarter turns as bit operations on t: swap for odd q (bit 30), negate the sine for q & 2 (bit 31) and
       the cosine for (q + 1) & 2 (bit 31 of t + 2**30) */
    uint32_t odd = (uint32_t)((int32_t)(t << 1) >> 31);
    uint32_t cb = fbits(c), sb = fbits(s);
    uint32_t c2 = (sb & odd) | (cb & ~odd), s2 = (cb & odd) | (sb & ~odd);
    *cs = bitsf(c2 ^ ((t + 0x40000000u) & 0x80000000u));
    *sn = bitsf(s2 ^ (t & 0x80000000u));
}

/* NORMAL and TRUNC_NORMAL in float32 (p0 = mean, p1 = std, both float32-representable): u = (a + 1) 2**-32
   in (0, 1], angle b / 2**32 turns.  A value is one long chain of dependent operations (about 125 cycles
   on Zen 4), too long for the out-of-order window to overlap enough values to keep the multipliers busy,
   so the chain runs as four loops over up to GROUP pairs, each leaving its step's results in L1 (1.2x
   with AVX-512 on Zen 4, 1.7x with AVX2) */
TL_CLONES
static void lane_values_f32(float mean, float std, size_t nb, const uint32_t *restrict a, const uint32_t *restrict b,
                            float *restrict va, float *restrict vb) {
    float r[GROUP], e[GROUP];
    for (size_t j0 = 0; j0 < nb; j0 += GROUP) {
        const size_t n = nb - j0 < GROUP ? nb - j0 : GROUP;
        for (size_t j = 0; j < n; j++) r[j] = log_word_ratio(a[j0 + j], e + j);
        for (size_t j = 0; j < n; j++) r[j] = log_from_ratio(r[j], e[j]);
        for (size_t j = 0; j < n; j++) r[j] = tl_sqrtf_m2(r[j]);
        for (size_t j = 0; j < n; j++) {
            float sn, cs;
            tl_sincos_word(b[j0 + j], &sn, &cs);
            va[j0 + j] = (r[j] * cs) * std + mean;
            vb[j0 + j] = (r[j] * sn) * std + mean;
        }
    }
}

/* ---- laws ---- */

typedef struct {
    int law, wide, f32;
    double p0, p1, p2, p3;
    int64_t ifrom;
    uint64_t irange;
} tl_law;

/* the normal pair of two lane integers a, b (as doubles) */
TL_INLINE void normal_pair(double a, double b, double scale, int wide, double *z0, double *z1) {
    double ua = (a + 1.0) * scale;
    double ub = b * scale;
    double r = tl_sqrt(-2.0 * tl_log(ua, wide), wide);
    double sn, cs;
    tl_sincos2pi(ub, wide, &sn, &cs);
    *z0 = r * cs;
    *z1 = r * sn;
}

/* a lane's integer as an exact double: one 32-bit word, or 53 bits of two words (wide) */
TL_INLINE double lane_int(const int wide, const uint32_t *lo, const uint32_t *hi, size_t j) {
    return wide ? u32d(hi[j] >> 11) * 4294967296.0 + u32d(lo[j]) : u32d(lo[j]);
}

/* values of a pair of lanes a, b -> (va, vb) for laws of doubles; a lane is the words a_lo (narrow)
   or a_lo, a_hi (wide) of nb consecutive blocks */
TL_INLINE void lane_values_impl(const tl_law *lw, const int wide, size_t nb, const uint32_t *restrict a_lo,
                                const uint32_t *restrict a_hi, const uint32_t *restrict b_lo,
                                const uint32_t *restrict b_hi, double *restrict va, double *restrict vb) {
    const double scale = wide ? TWO_M53 : TWO_M32;
    const double p0 = lw->p0, p1 = lw->p1;
    switch (lw->law) {
        case UNIFORM: /* p0 = from, p1 = to - from */
            for (size_t j = 0; j < nb; j++) {
                va[j] = (lane_int(wide, a_lo, a_hi, j) * scale) * p1 + p0;
                vb[j] = (lane_int(wide, b_lo, b_hi, j) * scale) * p1 + p0;
            }
            break;
        case NORMAL:
        case TRUNC_NORMAL: /* p0 = mean, p1 = std */
            for (size_t j = 0; j < nb; j++) {
                double z0, z1;
                normal_pair(lane_int(wide, a_lo, a_hi, j), lane_int(wide, b_lo, b_hi, j), scale, wide, &z0, &z1);
                va[j] = z0 * p1 + p0;
                vb[j] = z1 * p1 + p0;
            }
            break;
        case LOG_NORMAL: /* p0 = mean, p1 = std of the log */
            for (size_t j = 0; j < nb; j++) {
                double z0, z1;
                normal_pair(lane_int(wide, a_lo, a_hi, j), lane_int(wide, b_lo, b_hi, j), scale, wide, &z0, &z1);
                va[j] = tl_exp(z0 * p1 + p0);
                vb[j] = tl_exp(z1 * p1 + p0);
            }
            break;
        case BERNOULLI: /* p0 = p */
            for (size_t j = 0; j < nb; j++) {
                va[j] = (lane_int(wide, a_lo, a_hi, j) * scale) < p0 ? 1.0 : 0.0;
                vb[j] = (lane_int(wide, b_lo, b_hi, j) * scale) < p0 ? 1.0 : 0.0;
            }
            break;
        case EXPONENTIAL: /* p0 = -1 / lambd */
            for (size_t j = 0; j < nb; j++) {
                va[j] = tl_log((lane_int(wide, a_lo, a_hi, j) + 0.5) * scale, wide) * p0;
                vb[j] = tl_log((lane_int(wide, b_lo, b_hi, j) + 0.5) * scale, wide) * p0;
            }
            break;
        case GEOMETRIC: /* p0 = 1 / log1p(-p) */
            for (size_t j = 0; j < nb; j++) {
                double a = ceil(tl_log((lane_int(wide, a_lo, a_hi, j) + 0.5) * scale, wide) * p0);
                double b = ceil(tl_log((lane_int(wide, b_lo, b_hi, j) + 0.5) * scale, wide) * p0);
                va[j] = a < 1.0 ? 1.0 : a;
                vb[j] = b < 1.0 ? 1.0 : b;
            }
            break;
        case CAUCHY: /* p0 = median, p1 = sigma: median - sigma cot(pi u) */
            for (size_t j = 0; j < nb; j++) {
                double sa, ca, sb, cb;
                tl_sincos2pi(((lane_int(wide, a_lo, a_hi, j) + 0.5) * scale) * 0.5, wide, &sa, &ca);
                tl_sincos2pi(((lane_int(wide, b_lo, b_hi, j) + 0.5) * scale) * 0.5, wide, &sb, &cb);
                va[j] = p0 - (ca / sa) * p1;
                vb[j] = p0 - (cb / sb) * p1;
            }
            break;
        default:
            break;
    }
}

/* the law loops specialized for each lane width (the polynomial degrees depend on it) */
TL_CLONES
static void lane_values_narrow(const tl_law *lw, size_t nb, const uint32_t *restrict a, const uint32_t *restrict b,
                               double *restrict va, double *restrict vb) {
    lane_values_impl(lw, 0, nb, a, a, b, b, va, vb);
}
TL_CLONES
static void lane_values_wide(const tl_law *lw, size_t nb, const uint32_t *restrict a_lo, const uint32_t *restrict a_hi,
                             const uint32_t *restrict b_lo, const uint32_t *restrict b_hi, double *restrict va,
                             double *restrict vb) {
    lane_values_impl(lw, 1, nb, a_lo, a_hi, b_lo, b_hi, va, vb);
}

/* all lanes of nb blocks (words x0..x3) into v: lane l's values at v + l * nb */
static void block_lanes(const tl_law *lw, size_t nb, const uint32_t *x0, const uint32_t *x1, const uint32_t *x2,
                        const uint32_t *x3, double *v) {
    if (lw->wide) {
        lane_values_wide(lw, nb, x0, x1, x2, x3, v, v + nb);
    } else {
        lane_values_narrow(lw, nb, x0, x1, v, v + nb);
        lane_values_narrow(lw, nb, x2, x3, v + 2 * nb, v + 3 * nb);
    }
}

/* one block's lane values for one attempt (the truncated normal's per-element redraws) */
static void block_values(const tl_law *lw, tl_key key, uint64_t blk, uint32_t attempt, double v[4]) {
    uint32_t x[4];
    philox_blocks(blk, 1, attempt << 16, key, x, x + 1, x + 2, x + 3);
    block_lanes(lw, 1, x, x + 1, x + 2, x + 3, v);
}

static void block_values_f32(const tl_law *lw, tl_key key, uint64_t blk, uint32_t attempt, float v[4]) {
    uint32_t x[4];
    philox_blocks(blk, 1, attempt << 16, key, x, x + 1, x + 2, x + 3);
    lane_values_f32((float)lw->p0, (float)lw->p1, 1, x, x + 1, v, v + 1);
    lane_values_f32((float)lw->p0, (float)lw->p1, 1, x + 2, x + 3, v + 2, v + 3);
}

static float trunc_retry_f32(const tl_law *lw, tl_key key, uint64_t e) {
    const uint64_t r = e % (4 * GROUP), blk = e / (4 * GROUP) * GROUP + r % GROUP;
    float v[4];
    for (uint32_t att = 1; att < MAX_ATTEMPTS; att++) {
        block_values_f32(lw, key, blk, att, v);
        float x = v[r / GROUP];
        if (x >= lw->p2 && x <= lw->p3) return x;
    }
    return (float)lw->p2; /* unreachable for the acceptance rates _counter.py admits */
}

static double trunc_retry(const tl_law *lw, tl_key key, uint64_t e) {
    const uint64_t per_group = (lw->wide ? 2 : 4) * GROUP;
    const uint64_t r = e % per_group, blk = e / per_group * GROUP + r % GROUP;
    double v[4];
    for (uint32_t att = 1; att < MAX_ATTEMPTS; att++) {
        block_values(lw, key, blk, att, v);
        double x = v[r / GROUP];
        if (x >= lw->p2 && x <= lw->p3) return x;
    }
    return lw->p2; /* unreachable for the acceptance rates _counter.py admits */
}

/* ---- conversion to the target dtype ---- */

TL_INLINE uint16_t f32_to_bf16(float f) {
    uint32_t x = fbits(f);
    uint32_t r = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
    return (x & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0u : (uint16_t)r;
}

TL_INLINE uint16_t f32_to_f16(float f) {
    uint32_t x = fbits(f);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t a = x & 0x7fffffffu;
    /* subnormal or zero half: round by adding to 0.5f, whose ulp is the half subnormal step 2**-24 */
    uint32_t sub = fbits(bitsf(a) + 0.5f) - 0x3f000000u;
    uint32_t nrm = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;
    uint32_t h = a < 0x38800000u ? sub : nrm;
    h = a >= 0x477ff000u ? 0x7c00u : h;
    h = a > 0x7f800000u ? 0x7e00u : h;
    return (uint16_t)(sign | h);
}

TL_INLINE double f32_to_d(float f) { return (double)f; }

TL_INLINE float f16_to_f32(uint16_t h) {
    uint32_t a = h & 0x7fffu;
    float nrm = bitsf((a << 13) + 0x38000000u);   /* rebias the exponent: 127 - 15 = 112 */
    float sub = (float)a * 5.9604644775390625e-08f; /* subnormals (and zero): a * 2**-24, exact */
    float v = a < 0x400u ? sub : nrm;
    v = a >= 0x7c00u ? bitsf(0x7f800000u) : v;
    return (h & 0x8000u) ? -v : v;
}

/* round v to the dtype (kept as double), and keep the uniform law below `to`: a value that
   rounds up to `to` (or beyond) becomes `hi`, the dtype's largest value below `to` */
TL_CLONES
static void clamp_below(int dtype, double *restrict v, size_t n, double to, double hi) {
    switch (dtype) {
        case F32:
            for (size_t i = 0; i < n; i++) {
                double r = (double)(float)v[i];
                v[i] = r >= to ? hi : r;
            }
            break;
        case BF16:
            for (size_t i = 0; i < n; i++) {
                double r = (double)bitsf((uint32_t)f32_to_bf16((float)v[i]) << 16);
                v[i] = r >= to ? hi : r;
            }
            break;
        case F16:
            for (size_t i = 0; i < n; i++) {
                double r = (double)f16_to_f32(f32_to_f16((float)v[i]));
                v[i] = r >= to ? hi : r;
            }
            break;
        default:
            for (size_t i = 0; i < n; i++) v[i] = v[i] >= to ? hi : v[i];
            break;
    }
}

TL_CLONES
static void store_doubles(int dtype, const double *restrict v, size_t n, char *restrict out) {
    switch (dtype) {
        case F64:
            memcpy(out, v, n * 8);
            break;
        case F32: {
            float *o = (float *)out;
            for (size_t i = 0; i < n; i++) o[i] = (float)v[i];
            break;
        }
        case BF16: {
            uint16_t *o = (uint16_t *)out;
            for (size_t i = 0; i < n; i++) o[i] = f32_to_bf16((float)v[i]);
            break;
        }
        case F16: {
            uint16_t *o = (uint16_t *)out;
            for (size_t i = 0; i < n; i++) o[i] = f32_to_f16((float)v[i]);
            break;
        }
        case I64: {
            int64_t *o = (int64_t *)out;
            for (size_t i = 0; i < n; i++) o[i] = (int64_t)v[i];
            break;
        }
        case I32: {
            int32_t *o = (int32_t *)out;
            for (size_t i = 0; i < n; i++) o[i] = (int32_t)v[i];
            break;
        }
        case I16: {
            int16_t *o = (int16_t *)out;
            for (size_t i = 0; i < n; i++) o[i] = (int16_t)v[i];
            break;
        }
        case I8: {
            int8_t *o = (int8_t *)out;
            for (size_t i = 0; i < n; i++) o[i] = (int8_t)v[i];
            break;
        }
        case U8: {
            uint8_t *o = (uint8_t *)out;
            for (size_t i = 0; i < n; i++) o[i] = (uint8_t)v[i];
            break;
        }
        case BOOL: {
            uint8_t *o = (uint8_t *)out;
            for (size_t i = 0; i < n; i++) o[i] = v[i] != 0.0;
            break;
        }
        default:
            break;
    }
}

TL_CLONES
static void store_floats(int dtype, const float *restrict v, size_t n, char *restrict out) {
    switch (dtype) {
        case F32:
            memcpy(out, v, n * 4);
            break;
        case BF16: {
            uint16_t *o = (uint16_t *)out;
            for (size_t i = 0; i < n; i++) o[i] = f32_to_bf16(v[i]);
            break;
        }
        case F16: {
            uint16_t *o = (uint16_t *)out;
            for (size_t i = 0; i < n; i++) o[i] = f32_to_f16(v[i]);
            break;
        }
        default:
            break;
    }
}

/* UNIFORM from narrow lanes into float32, bfloat16 or float16 in one pass over n words of one lane: the
   double value (as lane_values_impl), then, when `clamp`, the dtype's rounding kept below `to` (as
   clamp_below), then the store (as store_doubles); no double scratch */
TL_INLINE double uniform_value(uint32_t x, double p0, double p1) { return (u32d(x) * TWO_M32) * p1 + p0; }

/* the least float32 >= to (to finite): for a float32 f, (double)f >= to exactly when f >= it */
static float least_float_at_or_above(double to) {
    float t = (float)to; /* the nearest: the least one above when it is not below */
    if ((double)t >= to) return t;
    uint32_t b = fbits(t);
    return (b & 0x7fffffffu) == 0 ? bitsf(1u) : bitsf(b >> 31 ? b - 1 : b + 1); /* the next float up */
}

TL_CLONES
static void uniform_narrow(int dtype, double p0, double p1, size_t n, const uint32_t *restrict x, char *restrict out,
                           int clamp, double to, double hi) {
    const float tof = least_float_at_or_above(to); /* a float compare (2 fewer conversions per 8 values) */
    switch (dtype) {
        case F32: {
            float *o = (float *)out;
            const float fhi = (float)hi;
            if (clamp) {
                for (size_t j = 0; j < n; j++) {
                    float f = (float)uniform_value(x[j], p0, p1);
                    o[j] = f >= tof ? fhi : f;
                }
            } else {
                for (size_t j = 0; j < n; j++) o[j] = (float)uniform_value(x[j], p0, p1);
            }
            break;
        }
        case BF16: {
            uint16_t *o = (uint16_t *)out;
            const uint16_t bhi = f32_to_bf16((float)hi);
            if (clamp) {
                for (size_t j = 0; j < n; j++) {
                    uint16_t h = f32_to_bf16((float)uniform_value(x[j], p0, p1));
                    o[j] = bitsf((uint32_t)h << 16) >= tof ? bhi : h;
                }
            } else {
                for (size_t j = 0; j < n; j++) o[j] = f32_to_bf16((float)uniform_value(x[j], p0, p1));
            }
            break;
        }
        case F16: {
            uint16_t *o = (uint16_t *)out;
            const uint16_t hhi = f32_to_f16((float)hi);
            if (clamp) {
                for (size_t j = 0; j < n; j++) {
                    float r = f16_to_f32(f32_to_f16((float)uniform_value(x[j], p0, p1)));
                    o[j] = r >= tof ? hhi : f32_to_f16(r); /* f16_to_f32 maps NaN to inf, as clamp_below */
                }
            } else {
                for (size_t j = 0; j < n; j++) o[j] = f32_to_f16((float)uniform_value(x[j], p0, p1));
            }
            break;
        }
        default:
            break;
    }
}

static void store_ints(int dtype, const int64_t *v, size_t n, char *out) {
    switch (dtype) {
        case I64:
            memcpy(out, v, n * 8);
            return;
        case I32:
            for (size_t i = 0; i < n; i++) ((int32_t *)out)[i] = (int32_t)v[i];
            return;
        case I16:
            for (size_t i = 0; i < n; i++) ((int16_t *)out)[i] = (int16_t)v[i];
            return;
        case I8:
            for (size_t i = 0; i < n; i++) ((int8_t *)out)[i] = (int8_t)v[i];
            return;
        case U8:
            for (size_t i = 0; i < n; i++) ((uint8_t *)out)[i] = (uint8_t)v[i];
            return;
        case BOOL:
            for (size_t i = 0; i < n; i++) ((uint8_t *)out)[i] = v[i] != 0;
            return;
        default: {
            double d[CHUNK];
            for (size_t i = 0; i < n; i++) d[i] = (double)v[i];
            store_doubles(dtype, d, n, out);
        }
    }
}

static const size_t ITEMSIZE[] = {8, 4, 2, 2, 8, 4, 2, 1, 1, 1};

/* asks for the cache lines of n bytes at p for writing */
static void prefetch_for_write(const void *p, size_t n) {
    for (size_t i = 0; i < n; i += 64) TL_PREFETCH_W((const char *)p + i);
}

/* the whole fill, GIL released by the caller */
static void fill_range(const tl_law *lw, tl_key key, int dtype, uint64_t start, uint64_t count, char *out,
                       int clamp, double clamp_to, double clamp_hi) {
    uint32_t x[4][GROUP];
    double buf[CHUNK];
    float fbuf[CHUNK];
    int64_t ibuf[CHUNK];
    const uint64_t per_group = (lw->wide ? 2 : 4) * GROUP;
    const uint64_t end = start + count;
    const size_t isz = ITEMSIZE[dtype];
    for (uint64_t e = start; e < end;) {
        uint64_t g0 = e - e % per_group; /* first element of e's group */
        uint64_t ce = g0 + per_group < end ? g0 + per_group : end;
        size_t off = (size_t)(e - g0), n = (size_t)(ce - e);
        philox_blocks(g0 / per_group * GROUP, GROUP, 0, key, x[0], x[1], x[2], x[3]);
        if (lw->law == RANDOM) {
            for (int l = 0; l < 4; l++)
                for (size_t j = 0; j < GROUP; j++)
                    ibuf[l * GROUP + j] = lw->ifrom + (int64_t)(((uint64_t)x[l][j] * lw->irange) >> 32);
            store_ints(dtype, ibuf + off, n, out + (e - start) * isz);
            e = ce;
            continue;
        }
        if (lw->law == UNIFORM && !lw->wide && (dtype == F32 || dtype == BF16 || dtype == F16)) {
            /* each lane's share of elements [off, off + n) of the group, straight into out */
            for (size_t l = 0; l < 4; l++) {
                size_t lo = off > l * GROUP ? off : l * GROUP;
                size_t hi = off + n < (l + 1) * GROUP ? off + n : (l + 1) * GROUP;
                if (lo < hi)
                    uniform_narrow(dtype, lw->p0, lw->p1, hi - lo, x[l] + (lo - l * GROUP),
                                   out + (g0 + lo - start) * isz, clamp, clamp_to, clamp_hi);
            }
            e = ce;
            continue;
        }
        if (lw->f32) { /* NORMAL or TRUNC_NORMAL, narrow lanes, a dtype of at most 24 bits */
            /* a whole float32 group is written in place (no scratch copy: the copy cost a third as much as
               the arithmetic); its lines are fetched for writing first, so that the reads for ownership
               overlap the arithmetic, which stores only in its last loop (1.25x on 128 MB) */
            float *v = dtype == F32 && n == CHUNK ? (float *)(void *)(out + (e - start) * isz) : fbuf;
            if (v != fbuf) prefetch_for_write(v, 2 * GROUP * sizeof(float));
            lane_values_f32((float)lw->p0, (float)lw->p1, GROUP, x[0], x[1], v, v + GROUP);
            if (v != fbuf) prefetch_for_write(v + 2 * GROUP, 2 * GROUP * sizeof(float));
            lane_values_f32((float)lw->p0, (float)lw->p1, GROUP, x[2], x[3], v + 2 * GROUP, v + 3 * GROUP);
            if (v != fbuf) {
                if (lw->law == TRUNC_NORMAL) {
                    for (size_t i = 0; i < CHUNK; i++)
                        if (!(v[i] >= lw->p2 && v[i] <= lw->p3)) v[i] = trunc_retry_f32(lw, key, g0 + i);
                }
                e = ce;
                continue;
            }
            if (lw->law == TRUNC_NORMAL) {
                for (size_t i = off; i < off + n; i++)
                    if (!(fbuf[i] >= lw->p2 && fbuf[i] <= lw->p3)) fbuf[i] = trunc_retry_f32(lw, key, g0 + i);
            }
            store_floats(dtype, fbuf + off, n, out + (e - start) * isz);
            e = ce;
            continue;
        }
        block_lanes(lw, GROUP, x[0], x[1], x[2], x[3], buf);
        if (lw->law == TRUNC_NORMAL) {
            for (size_t i = off; i < off + n; i++)
                if (!(buf[i] >= lw->p2 && buf[i] <= lw->p3)) buf[i] = trunc_retry(lw, key, g0 + i);
        }
        if (clamp) clamp_below(dtype, buf + off, n, clamp_to, clamp_hi);
        store_doubles(dtype, buf + off, n, out + (e - start) * isz);
        e = ce;
    }
}


static PyObject *py_fill(PyObject *self, PyObject *args) {
    unsigned long long addr, start, count, key0, key1, irange;
    long long ifrom;
    int dtype, clamp;
    double clamp_to, clamp_hi;
    tl_law lw;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKiiiiKKddddLKidd", &addr, &start, &count, &dtype, &lw.law, &lw.wide, &lw.f32, &key0,
                          &key1, &lw.p0, &lw.p1, &lw.p2, &lw.p3, &ifrom, &irange, &clamp, &clamp_to, &clamp_hi))
        return NULL;
    if (dtype < 0 || dtype > BOOL || lw.law < 0 || lw.law > TRUNC_NORMAL ||
        (lw.f32 && (lw.wide || (lw.law != NORMAL && lw.law != TRUNC_NORMAL) || (dtype != F32 && dtype != F16 &&
                                                                                 dtype != BF16)))) {
        PyErr_SetString(PyExc_ValueError, "torchlazy._countercore.fill: unknown dtype or law code");
        return NULL;
    }
    lw.ifrom = (int64_t)ifrom;
    lw.irange = (uint64_t)irange;
    tl_key key = {(uint32_t)key0, (uint32_t)(key0 >> 32), (uint32_t)key1, (uint32_t)(key1 >> 32)};
    Py_BEGIN_ALLOW_THREADS prefault((char *)(uintptr_t)addr, (size_t)(count * ITEMSIZE[dtype]));
    fill_range(&lw, key, dtype, start, count, (char *)(uintptr_t)addr, clamp, clamp_to,
                                      clamp_hi);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyObject *py_philox(PyObject *self, PyObject *args) {
    unsigned int c[4], k[2];
    (void)self;
    if (!PyArg_ParseTuple(args, "IIIIII", &c[0], &c[1], &c[2], &c[3], &k[0], &k[1])) return NULL;
    /* known-answer check of the raw generator: counter (c0 + 2^32 c1, c2, c3), key (k0, k1) */
    uint32_t x[4];
    tl_key key = {k[0], k[1], c[2], c[3]};
    philox_blocks((uint64_t)c[0] | ((uint64_t)c[1] << 32), 1, 0, key, x, x + 1, x + 2, x + 3);
    return Py_BuildValue("(IIII)", x[0], x[1], x[2], x[3]);
}

/* the float32 normal pairs of words a, b (bytes of uint32) through lane_values_f32 with mean 0 and std 1,
   as bytes of float32: all z0 then all z1 (for tests at chosen words) */
static PyObject *py_normal_f32(PyObject *self, PyObject *args) {
    Py_buffer a, b;
    PyObject *res = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*", &a, &b)) return NULL;
    if (a.len != b.len || a.len % 4) {
        PyErr_SetString(PyExc_ValueError, "torchlazy._countercore.normal_f32: two byte strings of as many words");
    } else {
        size_t n = (size_t)a.len / 4;
        uint32_t *w = PyMem_Malloc(16 * n + 1); /* words a, b, then values z0, z1 */
        if (w == NULL) {
            PyErr_NoMemory();
        } else {
            float *z = (float *)(void *)(w + 2 * n);
            memcpy(w, a.buf, 4 * n);
            memcpy(w + n, b.buf, 4 * n);
            lane_values_f32(0.0f, 1.0f, n, w, w + n, z, z + n);
            res = PyBytes_FromStringAndSize((const char *)z, (Py_ssize_t)(8 * n));
            PyMem_Free(w);
        }
    }
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return res;
}

/* which Philox kernel runs: "avx512", "avx2" or "scalar"; set_isa picks one the CPU supports (for tests) */
static PyObject *py_set_isa(PyObject *self, PyObject *args) {
    const char *name = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "|s", &name)) return NULL;
    if (name != NULL) {
        if (strcmp(name, "scalar") == 0) {
            philox_blocks = philox_scalar;
#ifdef TL_X86
        } else if (strcmp(name, "avx2") == 0 && __builtin_cpu_supports("avx2")) {
            philox_blocks = philox_avx2;
        } else if (strcmp(name, "avx512") == 0 && __builtin_cpu_supports("avx512f")) {
            philox_blocks = philox_avx512;
#endif
        } else {
            PyErr_Format(PyExc_ValueError, "Philox kernel `%s` is not available on this CPU", name);
            return NULL;
        }
    }
#ifdef TL_X86
    if (philox_blocks == philox_avx512) return PyUnicode_FromString("avx512");
    if (philox_blocks == philox_avx2) return PyUnicode_FromString("avx2");
#endif
    return PyUnicode_FromString("scalar");
}

static PyMethodDef methods[] = {
    {"fill", py_fill, METH_VARARGS,
     "fill(addr, start, count, dtype, law, wide, f32, key0, key1, p0, p1, p2, p3, ifrom, irange, clamp, clamp_to, "
     "clamp_hi): write elements [start, start + count) of the stream into the buffer at addr."},
    {"philox", py_philox, METH_VARARGS, "philox(c0, c1, c2, c3, k0, k1) -> the four words of Philox-4x32-10."},
    {"normal_f32", py_normal_f32, METH_VARARGS,
     "normal_f32(a, b) -> float32 normal pairs (mean 0, std 1) of the uint32 words in bytes a, b: z0s, then z1s."},
    {"set_isa", py_set_isa, METH_VARARGS,
     "set_isa([name]) -> the Philox kernel in use ('avx512', 'avx2', 'scalar'), after switching to `name`."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_countercore", "Counter-based fills (Philox-4x32-10).",
                                       -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__countercore(void) {
#ifdef TL_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f"))
        philox_blocks = philox_avx512;
    else if (__builtin_cpu_supports("avx2"))
        philox_blocks = philox_avx2;
#endif
    return PyModule_Create(&moduledef);
}
