#ifndef NIXFS_CZSTD_SHIM_H
#define NIXFS_CZSTD_SHIM_H
#include <zstd.h>
#include <zstd_errors.h>

// Macros Swift does not import as constants.
static inline unsigned long long nixfs_zstd_contentsize_unknown(void) { return ZSTD_CONTENTSIZE_UNKNOWN; }
static inline unsigned long long nixfs_zstd_contentsize_error(void) { return ZSTD_CONTENTSIZE_ERROR; }
#endif
