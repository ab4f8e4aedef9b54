#ifndef NIXFS_CLZMA_SHIM_H
#define NIXFS_CLZMA_SHIM_H
#include <lzma.h>

// LZMA_STREAM_INIT is a macro initialiser.
static inline lzma_stream nixfs_lzma_stream_init(void) {
  lzma_stream s = LZMA_STREAM_INIT;
  return s;
}

// LZMA_CONCATENATED is a UINT32_C(...) macro Swift does not import.
static inline uint32_t nixfs_lzma_concatenated(void) { return LZMA_CONCATENATED; }
#endif
