/*
 * vdisk_native: the few Linux system calls Node's fs module does not offer.
 *
 * - preadv2(RWF_NOWAIT): read only if the data is already in the page cache.
 *   This lets the file driver serve hot data synchronously on the event loop
 *   (no thread-pool round trip) and send only cold reads to the pool.
 * - pread/pwrite on the event loop, returning -errno instead of throwing.
 * - fallocate (punch hole, zero range), lseek SEEK_DATA/SEEK_HOLE, BLKDISCARD,
 *   BLKZEROOUT, pwritev2(RWF_DSYNC) for FUA, fdatasync: as promises run on the
 *   libuv thread pool, because each of them may block on the disk.
 * - Open file description locks (F_OFD_SETLK / F_OFD_GETLK) on single bytes,
 *   the scheme QEMU's file-posix driver uses, so QEMU and vdisk see each other.
 * - Block device geometry (BLKGETSIZE64, BLKSSZGET, BLKPBSZGET) and memory
 *   aligned for O_DIRECT.
 * - For the FUSE export (src/fuse/): mount(2) and umount2(2) (on the thread
 *   pool, so the event loop never waits on a mount), plain read(2)/write(2)
 *   on /dev/fuse, and a uv_poll watcher that calls JavaScript on the event
 *   loop when /dev/fuse has requests.
 * - For the NBD server: dup(2) of a client socket, which it then reads with
 *   read(2) under the same uv_poll watcher (straight into WRITE payloads).
 * - sd_notify(3)'s datagram to $NOTIFY_SOCKET (node:net has no datagram unix sockets).
 *
 * Every function returns a negative errno on failure rather than throwing: the
 * JavaScript side turns it into a VdiskError with the right errno name, and
 * no exception object is built on paths that fail routinely (EAGAIN).
 */
#include <node_api.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <stddef.h>
#include <unistd.h>
#include <uv.h>

#define CHECK(call)                                                            \
  do {                                                                         \
    if ((call) != napi_ok) {                                                   \
      napi_throw_error(env, NULL, "vdisk_native: " #call " failed");          \
      return NULL;                                                             \
    }                                                                          \
  } while (0)

/* ---- argument helpers ---------------------------------------------------- */

static int get_i64(napi_env env, napi_value v, int64_t *out) {
  return napi_get_value_int64(env, v, out) == napi_ok;
}

static napi_value make_i64(napi_env env, int64_t v) {
  napi_value r;
  napi_create_int64(env, v, &r);
  return r;
}

/* Reads (buffer, bufOffset, length) and checks the window lies inside the
 * buffer, so a bad call from JavaScript cannot make the kernel touch memory
 * outside it. */
static int get_window(napi_env env, napi_value vbuf, napi_value voff,
                      napi_value vlen, char **ptr, size_t *len) {
  void *data;
  size_t size;
  int64_t off, n;
  if (napi_get_buffer_info(env, vbuf, &data, &size) != napi_ok) return 0;
  if (!get_i64(env, voff, &off) || !get_i64(env, vlen, &n)) return 0;
  if (off < 0 || n < 0 || (uint64_t)off + (uint64_t)n > size) return 0;
  *ptr = (char *)data + off;
  *len = (size_t)n;
  return 1;
}

/* pread/pwrite until done: the kernel may return short counts for large
 * requests or on signals. A read that hits end of file returns the count. */
static int64_t full_pread(int fd, char *p, size_t len, int64_t pos, int flags) {
  size_t done = 0;
  while (done < len) {
    struct iovec iov = {p + done, len - done};
    ssize_t r = preadv2(fd, &iov, 1, pos + (int64_t)done, flags);
    if (r < 0) {
      if (errno == EINTR) continue;
      /* A NOWAIT read that got part of the data and then would block: report
       * would-block; the caller retries the whole request on the pool. */
      return -errno;
    }
    if (r == 0) break;
    done += (size_t)r;
  }
  return (int64_t)done;
}

static int64_t full_pwrite(int fd, const char *p, size_t len, int64_t pos,
                           int flags) {
  size_t done = 0;
  while (done < len) {
    struct iovec iov = {(void *)(p + done), len - done};
    ssize_t r = pwritev2(fd, &iov, 1, pos + (int64_t)done, flags);
    if (r < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (r == 0) return -EIO;
    done += (size_t)r;
  }
  return (int64_t)done;
}

/* ---- synchronous calls --------------------------------------------------- */

/* preadNowait(fd, buf, bufOffset, length, position) -> bytes | -errno
 * -EAGAIN means some of the range is not in the page cache. */
static napi_value js_pread_nowait(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  int64_t fd, pos;
  char *p;
  size_t len;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 5 || !get_i64(env, argv[0], &fd) ||
      !get_window(env, argv[1], argv[2], argv[3], &p, &len) ||
      !get_i64(env, argv[4], &pos))
    return make_i64(env, -EINVAL);
  return make_i64(env, full_pread((int)fd, p, len, pos, RWF_NOWAIT));
}

/* preadSync(fd, buf, bufOffset, length, position) -> bytes | -errno */
static napi_value js_pread_sync(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  int64_t fd, pos;
  char *p;
  size_t len;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 5 || !get_i64(env, argv[0], &fd) ||
      !get_window(env, argv[1], argv[2], argv[3], &p, &len) ||
      !get_i64(env, argv[4], &pos))
    return make_i64(env, -EINVAL);
  return make_i64(env, full_pread((int)fd, p, len, pos, 0));
}

/* pwriteSync(fd, buf, bufOffset, length, position) -> bytes | -errno */
static napi_value js_pwrite_sync(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  int64_t fd, pos;
  char *p;
  size_t len;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 5 || !get_i64(env, argv[0], &fd) ||
      !get_window(env, argv[1], argv[2], argv[3], &p, &len) ||
      !get_i64(env, argv[4], &pos))
    return make_i64(env, -EINVAL);
  return make_i64(env, full_pwrite((int)fd, p, len, pos, 0));
}

/* seekSync(fd, offset, whence) -> offset | -errno
 * SEEK_DATA / SEEK_HOLE on the event loop: QEMU calls lseek inline too; it
 * reads extent maps the file system keeps cached, and a pool round trip
 * would cost more than the call. */
static napi_value js_seek_sync(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  int64_t fd, off, whence;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 3 || !get_i64(env, argv[0], &fd) || !get_i64(env, argv[1], &off) ||
      !get_i64(env, argv[2], &whence))
    return make_i64(env, -EINVAL);
  off_t r = lseek((int)fd, (off_t)off, (int)whence);
  return make_i64(env, r < 0 ? -errno : (int64_t)r);
}

/* setSocketBuffers(fd, sendBytes, receiveBytes) -> 0 | -errno
 * Larger socket buffers let a 1 MiB reply go out in fewer wake-ups of the
 * event loop (0 leaves a direction unchanged). */
static napi_value js_set_socket_buffers(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  int64_t fd, snd, rcv;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 3 || !get_i64(env, argv[0], &fd) || !get_i64(env, argv[1], &snd) ||
      !get_i64(env, argv[2], &rcv))
    return make_i64(env, -EINVAL);
  int v;
  if (snd > 0) {
    v = (int)snd;
    if (setsockopt((int)fd, SOL_SOCKET, SO_SNDBUF, &v, sizeof v) < 0) return make_i64(env, -errno);
  }
  if (rcv > 0) {
    v = (int)rcv;
    if (setsockopt((int)fd, SOL_SOCKET, SO_RCVBUF, &v, sizeof v) < 0) return make_i64(env, -errno);
  }
  return make_i64(env, 0);
}

/* ofdLock(fd, start, length, type) -> 0 | -errno
 * type: 0 unlock, 1 shared, 2 exclusive. Never waits. */
static napi_value js_ofd_lock(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  int64_t fd, start, length, type;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 4 || !get_i64(env, argv[0], &fd) ||
      !get_i64(env, argv[1], &start) || !get_i64(env, argv[2], &length) ||
      !get_i64(env, argv[3], &type))
    return make_i64(env, -EINVAL);
  struct flock fl;
  memset(&fl, 0, sizeof fl);
  fl.l_whence = SEEK_SET;
  fl.l_start = start;
  fl.l_len = length;
  fl.l_type = type == 0 ? F_UNLCK : type == 1 ? F_RDLCK : F_WRLCK;
  if (fcntl((int)fd, F_OFD_SETLK, &fl) < 0) return make_i64(env, -errno);
  return make_i64(env, 0);
}

/* ofdTest(fd, start, length, type) -> 0 free | 1 conflict | -errno
 * Asks whether a lock of the given type could be taken now. */
static napi_value js_ofd_test(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  int64_t fd, start, length, type;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 4 || !get_i64(env, argv[0], &fd) ||
      !get_i64(env, argv[1], &start) || !get_i64(env, argv[2], &length) ||
      !get_i64(env, argv[3], &type))
    return make_i64(env, -EINVAL);
  struct flock fl;
  memset(&fl, 0, sizeof fl);
  fl.l_whence = SEEK_SET;
  fl.l_start = start;
  fl.l_len = length;
  fl.l_type = type == 1 ? F_RDLCK : F_WRLCK;
  if (fcntl((int)fd, F_OFD_GETLK, &fl) < 0) return make_i64(env, -errno);
  return make_i64(env, fl.l_type == F_UNLCK ? 0 : 1);
}

/* blockDeviceInfo(fd) -> [size, logicalBlockSize, physicalBlockSize] | -errno */
static napi_value js_blockdev_info(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], arr;
  int64_t fd;
  uint64_t size = 0;
  int lbs = 512;
  unsigned int pbs = 512;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 1 || !get_i64(env, argv[0], &fd)) return make_i64(env, -EINVAL);
  if (ioctl((int)fd, BLKGETSIZE64, &size) < 0) return make_i64(env, -errno);
  if (ioctl((int)fd, BLKSSZGET, &lbs) < 0) lbs = 512;
  if (ioctl((int)fd, BLKPBSZGET, &pbs) < 0) pbs = (unsigned int)lbs;
  CHECK(napi_create_array_with_length(env, 3, &arr));
  CHECK(napi_set_element(env, arr, 0, make_i64(env, (int64_t)size)));
  CHECK(napi_set_element(env, arr, 1, make_i64(env, lbs)));
  CHECK(napi_set_element(env, arr, 2, make_i64(env, pbs)));
  return arr;
}

static void free_aligned(napi_env env, void *data, void *hint) { free(data); }

/* alignedBuffer(size, alignment) -> Buffer whose memory is aligned, for
 * O_DIRECT. The memory is zeroed so nothing stale can leak to a client. */
static napi_value js_aligned_buffer(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2], buf;
  int64_t size, align;
  void *mem = NULL;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 2 || !get_i64(env, argv[0], &size) ||
      !get_i64(env, argv[1], &align) || size < 0 || align < 8 ||
      (align & (align - 1)) != 0) {
    napi_throw_range_error(env, NULL, "alignedBuffer: bad size or alignment");
    return NULL;
  }
  if (posix_memalign(&mem, (size_t)align, size ? (size_t)size : 1) != 0) {
    napi_throw_error(env, "ENOMEM", "alignedBuffer: out of memory");
    return NULL;
  }
  memset(mem, 0, size ? (size_t)size : 1);
  CHECK(napi_create_external_buffer(env, (size_t)size, mem, free_aligned, NULL,
                                    &buf));
  return buf;
}

/* ---- calls run on the thread pool ---------------------------------------- */

enum op {
  OP_PREAD = 1,
  OP_PWRITE = 2,     /* flags: 1 = RWF_DSYNC (FUA) */
  OP_FDATASYNC = 3,
  OP_FSYNC = 4,
  OP_FALLOCATE = 5,  /* flags: fallocate mode */
  OP_SEEK = 6,       /* flags: whence (SEEK_DATA / SEEK_HOLE) */
  OP_BLKDISCARD = 7,
  OP_BLKZEROOUT = 8,
  OP_MOUNT = 9,      /* buf: "source\0target\0fstype\0data\0"; flags: mountflags */
  OP_UMOUNT = 10,    /* buf: "target\0"; flags: umount2 flags */
};

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  napi_ref buf_ref; /* keeps the buffer alive while the thread uses it */
  int op, fd, flags;
  char *ptr;
  size_t len;
  int64_t pos;
  int64_t result;
} request;

static void run_request(napi_env env, void *data) {
  request *r = (request *)data;
  switch (r->op) {
  case OP_PREAD:
    r->result = full_pread(r->fd, r->ptr, r->len, r->pos, 0);
    break;
  case OP_PWRITE:
    r->result = full_pwrite(r->fd, r->ptr, r->len, r->pos,
                            (r->flags & 1) ? RWF_DSYNC : 0);
    break;
  case OP_FDATASYNC:
    r->result = fdatasync(r->fd) < 0 ? -errno : 0;
    break;
  case OP_FSYNC:
    r->result = fsync(r->fd) < 0 ? -errno : 0;
    break;
  case OP_FALLOCATE:
    do {
      r->result = fallocate(r->fd, r->flags, r->pos, (off_t)r->len) < 0 ? -errno : 0;
    } while (r->result == -EINTR);
    break;
  case OP_SEEK: {
    off_t o = lseek(r->fd, r->pos, r->flags);
    r->result = o < 0 ? -errno : (int64_t)o;
    break;
  }
  case OP_BLKDISCARD:
  case OP_BLKZEROOUT: {
    uint64_t range[2] = {(uint64_t)r->pos, (uint64_t)r->len};
    int rc = ioctl(r->fd, r->op == OP_BLKDISCARD ? BLKDISCARD : BLKZEROOUT, range);
    r->result = rc < 0 ? -errno : 0;
    break;
  }
  case OP_MOUNT:
  case OP_UMOUNT: {
    /* The buffer holds NUL-terminated strings; refuse one that is not. */
    const char *f[4] = {NULL, NULL, NULL, NULL};
    int want = r->op == OP_MOUNT ? 4 : 1, got = 0;
    size_t i = 0;
    while (got < want && i < r->len) {
      f[got++] = r->ptr + i;
      while (i < r->len && r->ptr[i]) i++;
      if (i == r->len) { got = -1; break; }
      i++;
    }
    if (got != want) { r->result = -EINVAL; break; }
    int rc = r->op == OP_MOUNT
                 ? mount(f[0], f[1], f[2], (unsigned long)r->flags, f[3])
                 : umount2(f[0], r->flags);
    r->result = rc < 0 ? -errno : 0;
    break;
  }
  default:
    r->result = -EINVAL;
  }
}

static void finish_request(napi_env env, napi_status status, void *data) {
  request *r = (request *)data;
  napi_value v;
  if (status == napi_ok) {
    napi_create_int64(env, r->result, &v);
  } else {
    napi_create_int64(env, -ECANCELED, &v);
  }
  napi_resolve_deferred(env, r->deferred, v);
  if (r->buf_ref) napi_delete_reference(env, r->buf_ref);
  napi_delete_async_work(env, r->work);
  free(r);
}

/* submit(op, fd, buf|null, bufOffset, length, position, flags)
 *   -> Promise<number>: result >= 0, or -errno. Never rejects. */
static napi_value js_submit(napi_env env, napi_callback_info info) {
  size_t argc = 7;
  napi_value argv[7], promise, name;
  int64_t op, fd, pos, flags, off, len;
  napi_valuetype t;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 7 || !get_i64(env, argv[0], &op) || !get_i64(env, argv[1], &fd) ||
      !get_i64(env, argv[3], &off) || !get_i64(env, argv[4], &len) ||
      !get_i64(env, argv[5], &pos) || !get_i64(env, argv[6], &flags) ||
      len < 0 || off < 0) {
    napi_throw_type_error(env, NULL, "submit: bad arguments");
    return NULL;
  }
  request *r = (request *)calloc(1, sizeof *r);
  if (!r) {
    napi_throw_error(env, "ENOMEM", "submit: out of memory");
    return NULL;
  }
  r->op = (int)op;
  r->fd = (int)fd;
  r->flags = (int)flags;
  r->pos = pos;
  r->len = (size_t)len;
  CHECK(napi_typeof(env, argv[2], &t));
  if (t != napi_null && t != napi_undefined) {
    if (!get_window(env, argv[2], argv[3], argv[4], &r->ptr, &r->len)) {
      free(r);
      napi_throw_range_error(env, NULL, "submit: window outside buffer");
      return NULL;
    }
    CHECK(napi_create_reference(env, argv[2], 1, &r->buf_ref));
  } else if (op == OP_PREAD || op == OP_PWRITE) {
    free(r);
    napi_throw_type_error(env, NULL, "submit: read/write needs a buffer");
    return NULL;
  }
  CHECK(napi_create_promise(env, &r->deferred, &promise));
  CHECK(napi_create_string_utf8(env, "vdisk-io", NAPI_AUTO_LENGTH, &name));
  CHECK(napi_create_async_work(env, NULL, name, run_request, finish_request, r,
                               &r->work));
  CHECK(napi_queue_async_work(env, r->work));
  return promise;
}

/* ---- FUSE: /dev/fuse I/O and its watcher ---------------------------------- */

/* readFd(fd, buf, bufOffset, length) -> bytes | -errno (one read(2); /dev/fuse
 * returns exactly one request per read) */
static napi_value js_read_fd(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  int64_t fd;
  char *p;
  size_t len;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 4 || !get_i64(env, argv[0], &fd) ||
      !get_window(env, argv[1], argv[2], argv[3], &p, &len))
    return make_i64(env, -EINVAL);
  ssize_t r = read((int)fd, p, len);
  return make_i64(env, r < 0 ? -errno : (int64_t)r);
}

/* dupFd(fd) -> new fd | -errno (close-on-exec). The NBD server reads a client
 * socket through a duplicate watched by its own poll handle: libuv allows one
 * watcher per descriptor, and the original stays the net.Socket's. */
static napi_value js_dup_fd(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  int64_t fd;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 1 || !get_i64(env, argv[0], &fd)) return make_i64(env, -EINVAL);
  int r = fcntl((int)fd, F_DUPFD_CLOEXEC, 0);
  return make_i64(env, r < 0 ? -errno : r);
}

/* writeFd(fd, buf, bufOffset, length) -> bytes | -errno (one write(2)) */
static napi_value js_write_fd(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  int64_t fd;
  char *p;
  size_t len;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 4 || !get_i64(env, argv[0], &fd) ||
      !get_window(env, argv[1], argv[2], argv[3], &p, &len))
    return make_i64(env, -EINVAL);
  ssize_t r;
  do {
    r = write((int)fd, p, len);
  } while (r < 0 && errno == EINTR);
  return make_i64(env, r < 0 ? -errno : (int64_t)r);
}

/* umountSync(target, flags) -> 0 | -errno. Only for process exit, after the
 * /dev/fuse descriptor is closed (an aborted connection cannot block). */
static napi_value js_umount_sync(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  char path[4096];
  size_t n;
  int64_t flags;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 2 ||
      napi_get_value_string_utf8(env, argv[0], path, sizeof path, &n) != napi_ok ||
      n >= sizeof path - 1 || !get_i64(env, argv[1], &flags))
    return make_i64(env, -EINVAL);
  return make_i64(env, umount2(path, (int)flags) < 0 ? -errno : 0);
}

typedef struct {
  uv_poll_t handle;
  napi_env env;
  napi_ref cb;
  napi_async_context ctx;
  int stopped;
} fd_watch;

static void watch_closed(uv_handle_t *h) { free(h->data); }

static void watch_cb(uv_poll_t *h, int status, int events) {
  fd_watch *w = (fd_watch *)h->data;
  if (w->stopped) return;
  napi_env env = w->env;
  napi_handle_scope scope;
  napi_value cb, recv, arg, result;
  if (napi_open_handle_scope(env, &scope) != napi_ok) return;
  napi_get_reference_value(env, w->cb, &cb);
  napi_get_global(env, &recv); /* MakeCallback needs an object receiver */
  napi_create_int32(env, status, &arg);
  /* make_callback runs the microtask queue afterwards, so promise
   * continuations started by the callback proceed at once. */
  if (napi_make_callback(env, w->ctx, recv, cb, 1, &arg, &result) ==
      napi_pending_exception) {
    napi_value err;
    napi_get_and_clear_last_exception(env, &err);
    napi_fatal_exception(env, err);
  }
  napi_close_handle_scope(env, scope);
}

/* watchFd(fd, callback) -> handle: calls callback(status) on the event loop
 * whenever fd is readable (status < 0 on a poll error). */
static napi_value js_watch_fd(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2], ext, name;
  int64_t fd;
  uv_loop_t *loop;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 2 || !get_i64(env, argv[0], &fd)) {
    napi_throw_type_error(env, NULL, "watchFd: bad arguments");
    return NULL;
  }
  CHECK(napi_get_uv_event_loop(env, &loop));
  fd_watch *w = (fd_watch *)calloc(1, sizeof *w);
  if (!w) {
    napi_throw_error(env, "ENOMEM", "watchFd: out of memory");
    return NULL;
  }
  w->env = env;
  w->handle.data = w;
  if (uv_poll_init(loop, &w->handle, (int)fd) != 0) {
    free(w);
    napi_throw_error(env, NULL, "watchFd: uv_poll_init failed");
    return NULL;
  }
  CHECK(napi_create_reference(env, argv[1], 1, &w->cb));
  CHECK(napi_create_string_utf8(env, "vdisk-fuse", NAPI_AUTO_LENGTH, &name));
  CHECK(napi_async_init(env, NULL, name, &w->ctx));
  uv_poll_start(&w->handle, UV_READABLE, watch_cb);
  CHECK(napi_create_external(env, w, NULL, NULL, &ext));
  return ext;
}

/* unwatchFd(handle): stops the watcher (before the fd is closed). Idempotent. */
static napi_value js_unwatch_fd(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  void *data;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 1 || napi_get_value_external(env, argv[0], &data) != napi_ok) {
    napi_throw_type_error(env, NULL, "unwatchFd: bad handle");
    return NULL;
  }
  fd_watch *w = (fd_watch *)data;
  if (w->stopped) return NULL;
  w->stopped = 1;
  uv_poll_stop(&w->handle);
  napi_delete_reference(env, w->cb);
  napi_async_destroy(env, w->ctx);
  uv_close((uv_handle_t *)&w->handle, watch_closed);
  return NULL;
}

/* ---- systemd ------------------------------------------------------------- */

/* sdNotify(socketPath, message) -> 0 | -errno
 * One datagram to $NOTIFY_SOCKET, as sd_notify(3) sends it: Node has no unix
 * datagram sockets. A path starting with '@' is in the abstract namespace
 * (the '@' becomes a NUL byte and the address is exactly as long as the name,
 * as libsystemd does). */
static napi_value js_sd_notify(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  char path[sizeof(((struct sockaddr_un *)0)->sun_path) + 1];
  size_t path_len = 0, msg_len = 0;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 2 || napi_get_value_string_utf8(env, argv[0], path, sizeof path, &path_len) != napi_ok ||
      napi_get_value_string_utf8(env, argv[1], NULL, 0, &msg_len) != napi_ok)
    return make_i64(env, -EINVAL);
  struct sockaddr_un sa;
  memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  if (path_len == 0 || path_len >= sizeof sa.sun_path) return make_i64(env, -EINVAL);
  if (path[0] != '/' && path[0] != '@') return make_i64(env, -EAFNOSUPPORT);
  memcpy(sa.sun_path, path, path_len);
  if (path[0] == '@') sa.sun_path[0] = 0;
  socklen_t sa_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + path_len + (path[0] == '@' ? 0 : 1));
  char *msg = malloc(msg_len + 1);
  if (!msg) return make_i64(env, -ENOMEM);
  napi_get_value_string_utf8(env, argv[1], msg, msg_len + 1, &msg_len);
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    free(msg);
    return make_i64(env, -errno);
  }
  ssize_t n = sendto(fd, msg, msg_len, MSG_NOSIGNAL, (struct sockaddr *)&sa, sa_len);
  int err = n < 0 ? errno : 0;
  close(fd);
  free(msg);
  return make_i64(env, -err);
}

/* ---- module -------------------------------------------------------------- */

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"preadNowait", NULL, js_pread_nowait, NULL, NULL, NULL, napi_enumerable, NULL},
      {"preadSync", NULL, js_pread_sync, NULL, NULL, NULL, napi_enumerable, NULL},
      {"pwriteSync", NULL, js_pwrite_sync, NULL, NULL, NULL, napi_enumerable, NULL},
      {"seekSync", NULL, js_seek_sync, NULL, NULL, NULL, napi_enumerable, NULL},
      {"setSocketBuffers", NULL, js_set_socket_buffers, NULL, NULL, NULL, napi_enumerable, NULL},
      {"ofdLock", NULL, js_ofd_lock, NULL, NULL, NULL, napi_enumerable, NULL},
      {"ofdTest", NULL, js_ofd_test, NULL, NULL, NULL, napi_enumerable, NULL},
      {"blockDeviceInfo", NULL, js_blockdev_info, NULL, NULL, NULL, napi_enumerable, NULL},
      {"alignedBuffer", NULL, js_aligned_buffer, NULL, NULL, NULL, napi_enumerable, NULL},
      {"submit", NULL, js_submit, NULL, NULL, NULL, napi_enumerable, NULL},
      {"readFd", NULL, js_read_fd, NULL, NULL, NULL, napi_enumerable, NULL},
      {"writeFd", NULL, js_write_fd, NULL, NULL, NULL, napi_enumerable, NULL},
      {"dupFd", NULL, js_dup_fd, NULL, NULL, NULL, napi_enumerable, NULL},
      {"umountSync", NULL, js_umount_sync, NULL, NULL, NULL, napi_enumerable, NULL},
      {"watchFd", NULL, js_watch_fd, NULL, NULL, NULL, napi_enumerable, NULL},
      {"unwatchFd", NULL, js_unwatch_fd, NULL, NULL, NULL, napi_enumerable, NULL},
      {"sdNotify", NULL, js_sd_notify, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  if (napi_define_properties(env, exports, sizeof props / sizeof props[0],
                             props) != napi_ok)
    return NULL;
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
