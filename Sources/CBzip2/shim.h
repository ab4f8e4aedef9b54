#ifndef NIXFS_CBZIP2_SHIM_H
#define NIXFS_CBZIP2_SHIM_H
#include <bzlib.h>
#endif
