/*
 * vdisk_rbd: RBD images (Ceph's block devices) through librados and librbd.
 *
 * A separate addon from vdisk_native because it links librbd: it is built only
 * where librbd's headers are (binding.gyp) and loaded only when a node with
 * driver=rbd is opened (src/block/drivers/rbd-native.ts), so vdisk runs on a
 * machine without Ceph's libraries.
 *
 * Two ways of running work, chosen by what librbd offers:
 * - Reads, writes, flush, discard and write-zeroes use librbd's asynchronous
 *   calls. librbd completes them on its own threads; the completion is passed
 *   to the event loop through one thread-safe function per environment, which
 *   resolves the request's promise. No libuv pool thread waits on the network.
 * - Connecting, opening, closing, resizing, block status (rbd_diff_iterate2),
 *   the exclusive lock and image creation have only blocking calls: they run
 *   on the libuv thread pool as async work.
 *
 * Every promise resolves to a result >= 0 (or an object) or to a negative
 * errno, never rejects for an I/O failure: the TypeScript side builds the
 * VdiskError with the errno's name and what was being done. Failures of setup
 * steps also say which librados/librbd call failed ("rados_connect").
 *
 * An image handle owns its cluster connection (one per node, as QEMU's rbd
 * driver has): close() closes the image, its I/O context and the connection.
 */
#include <node_api.h>

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <rados/librados.h>
#include <rbd/librbd.h>

#define CHECK(call)                                                            \
  do {                                                                         \
    if ((call) != napi_ok) {                                                   \
      napi_throw_error(env, NULL, "vdisk_rbd: " #call " failed");             \
      return NULL;                                                             \
    }                                                                          \
  } while (0)

/* ---- handles ----------------------------------------------------------------- */

typedef struct {
  rados_t cluster;
  rados_ioctx_t io;
  rbd_image_t image;
  /* Set by close(): the handle's pointers are no longer valid, and a use must be refused
   * rather than crash (the node drains its requests before it closes). */
  int closed;
} RbdImage;

/* Per environment: the thread-safe function aio completions go through, and how many aio
 * requests are in flight (the function keeps the event loop alive only while some are). */
typedef struct {
  napi_threadsafe_function tsfn;
  int64_t inflight;
} Instance;

/* ---- argument helpers -------------------------------------------------------- */

/* A JS string (or null/undefined -> NULL) as a malloc'd C string. */
static int get_string(napi_env env, napi_value v, char **out) {
  napi_valuetype t;
  *out = NULL;
  if (napi_typeof(env, v, &t) != napi_ok) return 0;
  if (t == napi_null || t == napi_undefined) return 1;
  if (t != napi_string) return 0;
  size_t len;
  if (napi_get_value_string_utf8(env, v, NULL, 0, &len) != napi_ok) return 0;
  *out = malloc(len + 1);
  if (!*out) return 0;
  return napi_get_value_string_utf8(env, v, *out, len + 1, &len) == napi_ok;
}

static int get_prop_string(napi_env env, napi_value obj, const char *name, char **out) {
  napi_value v;
  *out = NULL;
  if (napi_get_named_property(env, obj, name, &v) != napi_ok) return 0;
  return get_string(env, v, out);
}

static int get_u64(napi_env env, napi_value v, uint64_t *out) {
  int64_t i;
  if (napi_get_value_int64(env, v, &i) != napi_ok || i < 0) return 0;
  *out = (uint64_t)i;
  return 1;
}

static RbdImage *get_image(napi_env env, napi_value v) {
  void *p = NULL;
  if (napi_get_value_external(env, v, &p) != napi_ok) return NULL;
  return p;
}

static napi_value make_i64(napi_env env, int64_t v) {
  napi_value r;
  napi_create_int64(env, v, &r);
  return r;
}

/* ---- connection settings ----------------------------------------------------- */

/* What connect needs, read from the JS options object on the event loop. */
typedef struct {
  char *conf;      /* a ceph.conf path, or NULL for librados's default search */
  char *user;      /* the id without "client.", or NULL for admin */
  /* name=value settings applied in order after the conf file: key, keyring,
   * auth_client_required, mon_host, rbd_cache, ... (strings, as rados_conf_set takes) */
  char **names;
  char **values;
  uint32_t count;
} ConnectSpec;

static void free_spec(ConnectSpec *s) {
  free(s->conf);
  free(s->user);
  for (uint32_t i = 0; i < s->count; i++) {
    free(s->names[i]);
    free(s->values[i]);
  }
  free(s->names);
  free(s->values);
  memset(s, 0, sizeof *s);
}

/* { conf?: string, user?: string, settings: [name, value][] } */
static int read_spec(napi_env env, napi_value obj, ConnectSpec *s) {
  memset(s, 0, sizeof *s);
  if (!get_prop_string(env, obj, "conf", &s->conf) || !get_prop_string(env, obj, "user", &s->user)) return 0;
  napi_value arr;
  if (napi_get_named_property(env, obj, "settings", &arr) != napi_ok) return 0;
  uint32_t n;
  if (napi_get_array_length(env, arr, &n) != napi_ok) return 0;
  s->names = calloc(n ? n : 1, sizeof(char *));
  s->values = calloc(n ? n : 1, sizeof(char *));
  if (!s->names || !s->values) return 0;
  for (uint32_t i = 0; i < n; i++) {
    napi_value pair, k, v;
    if (napi_get_element(env, arr, i, &pair) != napi_ok || napi_get_element(env, pair, 0, &k) != napi_ok ||
        napi_get_element(env, pair, 1, &v) != napi_ok)
      return 0;
    s->count = i + 1;
    if (!get_string(env, k, &s->names[i]) || !get_string(env, v, &s->values[i]) || !s->names[i] || !s->values[i]) return 0;
  }
  return 1;
}

/* Connects; on failure *stage names the call that failed and nothing is left allocated. */
static int connect_cluster(const ConnectSpec *s, rados_t *out, const char **stage) {
  rados_t c;
  int r = rados_create(&c, s->user);
  if (r < 0) {
    *stage = "rados_create";
    return r;
  }
  /* Without a conf file librados looks in its default places ($CEPH_CONF, /etc/ceph); a
   * missing default file is no error (settings may name the monitors), a named one is. */
  r = rados_conf_read_file(c, s->conf);
  if (r < 0 && s->conf) {
    *stage = "rados_conf_read_file";
    goto fail;
  }
  for (uint32_t i = 0; i < s->count; i++) {
    r = rados_conf_set(c, s->names[i], s->values[i]);
    if (r < 0) {
      *stage = "rados_conf_set";
      goto fail;
    }
  }
  r = rados_connect(c);
  if (r < 0) {
    *stage = "rados_connect";
    goto fail;
  }
  *out = c;
  return 0;
fail:
  rados_shutdown(c);
  return r;
}

/* ---- blocking work on the libuv pool ----------------------------------------- */

typedef enum { W_OPEN, W_CLOSE, W_CREATE, W_RESIZE, W_DIFF, W_LOCK_ACQUIRE, W_LOCK_RELEASE, W_LOCK_OWNERS, W_LOCK_BREAK } WorkKind;

typedef struct {
  WorkKind kind;
  napi_async_work work;
  napi_deferred deferred;
  RbdImage *img;
  ConnectSpec spec;
  char *pool, *ns, *name, *snap;
  int read_only;
  uint64_t a, b; /* offset/length, size/order */
  /* results */
  int ret;
  const char *stage;
  uint64_t size, object_size, features;
  uint64_t *extents; /* offset, length pairs */
  size_t n_extents, cap_extents;
  char **owners;
  size_t n_owners;
} Work;

static int open_ioctx(rados_t c, const char *pool, const char *ns, rados_ioctx_t *io, const char **stage) {
  int r = rados_ioctx_create(c, pool, io);
  if (r < 0) {
    *stage = "rados_ioctx_create";
    return r;
  }
  /* An empty namespace is the pool's default one. */
  rados_ioctx_set_namespace(*io, ns ? ns : "");
  return 0;
}

static void do_open(Work *w) {
  RbdImage *img = calloc(1, sizeof *img);
  if (!img) {
    w->ret = -ENOMEM;
    w->stage = "malloc";
    return;
  }
  int r = connect_cluster(&w->spec, &img->cluster, &w->stage);
  if (r < 0) goto fail_img;
  r = open_ioctx(img->cluster, w->pool, w->ns, &img->io, &w->stage);
  if (r < 0) goto fail_cluster;
  /* A snapshot is read-only by nature; a read-only open of the head takes no lock and
   * registers no watch that writers would have to ask. */
  if (w->read_only || w->snap) {
    r = rbd_open_read_only(img->io, w->name, &img->image, w->snap);
    w->stage = "rbd_open_read_only";
  } else {
    r = rbd_open(img->io, w->name, &img->image, NULL);
    w->stage = "rbd_open";
  }
  if (r < 0) goto fail_io;
  rbd_image_info_t info;
  r = rbd_stat(img->image, &info, sizeof info);
  if (r < 0) {
    w->stage = "rbd_stat";
    rbd_close(img->image);
    goto fail_io;
  }
  uint64_t features = 0;
  rbd_get_features(img->image, &features);
  w->size = info.size;
  w->object_size = info.obj_size;
  w->features = features;
  w->img = img;
  w->ret = 0;
  return;
fail_io:
  rados_ioctx_destroy(img->io);
fail_cluster:
  rados_shutdown(img->cluster);
fail_img:
  free(img);
  w->ret = r;
}

static void do_create(Work *w) {
  rados_t c;
  rados_ioctx_t io;
  int r = connect_cluster(&w->spec, &c, &w->stage);
  if (r < 0) {
    w->ret = r;
    return;
  }
  r = open_ioctx(c, w->pool, w->ns, &io, &w->stage);
  if (r < 0) {
    rados_shutdown(c);
    w->ret = r;
    return;
  }
  rbd_image_options_t opts;
  rbd_image_options_create(&opts);
  /* order 0: librbd's default object size (4 MiB); blockdev-create's cluster-size sets it. */
  if (w->b) rbd_image_options_set_uint64(opts, RBD_IMAGE_OPTION_ORDER, w->b);
  r = rbd_create4(io, w->name, w->a, opts);
  w->stage = "rbd_create4";
  rbd_image_options_destroy(opts);
  rados_ioctx_destroy(io);
  rados_shutdown(c);
  w->ret = r;
}

static int diff_cb(uint64_t off, size_t len, int exists, void *arg) {
  Work *w = arg;
  /* Without a from-snapshot every extent reported exists; a hole is what is not reported. */
  if (!exists) return 0;
  if (w->n_extents == w->cap_extents) {
    size_t cap = w->cap_extents ? w->cap_extents * 2 : 64;
    uint64_t *p = realloc(w->extents, cap * 2 * sizeof(uint64_t));
    if (!p) return -ENOMEM;
    w->extents = p;
    w->cap_extents = cap;
  }
  w->extents[2 * w->n_extents] = off;
  w->extents[2 * w->n_extents + 1] = len;
  w->n_extents++;
  return 0;
}

/* The exclusive lock's owners into w->owners / w->n_owners. Nobody holding the lock
 * (ENOENT) is an answer, an empty list, not an error. */
static int get_lock_owners(RbdImage *img, Work *w) {
  rbd_lock_mode_t mode;
  size_t max = 8;
  w->n_owners = 0;
  w->owners = calloc(max, sizeof(char *));
  if (!w->owners) return -ENOMEM;
  w->stage = "rbd_lock_get_owners";
  int r = rbd_lock_get_owners(img->image, &mode, w->owners, &max);
  if (r == -ENOENT) return 0;
  if (r < 0) return r;
  w->n_owners = max;
  return r;
}

static void execute(napi_env env, void *data) {
  Work *w = data;
  RbdImage *img = w->img;
  switch (w->kind) {
  case W_OPEN:
    do_open(w);
    break;
  case W_CREATE:
    do_create(w);
    break;
  case W_CLOSE:
    /* rbd_close flushes librbd's cache and releases the exclusive lock. */
    w->ret = rbd_close(img->image);
    w->stage = "rbd_close";
    rados_ioctx_destroy(img->io);
    rados_shutdown(img->cluster);
    break;
  case W_RESIZE:
    w->ret = rbd_resize(img->image, w->a);
    w->stage = "rbd_resize";
    if (w->ret >= 0) w->ret = rbd_get_size(img->image, &w->size);
    break;
  case W_DIFF:
    /* include_parent: a clone's data from its parent is data here too. whole_object false:
     * exact extents, which need no fast-diff feature (and match `rbd diff`). */
    w->ret = rbd_diff_iterate2(img->image, NULL, w->a, w->b, 1, 0, diff_cb, w);
    w->stage = "rbd_diff_iterate2";
    break;
  case W_LOCK_ACQUIRE:
    w->ret = rbd_lock_acquire(img->image, RBD_LOCK_MODE_EXCLUSIVE);
    w->stage = "rbd_lock_acquire";
    break;
  case W_LOCK_RELEASE:
    w->ret = rbd_lock_release(img->image);
    w->stage = "rbd_lock_release";
    break;
  case W_LOCK_BREAK:
    /* Breaking a lock that is held: librbd blocklists the holder's client first
     * (rbd_blocklist_on_break_lock, on by default), so a holder that is only slow, not dead,
     * cannot write after the break. The owners come back for the caller's log. */
    w->ret = get_lock_owners(img, w);
    for (size_t i = 0; i < w->n_owners && w->ret >= 0; i++) {
      w->ret = rbd_lock_break(img->image, RBD_LOCK_MODE_EXCLUSIVE, w->owners[i]);
      w->stage = "rbd_lock_break";
      /* ENOENT: the owner let go (or died and was broken by someone else) meanwhile. */
      if (w->ret == -ENOENT) w->ret = 0;
    }
    break;
  case W_LOCK_OWNERS:
    w->ret = get_lock_owners(img, w);
    break;
  }
}

static void free_work(Work *w) {
  free_spec(&w->spec);
  free(w->pool);
  free(w->ns);
  free(w->name);
  free(w->snap);
  free(w->extents);
  if (w->owners) {
    if (w->n_owners) rbd_lock_get_owners_cleanup(w->owners, w->n_owners);
    free(w->owners);
  }
  free(w);
}

static napi_value error_result(napi_env env, Work *w) {
  /* { errno: -N, stage: "rados_connect" } */
  napi_value o, stage;
  napi_create_object(env, &o);
  napi_set_named_property(env, o, "errno", make_i64(env, w->ret));
  napi_create_string_utf8(env, w->stage ? w->stage : "", NAPI_AUTO_LENGTH, &stage);
  napi_set_named_property(env, o, "stage", stage);
  return o;
}

static void finish_image(napi_env env, void *data, void *hint) {
  RbdImage *img = data;
  /* An image dropped without close() keeps its connection: closing blocks, and a finalizer
   * runs on the event loop. Only closed handles are freed. */
  if (img->closed) free(img);
}

static void complete(napi_env env, napi_status status, void *data) {
  Work *w = data;
  napi_value result = NULL;
  if (status != napi_ok) {
    w->ret = -ECANCELED;
    w->stage = "async work";
  }
  if (w->ret < 0) {
    result = error_result(env, w);
    if (w->kind == W_CLOSE) w->img->closed = 1;
  } else {
    switch (w->kind) {
    case W_OPEN: {
      napi_value handle;
      napi_create_external(env, w->img, finish_image, NULL, &handle);
      napi_create_object(env, &result);
      napi_set_named_property(env, result, "handle", handle);
      napi_set_named_property(env, result, "size", make_i64(env, (int64_t)w->size));
      napi_set_named_property(env, result, "objectSize", make_i64(env, (int64_t)w->object_size));
      napi_set_named_property(env, result, "features", make_i64(env, (int64_t)w->features));
      break;
    }
    case W_CLOSE:
      w->img->closed = 1;
      result = make_i64(env, 0);
      break;
    case W_RESIZE:
      result = make_i64(env, (int64_t)w->size);
      break;
    case W_DIFF: {
      napi_create_array_with_length(env, w->n_extents * 2, &result);
      for (size_t i = 0; i < w->n_extents * 2; i++) napi_set_element(env, result, i, make_i64(env, (int64_t)w->extents[i]));
      break;
    }
    case W_LOCK_OWNERS:
    case W_LOCK_BREAK: {
      napi_create_array_with_length(env, w->n_owners, &result);
      for (size_t i = 0; i < w->n_owners; i++) {
        napi_value s;
        napi_create_string_utf8(env, w->owners[i], NAPI_AUTO_LENGTH, &s);
        napi_set_element(env, result, i, s);
      }
      break;
    }
    default:
      result = make_i64(env, w->ret);
    }
  }
  napi_resolve_deferred(env, w->deferred, result);
  napi_delete_async_work(env, w->work);
  free_work(w);
}

static napi_value queue(napi_env env, Work *w, const char *what) {
  napi_value promise, name;
  if (napi_create_promise(env, &w->deferred, &promise) != napi_ok) {
    free_work(w);
    napi_throw_error(env, NULL, "vdisk_rbd: napi_create_promise failed");
    return NULL;
  }
  napi_create_string_utf8(env, what, NAPI_AUTO_LENGTH, &name);
  CHECK(napi_create_async_work(env, NULL, name, execute, complete, w, &w->work));
  CHECK(napi_queue_async_work(env, w->work));
  return promise;
}

static Work *new_work(napi_env env, WorkKind kind) {
  Work *w = calloc(1, sizeof *w);
  if (!w) napi_throw_error(env, NULL, "vdisk_rbd: out of memory");
  else w->kind = kind;
  return w;
}

/* open(connect: {conf, user, settings}, pool, namespace|null, image, snapshot|null, readOnly)
 *   -> Promise<{handle, size, objectSize, features} | {errno, stage}> */
static napi_value js_open(napi_env env, napi_callback_info info) {
  size_t argc = 6;
  napi_value argv[6];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  Work *w = new_work(env, W_OPEN);
  if (!w) return NULL;
  bool ro = false;
  if (argc < 6 || !read_spec(env, argv[0], &w->spec) || !get_string(env, argv[1], &w->pool) || !get_string(env, argv[2], &w->ns) ||
      !get_string(env, argv[3], &w->name) || !get_string(env, argv[4], &w->snap) || napi_get_value_bool(env, argv[5], &ro) != napi_ok ||
      !w->pool || !w->name) {
    free_work(w);
    napi_throw_type_error(env, NULL, "vdisk_rbd.open(connect, pool, namespace, image, snapshot, readOnly)");
    return NULL;
  }
  w->read_only = ro;
  return queue(env, w, "vdisk_rbd.open");
}

/* create(connect, pool, namespace|null, image, size, order) -> Promise<0 | {errno, stage}> */
static napi_value js_create(napi_env env, napi_callback_info info) {
  size_t argc = 6;
  napi_value argv[6];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  Work *w = new_work(env, W_CREATE);
  if (!w) return NULL;
  if (argc < 6 || !read_spec(env, argv[0], &w->spec) || !get_string(env, argv[1], &w->pool) || !get_string(env, argv[2], &w->ns) ||
      !get_string(env, argv[3], &w->name) || !get_u64(env, argv[4], &w->a) || !get_u64(env, argv[5], &w->b) || !w->pool || !w->name) {
    free_work(w);
    napi_throw_type_error(env, NULL, "vdisk_rbd.create(connect, pool, namespace, image, size, order)");
    return NULL;
  }
  return queue(env, w, "vdisk_rbd.create");
}

/* The image calls: (handle[, a[, b]]) -> Promise<result | {errno, stage}> */
static napi_value image_work(napi_env env, napi_callback_info info, WorkKind kind, size_t nargs, const char *what) {
  size_t argc = 3;
  napi_value argv[3];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  RbdImage *img = argc >= 1 ? get_image(env, argv[0]) : NULL;
  if (!img || argc < nargs + 1 || (nargs >= 1 && !get_u64(env, argv[1], &(uint64_t){0})) || (nargs >= 2 && !get_u64(env, argv[2], &(uint64_t){0}))) {
    napi_throw_type_error(env, NULL, what);
    return NULL;
  }
  if (img->closed) {
    napi_throw_error(env, NULL, "vdisk_rbd: the image is closed");
    return NULL;
  }
  Work *w = new_work(env, kind);
  if (!w) return NULL;
  w->img = img;
  if (nargs >= 1) get_u64(env, argv[1], &w->a);
  if (nargs >= 2) get_u64(env, argv[2], &w->b);
  return queue(env, w, what);
}

static napi_value js_close(napi_env env, napi_callback_info info) { return image_work(env, info, W_CLOSE, 0, "vdisk_rbd.close(handle)"); }
static napi_value js_resize(napi_env env, napi_callback_info info) { return image_work(env, info, W_RESIZE, 1, "vdisk_rbd.resize(handle, size)"); }
static napi_value js_diff(napi_env env, napi_callback_info info) { return image_work(env, info, W_DIFF, 2, "vdisk_rbd.allocated(handle, offset, length)"); }
static napi_value js_lock_acquire(napi_env env, napi_callback_info info) { return image_work(env, info, W_LOCK_ACQUIRE, 0, "vdisk_rbd.lockAcquire(handle)"); }
static napi_value js_lock_release(napi_env env, napi_callback_info info) { return image_work(env, info, W_LOCK_RELEASE, 0, "vdisk_rbd.lockRelease(handle)"); }
static napi_value js_lock_owners(napi_env env, napi_callback_info info) { return image_work(env, info, W_LOCK_OWNERS, 0, "vdisk_rbd.lockOwners(handle)"); }
static napi_value js_lock_break(napi_env env, napi_callback_info info) { return image_work(env, info, W_LOCK_BREAK, 0, "vdisk_rbd.lockBreak(handle)"); }

/* ---- asynchronous I/O ---------------------------------------------------------- */

enum { AIO_READ = 1, AIO_WRITE = 2, AIO_FLUSH = 3, AIO_DISCARD = 4, AIO_WRITE_ZEROES = 5 };

typedef struct {
  Instance *inst;
  napi_deferred deferred;
  /* Keeps the request's buffer alive while librbd reads into or writes from it. */
  napi_ref buffer;
  ssize_t ret;
} Aio;

/* On a librbd thread: hand the result to the event loop. The queue is unbounded, so this
 * never blocks librbd; the function lives as long as the environment. */
static void aio_complete(rbd_completion_t c, void *arg) {
  Aio *a = arg;
  a->ret = rbd_aio_get_return_value(c);
  rbd_aio_release(c);
  napi_call_threadsafe_function(a->inst->tsfn, a, napi_tsfn_nonblocking);
}

/* On the event loop: settle the promise. env is NULL when the environment is going away. */
static void aio_settle(napi_env env, Aio *a) {
  if (env) {
    napi_resolve_deferred(env, a->deferred, make_i64(env, a->ret));
    if (a->buffer) napi_delete_reference(env, a->buffer);
    /* Only requests in flight keep the event loop alive, as a pending socket read would. */
    if (--a->inst->inflight == 0) napi_unref_threadsafe_function(env, a->inst->tsfn);
  }
  free(a);
}

static void aio_call_js(napi_env env, napi_value js_cb, void *context, void *data) { aio_settle(env, data); }

/* aio(op, handle, buffer|null, offset, length, flags) -> Promise<result >= 0 | -errno>
 * flags: for write-zeroes, RBD_WRITE_ZEROES_FLAG_* (1 = thick: keep the range allocated). */
static napi_value js_aio(napi_env env, napi_callback_info info) {
  size_t argc = 6;
  napi_value argv[6];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  Instance *inst;
  CHECK(napi_get_instance_data(env, (void **)&inst));
  int32_t op = 0, flags = 0;
  uint64_t offset = 0, length = 0;
  RbdImage *img = argc == 6 ? get_image(env, argv[1]) : NULL;
  if (!img || napi_get_value_int32(env, argv[0], &op) != napi_ok || !get_u64(env, argv[3], &offset) ||
      !get_u64(env, argv[4], &length) || napi_get_value_int32(env, argv[5], &flags) != napi_ok) {
    napi_throw_type_error(env, NULL, "vdisk_rbd.aio(op, handle, buffer, offset, length, flags)");
    return NULL;
  }
  if (img->closed) {
    napi_throw_error(env, NULL, "vdisk_rbd: the image is closed");
    return NULL;
  }
  char *data = NULL;
  if (op == AIO_READ || op == AIO_WRITE) {
    size_t buflen;
    bool is_buffer = false;
    napi_is_buffer(env, argv[2], &is_buffer);
    if (!is_buffer || napi_get_buffer_info(env, argv[2], (void **)&data, &buflen) != napi_ok || length > buflen) {
      napi_throw_type_error(env, NULL, "vdisk_rbd.aio: a read or write needs a Buffer of at least length bytes");
      return NULL;
    }
  }
  Aio *a = calloc(1, sizeof *a);
  if (!a) {
    napi_throw_error(env, NULL, "vdisk_rbd: out of memory");
    return NULL;
  }
  a->inst = inst;
  napi_value promise;
  CHECK(napi_create_promise(env, &a->deferred, &promise));
  if (data) CHECK(napi_create_reference(env, argv[2], 1, &a->buffer));
  if (a->inst->inflight++ == 0) napi_ref_threadsafe_function(env, inst->tsfn);

  rbd_completion_t c;
  int r = rbd_aio_create_completion(a, aio_complete, &c);
  if (r == 0) {
    switch (op) {
    case AIO_READ: r = rbd_aio_read(img->image, offset, length, data, c); break;
    case AIO_WRITE: r = rbd_aio_write(img->image, offset, length, data, c); break;
    case AIO_FLUSH: r = rbd_aio_flush(img->image, c); break;
    case AIO_DISCARD: r = rbd_aio_discard(img->image, offset, length, c); break;
    case AIO_WRITE_ZEROES: r = rbd_aio_write_zeroes(img->image, offset, length, c, flags, 0); break;
    default: r = -EINVAL;
    }
    /* Refused before it started: librbd will not call the completion. */
    if (r < 0) rbd_aio_release(c);
  }
  if (r < 0) {
    a->ret = r;
    aio_settle(env, a);
  }
  return promise;
}

/* ---- module -------------------------------------------------------------------- */

static void free_instance(napi_env env, void *data, void *hint) {
  Instance *inst = data;
  napi_release_threadsafe_function(inst->tsfn, napi_tsfn_abort);
  free(inst);
}

static napi_value init(napi_env env, napi_value exports) {
  Instance *inst = calloc(1, sizeof *inst);
  if (!inst) {
    napi_throw_error(env, NULL, "vdisk_rbd: out of memory");
    return NULL;
  }
  napi_value name;
  CHECK(napi_create_string_utf8(env, "vdisk_rbd.aio", NAPI_AUTO_LENGTH, &name));
  CHECK(napi_create_threadsafe_function(env, NULL, NULL, name, 0, 1, NULL, NULL, NULL, aio_call_js, &inst->tsfn));
  /* Referenced only while requests are in flight (js_aio). */
  CHECK(napi_unref_threadsafe_function(env, inst->tsfn));
  CHECK(napi_set_instance_data(env, inst, free_instance, NULL));

  const napi_property_descriptor props[] = {
    {"open", NULL, js_open, NULL, NULL, NULL, napi_default, NULL},
    {"create", NULL, js_create, NULL, NULL, NULL, napi_default, NULL},
    {"close", NULL, js_close, NULL, NULL, NULL, napi_default, NULL},
    {"resize", NULL, js_resize, NULL, NULL, NULL, napi_default, NULL},
    {"allocated", NULL, js_diff, NULL, NULL, NULL, napi_default, NULL},
    {"lockAcquire", NULL, js_lock_acquire, NULL, NULL, NULL, napi_default, NULL},
    {"lockRelease", NULL, js_lock_release, NULL, NULL, NULL, napi_default, NULL},
    {"lockOwners", NULL, js_lock_owners, NULL, NULL, NULL, napi_default, NULL},
    {"lockBreak", NULL, js_lock_break, NULL, NULL, NULL, napi_default, NULL},
    {"aio", NULL, js_aio, NULL, NULL, NULL, napi_default, NULL},
  };
  CHECK(napi_define_properties(env, exports, sizeof props / sizeof props[0], props));
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
