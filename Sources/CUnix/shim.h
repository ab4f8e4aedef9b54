#ifndef NIXFS_CUNIX_SHIM_H
#define NIXFS_CUNIX_SHIM_H
// Unix-socket descriptor passing (SCM_RIGHTS): the CMSG_* macros are not callable from Swift.
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

// Sends `len` bytes of `data` with descriptor `fd` attached (fd < 0: none). Returns bytes sent or -1.
static inline ssize_t nixfs_send_with_fd(int sock, const void *data, size_t len, int fd) {
  struct iovec iov = {.iov_base = (void *)data, .iov_len = len};
  struct msghdr msg;
  memset(&msg, 0, sizeof msg);
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } control;
  if (fd >= 0) {
    memset(&control, 0, sizeof control);
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof control.buf;
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof(int));
  }
  ssize_t n;
  do { n = sendmsg(sock, &msg, MSG_NOSIGNAL); } while (n < 0 && errno == EINTR);
  return n;
}

// Receives up to `len` bytes; a descriptor that came with them is stored in *fd (else -1), close-on-exec.
static inline ssize_t nixfs_recv_with_fd(int sock, void *data, size_t len, int *fd) {
  struct iovec iov = {.iov_base = data, .iov_len = len};
  struct msghdr msg;
  memset(&msg, 0, sizeof msg);
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  union { char buf[CMSG_SPACE(sizeof(int) * 4)]; struct cmsghdr align; } control;
  msg.msg_control = control.buf;
  msg.msg_controllen = sizeof control.buf;
  *fd = -1;
  ssize_t n;
  do { n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC); } while (n < 0 && errno == EINTR);
  if (n < 0) return n;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
      int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
      int fds[4];
      memcpy(fds, CMSG_DATA(c), sizeof(int) * (size_t)(count > 4 ? 4 : count));
      for (int i = 0; i < count && i < 4; i++) {
        if (*fd < 0) *fd = fds[i]; else close(fds[i]);  // one expected; never leak extras
      }
    }
  }
  return n;
}



// accept4 is declared only under _GNU_SOURCE, and defining that here would make this module's
// view of the system headers differ from every other module's (clang then refuses to merge them).
extern int accept4(int fd, struct sockaddr *addr, socklen_t *addr_len, int flags);
static inline int nixfs_accept_cloexec(int sock) { return accept4(sock, NULL, NULL, SOCK_CLOEXEC); }

// fallocate and sync_file_range: glibc declares them only under _GNU_SOURCE, which Swift's Glibc
// module is built without, so their prototypes (as glibc has them) are here.
#include <sys/types.h>
extern int fallocate(int fd, int mode, off_t offset, off_t len);
extern int sync_file_range(int fd, off_t offset, off_t nbytes, unsigned int flags);

static inline int nixfs_fallocate(int fd, int mode, long long offset, long long len) {
  return fallocate(fd, mode, (off_t)offset, (off_t)len);
}
static inline int nixfs_sync_file_range(int fd, long long offset, long long len, unsigned int flags) {
  return sync_file_range(fd, (off_t)offset, (off_t)len, flags);
}

#endif
