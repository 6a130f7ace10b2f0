/* What the AMX kernels (attention_cpu.c, matmul_few_rows_cpu.c) share: the bf16 storage type, a
   lane mask, the process's request for the AMX tile state and the one tile configuration they
   use. cpu_library hashes this header into each includer's cache key. */
#ifndef FASTDIFF_AMX_TILES_H
#define FASTDIFF_AMX_TILES_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef uint16_t bf16;

/* Ask Linux for the AMX tile state (once per process). 0 on success. */
static inline int amx_request(void) { return (int)syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); }

/* Every tile register as 16 rows of 64 bytes: 16x16 fp32 accumulators, 16x32 bf16 A operands,
   16 pairs x 16 x 2 bf16 B operands. Per thread, before its first tile instruction. */
static inline void amx_configure_tiles(void) {
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } __attribute__((packed, aligned(64))) cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
}

/* The first n of 16 lanes (none for n <= 0). */
static inline __mmask16 first(int64_t n) { return n >= 16 ? 0xffff : n <= 0 ? 0 : (__mmask16)((1u << n) - 1); }

#endif
