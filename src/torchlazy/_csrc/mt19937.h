/* The MT19937 block as torch's CPU generator holds it, shared by the compiled cores of torchlazy.
 *
 * Blocks travel in torch's own layout: 624 little-endian u64 words, each holding one 32-bit state word.
 */
#ifndef TORCHLAZY_MT19937_H
#define TORCHLAZY_MT19937_H

#include <stdint.h>

#define MT_N 624
#define MT_M 397
#define MATRIX_A 0x9908B0DFu
#define UPPER 0x80000000u
#define LOWER 0x7FFFFFFFu

static inline void refill(uint32_t *s) {
    int j;
    uint32_t y;
    for (j = 0; j < MT_N - MT_M; j++) {
        y = (s[j] & UPPER) | (s[j + 1] & LOWER);
        s[j] = s[j + MT_M] ^ (y >> 1) ^ ((y & 1u) ? MATRIX_A : 0u);
    }
    for (; j < MT_N - 1; j++) {
        y = (s[j] & UPPER) | (s[j + 1] & LOWER);
        s[j] = s[j + MT_M - MT_N] ^ (y >> 1) ^ ((y & 1u) ? MATRIX_A : 0u);
    }
    y = (s[MT_N - 1] & UPPER) | (s[0] & LOWER);
    s[MT_N - 1] = s[MT_M - 1] ^ (y >> 1) ^ ((y & 1u) ? MATRIX_A : 0u);
}

static inline uint64_t load64(const unsigned char *p) {
    uint64_t v = 0;
    for (int k = 7; k >= 0; k--) v = (v << 8) | p[k];
    return v;
}

static inline void store64(unsigned char *p, uint64_t v) {
    for (int k = 0; k < 8; k++) p[k] = (unsigned char)(v >> (8 * k));
}

static inline void load_block(const unsigned char *b, uint32_t *s) {
    for (int j = 0; j < MT_N; j++) s[j] = (uint32_t)load64(b + 8 * j);
}

static inline void store_block(unsigned char *b, const uint32_t *s) {
    for (int j = 0; j < MT_N; j++) store64(b + 8 * j, s[j]);
}

#endif
