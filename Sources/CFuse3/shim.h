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

// libfuse before 3.17 never passes FUSE_PARALLEL_DIROPS to the kernel in its INIT reply (fixed
// upstream by "Pass FUSE_PARALLEL_DIROPS to kernel", #861), whatever the filesystem asks for, so
// the kernel serialises every lookup and readdir in a directory: one lookup waiting for a slow NAR
// held up every other new path under /nix/store. This custom I/O reads and writes /dev/fuse
// exactly as libfuse does, and sets that one flag in the INIT reply when the filesystem wants it.
// Offsets are those of the kernel ABI (linux/fuse.h): fuse_in_header {len, opcode, unique, ...},
// fuse_out_header {len, error, unique}, fuse_init_out {major, minor, max_readahead, flags, ...}.
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

static uint64_t nixfs_fuse_init_unique = 0;
static int nixfs_fuse_want_parallel_dirops = 0;

static inline ssize_t nixfs_fuse_io_read(int fd, void *buf, size_t len, void *userdata) {
  (void)userdata;
  ssize_t n = read(fd, buf, len);
  if (n >= 16) {
    uint32_t opcode;
    memcpy(&opcode, (char *)buf + 4, 4);
    if (opcode == 26 /* FUSE_INIT */) {
      uint64_t unique;
      memcpy(&unique, (char *)buf + 8, 8);
      __atomic_store_n(&nixfs_fuse_init_unique, unique, __ATOMIC_SEQ_CST);
    }
  }
  return n;
}

static inline ssize_t nixfs_fuse_io_writev(int fd, struct iovec *iov, int count, void *userdata) {
  (void)userdata;
  uint64_t init = __atomic_load_n(&nixfs_fuse_init_unique, __ATOMIC_SEQ_CST);
  if (init != 0 && count >= 2 && iov[0].iov_len == 16 && iov[1].iov_len >= 16) {
    uint64_t unique;
    int32_t error;
    memcpy(&unique, (char *)iov[0].iov_base + 8, 8);
    memcpy(&error, (char *)iov[0].iov_base + 4, 4);
    if (unique == init && error == 0) {
      __atomic_store_n(&nixfs_fuse_init_unique, 0, __ATOMIC_SEQ_CST);
      if (nixfs_fuse_want_parallel_dirops) {
        uint32_t flags;
        memcpy(&flags, (char *)iov[1].iov_base + 12, 4);
        flags |= (1u << 18); /* FUSE_PARALLEL_DIROPS */
        memcpy((char *)iov[1].iov_base + 12, &flags, 4);
      }
    }
  }
  return writev(fd, iov, count);
}

// After fuse_session_mount: route the session's /dev/fuse traffic through the functions above.
static inline int nixfs_fuse_session_parallel_dirops(struct fuse_session *se, int enable) {
  nixfs_fuse_want_parallel_dirops = enable;
  struct fuse_custom_io io;
  memset(&io, 0, sizeof io);
  io.read = nixfs_fuse_io_read;
  io.writev = nixfs_fuse_io_writev;
  return fuse_session_custom_io(se, &io, fuse_session_fd(se));
}

// fuse_file_info's flags are bitfields; set them in C.
static inline void nixfs_fuse_fi_set_cache(struct fuse_file_info *fi, int keep_cache, int cache_readdir) {
  fi->keep_cache = keep_cache;
  fi->cache_readdir = cache_readdir;
}
#endif
