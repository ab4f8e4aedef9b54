#ifndef NIXFS_CLZMA_SHIM_H
#define NIXFS_CLZMA_SHIM_H
#include <lzma.h>

// LZMA_STREAM_INIT is a macro initialiser.
static inline lzma_stream nixfs_lzma_stream_init(void) {
  lzma_stream s = LZMA_STREAM_INIT;
  return s;
}
#endif
