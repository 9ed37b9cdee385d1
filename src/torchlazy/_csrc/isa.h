/* Hot loops compiled once per instruction set, the best one the CPU has picked at load time (GCC's
   target_clones, an ifunc: Linux x86 only); elsewhere one portable build. Every clone gives the same bits. */
#ifndef TORCHLAZY_ISA_H
#define TORCHLAZY_ISA_H

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__)) && defined(__linux__)
#define TL_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TL_CLONES
#endif

#endif
