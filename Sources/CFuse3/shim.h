#ifndef NIXFS_CFUSE3_SHIM_H
#define NIXFS_CFUSE3_SHIM_H
// The low-level API of libfuse 3.12+ (Debian 12 ships 3.14).
#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>
#include <sys/stat.h>
#include <errno.h>

// fuse_session_new became a versioned macro in later libfuse releases; wrap it so Swift sees a function.
static inline struct fuse_session *nixfs_fuse_session_new(struct fuse_args *args,
    const struct fuse_lowlevel_ops *ops, size_t size, void *userdata) {
  return fuse_session_new(args, ops, size, userdata);
}

static inline int nixfs_fuse_version(void) { return fuse_version(); }

// FUSE_ARGS_INIT is a macro.
static inline struct fuse_args nixfs_fuse_args_init(int argc, char **argv) {
  struct fuse_args a = FUSE_ARGS_INIT(argc, argv);
  return a;
}
// fuse_session_loop_mt is a versioned macro.
static inline int nixfs_fuse_session_loop_mt(struct fuse_session *se, unsigned int max_threads, int clone_fd) {
  struct fuse_loop_config *config = fuse_loop_cfg_create();
  fuse_loop_cfg_set_max_threads(config, max_threads);
  fuse_loop_cfg_set_idle_threads(config, max_threads / 2 > 0 ? max_threads / 2 : 1);
  fuse_loop_cfg_set_clone_fd(config, clone_fd);
  int rc = fuse_session_loop_mt(se, config);
  fuse_loop_cfg_destroy(config);
  return rc;
}

// fuse_file_info's flags are bitfields; set them in C.
static inline void nixfs_fuse_fi_set_cache(struct fuse_file_info *fi, int keep_cache, int cache_readdir) {
  fi->keep_cache = keep_cache;
  fi->cache_readdir = cache_readdir;
}
#endif
