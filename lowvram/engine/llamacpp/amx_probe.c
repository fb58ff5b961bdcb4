/*
 * Does Intel AMX run here? Exit 0 if a tile load runs, 2 if the kernel refuses the tile
 * state; a CPU or hypervisor that advertises AMX but cannot run it kills this with SIGILL,
 * as it would kill llama.cpp's AMX matmul (seen on a Firecracker VM whose CPUID lists
 * amx_tile and whose arch_prctl grants the permission).
 *
 * Built with -mamx-tile beside llama.cpp (build.py) and run before each engine start.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

struct tile_config {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

int main(void) {
    static uint8_t data[16 * 64];
    struct tile_config config;
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) {
        return 2;
    }
    memset(&config, 0, sizeof config);
    config.palette_id = 1;
    config.rows[0] = 16;
    config.colsb[0] = 64;
    _tile_loadconfig(&config);
    _tile_loadd(0, data, 64);
    _tile_release();
    return 0;
}
