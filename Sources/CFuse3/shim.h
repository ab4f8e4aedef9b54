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
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/epoll.h>

// The state of nixfs's /dev/fuse I/O, shared by every worker thread and the takeover code. It
// lives in Swift (StoreFS/FuseSession.swift defines the accessor): a `static` variable in this
// header would be one copy per object file that inlines these functions, and an optimised build
// does inline them into several.
//
// Takeover (see StoreFS/Handover.swift). libfuse's low-level API cannot start a session on a
// connection another process initialised: a successor would wait for a FUSE_INIT the kernel sent
// long ago. So the first daemon keeps the kernel's INIT request (`init_request`); a successor's
// first read returns that request again (`replay`), libfuse initialises from it as the first
// daemon did, and the reply, which the kernel does not expect, is dropped. `stop_fd` is an
// eventfd that, while readable, makes every worker's next read end the session loop without
// taking a request from the kernel (the handover stops reading; the successor reads on). Once
// `muted` is set, replies are dropped: requests this daemon had read but not answered are the
// successor's, resent to it by the kernel (FUSE_NOTIFY_RESEND).
struct nixfs_fuse_io_state {
  uint64_t init_unique;
  int want_parallel_dirops;
  int init_request_len;
  unsigned char init_request[512];
  int replay_len;
  uint64_t replay_unique;
  unsigned char replay[512];
  int stop_fd;
  int stopping;
  int muted;
  // Passthrough (see below): asked for by the filesystem, offered by the kernel's INIT, and
  // set in the INIT reply this daemon sent (or, for a successor, as its journal says).
  int want_passthrough;
  int kernel_offers_passthrough;
  int passthrough;
  int init_answered;
};
extern struct nixfs_fuse_io_state *nixfs_fuse_io_state(void);
#define NIXFS_IO (nixfs_fuse_io_state())

static inline ssize_t nixfs_fuse_io_read(int fd, void *buf, size_t len, void *userdata) {
  (void)userdata;
  int replay = __atomic_exchange_n(&NIXFS_IO->replay_len, 0, __ATOMIC_SEQ_CST);
  if (replay > 0 && (size_t)replay <= len) {
    memcpy(buf, NIXFS_IO->replay, (size_t)replay);
    return replay;
  }
  // The descriptor is non-blocking (see below). A worker waits in its own epoll, where a stop is
  // seen (a worker asleep in read would sleep through it), then reads. The descriptor is
  // registered EPOLLEXCLUSIVE, so a request wakes one waiting worker, as a blocking read would,
  // not all of them.
  static __thread int epoll_fd = -1;
  ssize_t n;
  for (;;) {
    if (epoll_fd < 0) {
      int ep = epoll_create1(EPOLL_CLOEXEC);
      if (ep < 0) return -1;
      struct epoll_event request = {.events = EPOLLIN | EPOLLEXCLUSIVE, .data = {.fd = fd}};
      struct epoll_event stop = {.events = EPOLLIN, .data = {.fd = -1}};
      if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &request) != 0 ||
          epoll_ctl(ep, EPOLL_CTL_ADD, __atomic_load_n(&NIXFS_IO->stop_fd, __ATOMIC_SEQ_CST), &stop) != 0) {
        close(ep);
        return -1;
      }
      epoll_fd = ep;
    }
    // Waiting first: a worker comes back to an empty queue more often than to a full one, and
    // a read that finds nothing is a wasted call.
    struct epoll_event ready[2];
    if (epoll_wait(epoll_fd, ready, 2, -1) < 0 && errno != EINTR) return -1;
    if (__atomic_load_n(&NIXFS_IO->stopping, __ATOMIC_SEQ_CST)) {
      errno = ENODEV;  // libfuse ends the loop on ENODEV
      return -1;
    }
    n = read(fd, buf, len);
    if (n >= 0 || errno != EAGAIN) break;
  }
  if (n >= 16) {
    uint32_t opcode;
    memcpy(&opcode, (char *)buf + 4, 4);
    if (opcode == 26 /* FUSE_INIT */) {
      uint64_t unique;
      memcpy(&unique, (char *)buf + 8, 8);
      if ((size_t)n <= 512) {
        memcpy(NIXFS_IO->init_request, buf, (size_t)n);
        __atomic_store_n(&NIXFS_IO->init_request_len, (int)n, __ATOMIC_SEQ_CST);
      }
      __atomic_store_n(&NIXFS_IO->init_unique, unique, __ATOMIC_SEQ_CST);
      // fuse_init_in after the 40-byte header: major, minor, max_readahead, flags, flags2.
      if (n >= 40 + 20) {
        uint32_t flags, flags2;
        memcpy(&flags, (char *)buf + 40 + 12, 4);
        memcpy(&flags2, (char *)buf + 40 + 16, 4);
        int offered = (flags & (1u << 30)) /* FUSE_INIT_EXT */ && (flags2 & (1u << 5)) /* FUSE_PASSTHROUGH */;
        __atomic_store_n(&NIXFS_IO->kernel_offers_passthrough, offered, __ATOMIC_SEQ_CST);
      }
    }
  }
  return n;
}

static inline ssize_t nixfs_fuse_iov_total(const struct iovec *iov, int count) {
  ssize_t total = 0;
  for (int i = 0; i < count; i++) total += (ssize_t)iov[i].iov_len;
  return total;
}

static inline ssize_t nixfs_fuse_io_writev(int fd, struct iovec *iov, int count, void *userdata) {
  (void)userdata;
  if (__atomic_load_n(&NIXFS_IO->muted, __ATOMIC_SEQ_CST)) return nixfs_fuse_iov_total(iov, count);
  if (count >= 1 && iov[0].iov_len == 16) {
    uint64_t unique;
    memcpy(&unique, (char *)iov[0].iov_base + 8, 8);
    uint64_t replayed = __atomic_load_n(&NIXFS_IO->replay_unique, __ATOMIC_SEQ_CST);
    if (replayed != 0 && unique == replayed) {
      // The reply to a replayed INIT: the kernel finished INIT with the first daemon.
      __atomic_store_n(&NIXFS_IO->replay_unique, 0, __ATOMIC_SEQ_CST);
      return nixfs_fuse_iov_total(iov, count);
    }
  }
  uint64_t init = __atomic_load_n(&NIXFS_IO->init_unique, __ATOMIC_SEQ_CST);
  if (init != 0 && count >= 2 && iov[0].iov_len == 16 && iov[1].iov_len >= 16) {
    uint64_t unique;
    int32_t error;
    memcpy(&unique, (char *)iov[0].iov_base + 8, 8);
    memcpy(&error, (char *)iov[0].iov_base + 4, 4);
    if (unique == init && error == 0) {
      __atomic_store_n(&NIXFS_IO->init_unique, 0, __ATOMIC_SEQ_CST);
      if (NIXFS_IO->want_parallel_dirops) {
        uint32_t flags;
        memcpy(&flags, (char *)iov[1].iov_base + 12, 4);
        flags |= (1u << 18); /* FUSE_PARALLEL_DIROPS */
        memcpy((char *)iov[1].iov_base + 12, &flags, 4);
      }
      // Passthrough (Linux 6.9+): FUSE_PASSTHROUGH in flags2 (offset 32 of fuse_init_out, so
      // FUSE_INIT_EXT too) and max_stack_depth 1 (offset 36): backing files sit on a plain file
      // system, and overlayfs may still stack on this mount. Never with the writeback cache.
      uint32_t flags;
      memcpy(&flags, (char *)iov[1].iov_base + 12, 4);
      if (NIXFS_IO->want_passthrough && __atomic_load_n(&NIXFS_IO->kernel_offers_passthrough, __ATOMIC_SEQ_CST) &&
          iov[1].iov_len >= 40 && !(flags & (1u << 16)) /* FUSE_WRITEBACK_CACHE */) {
        uint32_t flags2, depth = 1;
        flags |= (1u << 30);
        memcpy((char *)iov[1].iov_base + 12, &flags, 4);
        memcpy(&flags2, (char *)iov[1].iov_base + 32, 4);
        flags2 |= (1u << 5);
        memcpy((char *)iov[1].iov_base + 32, &flags2, 4);
        memcpy((char *)iov[1].iov_base + 36, &depth, 4);
        __atomic_store_n(&NIXFS_IO->passthrough, 1, __ATOMIC_SEQ_CST);
      }
      __atomic_store_n(&NIXFS_IO->init_answered, 1, __ATOMIC_SEQ_CST);
    }
  }
  return writev(fd, iov, count);
}

// Route the session's /dev/fuse traffic through the functions above: after fuse_session_mount
// with the mount's own descriptor, or, for a successor, with the descriptor it was handed.
static inline int nixfs_fuse_session_custom_io(struct fuse_session *se, int fd, int parallel_dirops) {
  NIXFS_IO->want_parallel_dirops = parallel_dirops;
  // O_NONBLOCK is shared with every holder of the connection (keeper, successor); all of them
  // read through this function, which waits in poll.
  int flags = fcntl(fd, F_GETFL);
  if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) return -1;
  if (__atomic_load_n(&NIXFS_IO->stop_fd, __ATOMIC_SEQ_CST) < 0) {
    int e = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (e < 0) return -1;
    __atomic_store_n(&NIXFS_IO->stop_fd, e, __ATOMIC_SEQ_CST);
  }
  struct fuse_custom_io io;
  memset(&io, 0, sizeof io);
  io.read = nixfs_fuse_io_read;
  io.writev = nixfs_fuse_io_writev;
  return fuse_session_custom_io(se, &io, fd);
}

// The kernel's INIT request as this daemon (or the one it took over from) received it.
static inline int nixfs_fuse_init_request_copy(unsigned char *out, int capacity) {
  int n = __atomic_load_n(&NIXFS_IO->init_request_len, __ATOMIC_SEQ_CST);
  if (n <= 0 || n > capacity) return 0;
  memcpy(out, NIXFS_IO->init_request, (size_t)n);
  return n;
}

// Arms the replay of `request` (an INIT request of `len` bytes) as the session's first read.
static inline int nixfs_fuse_replay_init(const unsigned char *request, int len) {
  if (len < 16 + 8 || len > 512) return -1;
  uint32_t opcode;
  memcpy(&opcode, request + 4, 4);
  if (opcode != 26) return -1;
  memcpy(NIXFS_IO->init_request, request, (size_t)len);
  __atomic_store_n(&NIXFS_IO->init_request_len, len, __ATOMIC_SEQ_CST);
  memcpy(NIXFS_IO->replay, request, (size_t)len);
  uint64_t unique;
  memcpy(&unique, request + 8, 8);
  __atomic_store_n(&NIXFS_IO->replay_unique, unique, __ATOMIC_SEQ_CST);
  __atomic_store_n(&NIXFS_IO->replay_len, len, __ATOMIC_SEQ_CST);
  return 0;
}

// Makes every worker's read end the session loop (until `nixfs_fuse_resume`).
static inline void nixfs_fuse_stop(void) {
  __atomic_store_n(&NIXFS_IO->stopping, 1, __ATOMIC_SEQ_CST);
  uint64_t one = 1;
  ssize_t n = write(__atomic_load_n(&NIXFS_IO->stop_fd, __ATOMIC_SEQ_CST), &one, sizeof one);
  (void)n;
}

// Undoes a stop and a mute (a handover that failed).
static inline void nixfs_fuse_resume(void) {
  uint64_t count;
  ssize_t n = read(__atomic_load_n(&NIXFS_IO->stop_fd, __ATOMIC_SEQ_CST), &count, sizeof count);
  (void)n;
  __atomic_store_n(&NIXFS_IO->stopping, 0, __ATOMIC_SEQ_CST);
  __atomic_store_n(&NIXFS_IO->muted, 0, __ATOMIC_SEQ_CST);
}
static inline void nixfs_fuse_set_muted(int muted) { __atomic_store_n(&NIXFS_IO->muted, muted, __ATOMIC_SEQ_CST); }

// FUSE_NOTIFY_RESEND (Linux 6.9+, notify code 7): the kernel queues every request that was read
// but not answered again, so the ones a dead or departed daemon held are answered by this one.
// Returns 0, or -errno (EINVAL on kernels without it).
static inline int nixfs_fuse_notify_resend(int fd) {
  struct { uint32_t len; int32_t error; uint64_t unique; } out = {16, 7, 0};
  ssize_t n = write(fd, &out, sizeof out);
  return n == (ssize_t)sizeof out ? 0 : -errno;
}

// Passthrough's device ioctls (linux/fuse.h, 6.9+; Debian 12's headers predate them):
// FUSE_DEV_IOC_BACKING_OPEN = _IOW(229, 1, struct fuse_backing_map {int32 fd; uint32 flags;
// uint64 padding}) returns a backing id > 0; FUSE_DEV_IOC_BACKING_CLOSE = _IOW(229, 2, uint32).
#include <sys/ioctl.h>
struct nixfs_fuse_backing_map { int32_t fd; uint32_t flags; uint64_t padding; };
static inline void nixfs_fuse_set_want_passthrough(int want) {
  __atomic_store_n(&NIXFS_IO->want_passthrough, want, __ATOMIC_SEQ_CST);
}
static inline int nixfs_fuse_init_answered(void) { return __atomic_load_n(&NIXFS_IO->init_answered, __ATOMIC_SEQ_CST); }
static inline int nixfs_fuse_passthrough(void) { return __atomic_load_n(&NIXFS_IO->passthrough, __ATOMIC_SEQ_CST); }
static inline int nixfs_fuse_kernel_offers_passthrough(void) {
  return __atomic_load_n(&NIXFS_IO->kernel_offers_passthrough, __ATOMIC_SEQ_CST);
}
// A successor learns from its predecessor's journal that the connection has passthrough.
static inline void nixfs_fuse_set_passthrough(int on) { __atomic_store_n(&NIXFS_IO->passthrough, on, __ATOMIC_SEQ_CST); }
// Returns the backing id (> 0), or -errno.
static inline int nixfs_fuse_backing_open(int devfd, int fd) {
  struct nixfs_fuse_backing_map map = {.fd = fd, .flags = 0, .padding = 0};
  int r = ioctl(devfd, _IOW(229, 1, struct nixfs_fuse_backing_map), &map);
  return r > 0 ? r : (r == 0 ? -EINVAL : -errno);
}
static inline int nixfs_fuse_backing_close(int devfd, int backing_id) {
  uint32_t id = (uint32_t)backing_id;
  return ioctl(devfd, _IOW(229, 2, uint32_t), &id) == 0 ? 0 : -errno;
}
// An OPEN answered with passthrough: fuse_open_out {u64 fh; u32 open_flags; i32 backing_id} with
// FOPEN_PASSTHROUGH (1 << 7) alone (KEEP_CACHE with it fails the open). libfuse 3.14's
// fuse_reply_open cannot set backing_id (its padding then), so the reply is written whole.
static inline int nixfs_fuse_reply_open_passthrough(fuse_req_t req, uint64_t fh, int32_t backing_id) {
  struct { uint64_t fh; uint32_t open_flags; int32_t backing_id; } out = {fh, 1u << 7, backing_id};
  struct iovec iov = {.iov_base = &out, .iov_len = sizeof out};
  return fuse_reply_iov(req, &iov, 1);
}

// fuse_file_info's flags are bitfields; set them in C.
static inline void nixfs_fuse_fi_set_cache(struct fuse_file_info *fi, int keep_cache, int cache_readdir) {
  fi->keep_cache = keep_cache;
  fi->cache_readdir = cache_readdir;
}
#endif
