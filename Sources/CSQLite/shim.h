#ifndef NIXFS_CSQLITE_SHIM_H
#define NIXFS_CSQLITE_SHIM_H
#include <sqlite3.h>

// SQLITE_TRANSIENT / SQLITE_STATIC are casts of integers to function pointers.
static inline sqlite3_destructor_type nixfs_sqlite_transient(void) { return SQLITE_TRANSIENT; }
static inline sqlite3_destructor_type nixfs_sqlite_static(void) { return SQLITE_STATIC; }
#endif
