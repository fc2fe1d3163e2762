/* bf16 <-> fp32 conversions shared by the CPU kernels (bit-level, no compiler support needed). */
#ifndef SPLITFUSE_BF16_H
#define SPLITFUSE_BF16_H

#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Round to nearest even, as torch's .to(torch.bfloat16); inf stays inf and NaN stays NaN (quieted).
 * Branch-free, so loops that call it vectorize. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    uint32_t rounded = bits + 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(((bits & 0x7fffffffu) > 0x7f800000u ? bits | 0x00400000u : rounded) >> 16);
}

#endif
