#ifndef NIXFS_CFUZZSUPPORT_SHIM_H
#define NIXFS_CFUZZSUPPORT_SHIM_H
#include <stddef.h>
#include <stdint.h>
// libFuzzer's entry point for programs that own main() (SwiftPM renames an executable's main).
// Only referenced in -DFUZZING builds, which link libFuzzer.
int LLVMFuzzerRunDriver(int *argc, char ***argv, int (*callback)(const uint8_t *data, size_t size));
#endif
