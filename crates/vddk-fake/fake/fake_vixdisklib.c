/*
 * A fake VixDiskLib for syncproxy's tests: serves disks from local raw (or sparse) files and
 * enforces the contract the real library demands, aborting loudly on misuse:
 *   - InitEx before anything else, once; nothing after Exit; Exit only with no disk open;
 *   - Open, Close and ConnectEx never concurrent with each other (a window is held open to
 *     catch it);
 *   - one handle never used from two threads at once;
 *   - QueryAllocatedBlocks only on the thread that opened the disk;
 *   - whole-sector buffers (counts are sectors; reads past the end fail like VDDK's).
 * Failure injection comes from the vmxSpec of the connection, after the moref:
 *   "moref=vm-1;fail-read=N;busy-read=N;lose-connection=N;delay-us=N;async-thread=1"
 * fail-read: the Nth read (1-based) fails with VIX_E_FILE_ERROR; busy-read: the Nth read fails
 * with VIX_E_OBJECT_IS_BUSY (a transient failure: the next read succeeds); lose-connection: from the Nth
 * read on, every read fails with VIX_E_HOST_TCP_CONN_LOST; delay-us: every read sleeps first;
 * async-thread: ReadAsync completes on another thread instead of before returning.
 * Built twice: as libvixDiskLib.so.8, and with FAKE_VDDK6 as libvixDiskLib.so.6 without the
 * 6.7 symbols and with the 56-byte VixDiskLibInfo of VDDK 6.x placed against a guard page.
 */
#define _GNU_SOURCE
#include "vixDiskLib.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define VIX_OK 0
#define VIX_E_FAIL 1
#define VIX_E_INVALID_ARG 3
#define VIX_E_OBJECT_IS_BUSY 5
#define VIX_E_FILE_NOT_FOUND 4
#define VIX_E_NOT_SUPPORTED 6
#define VIX_E_FILE_ERROR 7
#define VIX_E_BUFFER_TOOSMALL 24
#define VIX_E_HOST_TCP_CONN_LOST 14011
#define VIX_E_DISK_OUTOFRANGE 16007
#define VIX_E_DISK_KEY_NOTFOUND 16052
#define VIX_ASYNC 25000

#ifdef FAKE_VDDK6
#define INFO_SIZE 56
#else
#define INFO_SIZE 64
#endif

static atomic_int initialized, exited, open_close_busy, open_disks;
static VixDiskLibGenericLogFunc *log_fn;

static void die(const char *what) {
  fprintf(stderr, "fake VDDK: contract violated: %s\n", what);
  abort();
}

static void say(const char *fmt, ...) {
  if (!log_fn)
    return;
  va_list ap;
  va_start(ap, fmt);
  log_fn(fmt, ap);
  va_end(ap);
}

static void require_live(void) {
  if (!atomic_load(&initialized))
    die("called before VixDiskLib_InitEx");
  if (atomic_load(&exited))
    die("called after VixDiskLib_Exit");
}

/* Open, Close and ConnectEx must be serialised process-wide; hold a window open to catch it. */
static void enter_open_close(const char *op) {
  require_live();
  if (atomic_exchange(&open_close_busy, 1)) {
    fprintf(stderr, "fake VDDK: %s ran concurrently with another Open/Close/ConnectEx\n", op);
    die("Open/Close/ConnectEx not serialised");
  }
  usleep(2000);
}

static void leave_open_close(void) { atomic_store(&open_close_busy, 0); }

struct conn {
  long fail_read, busy_read, lose_connection, delay_us;
  int async_thread;
  char transport[16];
};

struct handle {
  int fd;
  uint64_t sectors;
  pthread_t opener;
  atomic_int busy;
  atomic_long reads;
  struct conn *conn;
  pthread_mutex_t lock;
  pthread_cond_t idle;
  int outstanding;
};

static void enter_handle(struct handle *h) {
  require_live();
  if (!h)
    die("NULL disk handle");
  if (atomic_exchange(&h->busy, 1))
    die("one disk handle used from two threads at once");
}

static void leave_handle(struct handle *h) { atomic_store(&h->busy, 0); }

VixError VixDiskLib_InitEx(uint32_t major, uint32_t minor, VixDiskLibGenericLogFunc *log,
                           VixDiskLibGenericLogFunc *warn, VixDiskLibGenericLogFunc *panic, const char *libDir,
                           const char *configFile) {
  (void)warn;
  (void)panic;
  if (atomic_exchange(&initialized, 1))
    die("VixDiskLib_InitEx called twice");
  if (!log || !warn || !panic)
    die("InitEx without log callbacks (the defaults are not thread-safe)");
  log_fn = log;
  say("fake VDDK %u.%u initialised from %s (config %s)", major, minor, libDir ? libDir : "(null)",
      configFile ? configFile : "(none)");
  return VIX_OK;
}

void VixDiskLib_Exit(void) {
  require_live();
  if (atomic_load(&open_disks) != 0)
    die("VixDiskLib_Exit with disks still open");
  atomic_store(&exited, 1);
}

const char *VixDiskLib_ListTransportModes(void) {
  require_live();
  return "file:san:hotadd:nbdssl:nbd";
}

static long option(const char *spec, const char *key) {
  if (!spec)
    return 0;
  const char *p = strstr(spec, key);
  return p ? atol(p + strlen(key)) : 0;
}

VixError VixDiskLib_ConnectEx(const VixDiskLibConnectParams *p, Bool readOnly, const char *snapshotRef,
                              const char *transportModes, VixDiskLibConnection *out) {
  (void)readOnly;
  enter_open_close("ConnectEx");
  VixError err = VIX_OK;
  if (!out) {
    err = VIX_E_INVALID_ARG;
  } else if (p && p->serverName) {
    /* A remote connection: the real library crashes on missing credentials; we refuse. */
    int uid_ok = p->credType == VIXDISKLIB_CRED_UID && p->creds.uid.userName && p->creds.uid.password;
    int cookie_ok = p->credType == VIXDISKLIB_CRED_SESSIONID && p->creds.sessionId.cookie;
    if (!p->vmxSpec || !(uid_ok || cookie_ok))
      err = VIX_E_INVALID_ARG;
    if (snapshotRef && !p->vmxSpec)
      err = VIX_E_INVALID_ARG;
  }
  if (err == VIX_OK) {
    struct conn *c = calloc(1, sizeof *c);
    const char *spec = p ? p->vmxSpec : NULL;
    c->fail_read = option(spec, "fail-read=");
    c->busy_read = option(spec, "busy-read=");
    c->lose_connection = option(spec, "lose-connection=");
    c->delay_us = option(spec, "delay-us=");
    c->async_thread = (int)option(spec, "async-thread=");
    snprintf(c->transport, sizeof c->transport, "%s", transportModes ? transportModes : "file");
    char *colon = strchr(c->transport, ':');
    if (colon)
      *colon = 0;
    *out = (VixDiskLibConnection)c;
  }
  leave_open_close();
  return err;
}

VixError VixDiskLib_Disconnect(VixDiskLibConnection connection) {
  enter_open_close("Disconnect");
  free(connection);
  leave_open_close();
  return VIX_OK;
}

VixError VixDiskLib_Cleanup(const VixDiskLibConnectParams *p, uint32_t *cleaned, uint32_t *remaining) {
  (void)p;
  require_live();
  if (cleaned)
    *cleaned = 0;
  if (remaining)
    *remaining = 0;
  return VIX_OK;
}

VixError VixDiskLib_PrepareForAccess(const VixDiskLibConnectParams *p, const char *identity) {
  require_live();
  return p && p->vmxSpec && identity && strlen(identity) <= 50 ? VIX_OK : VIX_E_INVALID_ARG;
}

VixError VixDiskLib_EndAccess(const VixDiskLibConnectParams *p, const char *identity) {
  return VixDiskLib_PrepareForAccess(p, identity);
}

/* "[datastore] dir/disk.vmdk" maps to $FAKE_VDDK_DATASTORES/datastore/dir/disk.vmdk; an
 * absolute path is used as it is. */
static int open_path(const char *path, int writable) {
  char buf[4096];
  const char *file = path;
  if (path[0] == '[') {
    const char *close = strchr(path, ']');
    const char *root = getenv("FAKE_VDDK_DATASTORES");
    if (!close || !root)
      return -1;
    snprintf(buf, sizeof buf, "%s/%.*s/%s", root, (int)(close - path - 1), path + 1, close[1] == ' ' ? close + 2 : close + 1);
    file = buf;
  } else if (path[0] != '/') {
    return -1;
  }
  return open(file, writable ? O_RDWR : O_RDONLY);
}

VixError VixDiskLib_Open(const VixDiskLibConnection connection, const char *path, uint32_t flags,
                         VixDiskLibHandle *out) {
  enter_open_close("Open");
  VixError err = VIX_OK;
  int fd = (connection && path && out) ? open_path(path, !(flags & VIXDISKLIB_FLAG_OPEN_READ_ONLY)) : -2;
  struct stat st;
  if (fd == -2) {
    err = VIX_E_INVALID_ARG;
  } else if (fd < 0 || fstat(fd, &st) != 0) {
    err = VIX_E_FILE_NOT_FOUND;
  } else {
    struct handle *h = calloc(1, sizeof *h);
    h->fd = fd;
    h->sectors = (uint64_t)st.st_size / 512;
    h->opener = pthread_self();
    h->conn = (struct conn *)connection;
    pthread_mutex_init(&h->lock, NULL);
    pthread_cond_init(&h->idle, NULL);
    atomic_fetch_add(&open_disks, 1);
    *out = (VixDiskLibHandle)h;
  }
  leave_open_close();
  return err;
}

VixError VixDiskLib_Close(VixDiskLibHandle handle) {
  enter_open_close("Close");
  struct handle *h = (struct handle *)handle;
  if (atomic_load(&h->busy))
    die("Close while the handle is in use on another thread");
  pthread_mutex_lock(&h->lock);
  if (h->outstanding)
    die("Close with asynchronous requests outstanding (call Wait first)");
  pthread_mutex_unlock(&h->lock);
  close(h->fd);
  free(h);
  atomic_fetch_sub(&open_disks, 1);
  leave_open_close();
  return VIX_OK;
}

const char *VixDiskLib_GetTransportMode(VixDiskLibHandle handle) {
  struct handle *h = (struct handle *)handle;
  return h && h->conn ? h->conn->transport : "file";
}

/* The Info sits at the very end of a page followed by an inaccessible one, so reading or
 * writing past the size this library version has crashes at once. */
VixError VixDiskLib_GetInfo(VixDiskLibHandle handle, VixDiskLibInfo **out) {
  struct handle *h = (struct handle *)handle;
  enter_handle(h);
  long page = sysconf(_SC_PAGESIZE);
  char *base = mmap(NULL, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED)
    die("mmap");
  mprotect(base + page, page, PROT_NONE);
  char *uuid = base;
  snprintf(uuid, 64, "60 00 C2 9a fa ke 00 00-00 00 00 00 00 00 00 %02x", (unsigned)(h->sectors & 0xff));
  VixDiskLibInfo *info = (VixDiskLibInfo *)(base + page - INFO_SIZE);
  memset(info, 0, INFO_SIZE);
  info->biosGeo.cylinders = (uint32_t)(h->sectors / (255 * 63));
  info->biosGeo.heads = 255;
  info->biosGeo.sectors = 63;
  info->physGeo = info->biosGeo;
  info->capacity = h->sectors;
  info->adapterType = VIXDISKLIB_ADAPTER_SCSI_LSILOGIC;
  info->numLinks = 1;
  info->parentFileNameHint = NULL;
  info->uuid = uuid;
#ifndef FAKE_VDDK6
  info->logicalSectorSize = 512;
  info->physicalSectorSize = 4096;
#endif
  *out = info;
  leave_handle(h);
  return VIX_OK;
}

void VixDiskLib_FreeInfo(VixDiskLibInfo *info) {
  long page = sysconf(_SC_PAGESIZE);
  munmap((char *)info + INFO_SIZE - page, 2 * page);
}

static VixError do_read(struct handle *h, uint64_t start, uint64_t n, uint8_t *buf) {
  long count = atomic_fetch_add(&h->reads, 1) + 1;
  struct conn *c = h->conn;
  if (c->delay_us)
    usleep((useconds_t)c->delay_us);
  if (c->lose_connection && count >= c->lose_connection)
    return VIX_E_HOST_TCP_CONN_LOST;
  if (c->fail_read && count == c->fail_read)
    return VIX_E_FILE_ERROR;
  if (c->busy_read && count == c->busy_read)
    return VIX_E_OBJECT_IS_BUSY;
  if (start > h->sectors || n > h->sectors - start)
    return VIX_E_DISK_OUTOFRANGE;
  uint64_t done = 0, want = n * 512;
  while (done < want) {
    ssize_t r = pread(h->fd, buf + done, want - done, (off_t)(start * 512 + done));
    if (r <= 0)
      return r == 0 ? VIX_E_DISK_OUTOFRANGE : VIX_E_FILE_ERROR;
    done += (uint64_t)r;
  }
  return VIX_OK;
}

VixError VixDiskLib_Read(VixDiskLibHandle handle, uint64_t start, uint64_t n, uint8_t *buf) {
  struct handle *h = (struct handle *)handle;
  enter_handle(h);
  VixError err = buf ? do_read(h, start, n, buf) : VIX_E_INVALID_ARG;
  leave_handle(h);
  return err;
}

VixError VixDiskLib_Write(VixDiskLibHandle handle, uint64_t start, uint64_t n, const uint8_t *buf) {
  struct handle *h = (struct handle *)handle;
  enter_handle(h);
  VixError err = VIX_OK;
  if (!buf)
    err = VIX_E_INVALID_ARG;
  else if (start > h->sectors || n > h->sectors - start)
    err = VIX_E_DISK_OUTOFRANGE;
  else if (pwrite(h->fd, buf, n * 512, (off_t)(start * 512)) != (ssize_t)(n * 512))
    err = VIX_E_FILE_ERROR;
  leave_handle(h);
  return err;
}

struct async_req {
  struct handle *h;
  uint64_t start, n;
  uint8_t *buf;
  VixDiskLibCompletionCB cb;
  void *data;
};

static void *async_worker(void *arg) {
  struct async_req *r = arg;
  VixError err = do_read(r->h, r->start, r->n, r->buf);
  r->cb(r->data, err);
  pthread_mutex_lock(&r->h->lock);
  if (--r->h->outstanding == 0)
    pthread_cond_broadcast(&r->h->idle);
  pthread_mutex_unlock(&r->h->lock);
  free(r);
  return NULL;
}

VixError VixDiskLib_ReadAsync(VixDiskLibHandle handle, uint64_t start, uint64_t n, uint8_t *buf,
                              VixDiskLibCompletionCB cb, void *data) {
  struct handle *h = (struct handle *)handle;
  enter_handle(h);
  if (!buf || !cb) {
    leave_handle(h);
    return VIX_E_INVALID_ARG;
  }
  if (h->conn->async_thread) {
    struct async_req *r = malloc(sizeof *r);
    *r = (struct async_req){h, start, n, buf, cb, data};
    pthread_mutex_lock(&h->lock);
    h->outstanding++;
    pthread_mutex_unlock(&h->lock);
    pthread_t t;
    pthread_create(&t, NULL, async_worker, r);
    pthread_detach(t);
  } else {
    /* Like the real library on file transports: done, and the callback run, before returning. */
    cb(data, do_read(h, start, n, buf));
  }
  leave_handle(h);
  return VIX_ASYNC;
}

VixError VixDiskLib_WriteAsync(VixDiskLibHandle handle, uint64_t start, uint64_t n, const uint8_t *buf,
                               VixDiskLibCompletionCB cb, void *data) {
  VixError err = VixDiskLib_Write(handle, start, n, buf);
  if (cb)
    cb(data, err);
  return VIX_ASYNC;
}

VixError VixDiskLib_Wait(VixDiskLibHandle handle) {
  struct handle *h = (struct handle *)handle;
  enter_handle(h);
  pthread_mutex_lock(&h->lock);
  while (h->outstanding)
    pthread_cond_wait(&h->idle, &h->lock);
  pthread_mutex_unlock(&h->lock);
  leave_handle(h);
  return VIX_OK;
}

VixError VixDiskLib_Flush(VixDiskLibHandle handle) {
  struct handle *h = (struct handle *)handle;
  enter_handle(h);
  VixError err = fsync(h->fd) == 0 || errno == EINVAL ? VIX_OK : VIX_E_FILE_ERROR;
  leave_handle(h);
  return err;
}

static const char *const keys[][2] = {
    {"adapterType", "lsilogic"}, {"geometry.cylinders", "1024"}, {"geometry.heads", "255"},
    {"geometry.sectors", "63"},  {"virtualHWVersion", "13"},     {"uuid", "60 00 C2 9a fa ke"},
};

VixError VixDiskLib_GetMetadataKeys(VixDiskLibHandle handle, char *buf, size_t max, size_t *required) {
  struct handle *h = (struct handle *)handle;
  enter_handle(h);
  size_t need = 1;
  for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
    need += strlen(keys[i][0]) + 1;
  if (required)
    *required = need;
  VixError err = VIX_OK;
  if (!buf || max < need) {
    err = buf || max ? VIX_E_BUFFER_TOOSMALL : VIX_OK;
  } else {
    char *p = buf;
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
      p = stpcpy(p, keys[i][0]) + 1;
    *p = 0;
  }
  leave_handle(h);
  return err;
}

VixError VixDiskLib_ReadMetadata(VixDiskLibHandle handle, const char *key, char *buf, size_t len, size_t *required) {
  struct handle *h = (struct handle *)handle;
  enter_handle(h);
  VixError err = VIX_E_DISK_KEY_NOTFOUND;
  for (size_t i = 0; key && i < sizeof keys / sizeof keys[0]; i++) {
    if (strcmp(key, keys[i][0]) == 0) {
      size_t need = strlen(keys[i][1]) + 1;
      if (required)
        *required = need;
      if (!buf || len < need) {
        err = buf || len ? VIX_E_BUFFER_TOOSMALL : VIX_OK;
      } else {
        memcpy(buf, keys[i][1], need);
        err = VIX_OK;
      }
    }
  }
  leave_handle(h);
  return err;
}

char *VixDiskLib_GetErrorText(VixError err, const char *locale) {
  (void)locale;
  char *text = malloc(64);
  snprintf(text, 64, "fake VDDK error %llu", (unsigned long long)(err & 0xffff));
  return text;
}

void VixDiskLib_FreeErrorText(char *text) { free(text); }

#ifndef FAKE_VDDK6
VixError VixDiskLib_QueryAllocatedBlocks(VixDiskLibHandle handle, uint64_t start, uint64_t n, uint64_t chunk,
                                         VixDiskLibBlockList **out) {
  struct handle *h = (struct handle *)handle;
  enter_handle(h);
  if (!pthread_equal(pthread_self(), h->opener))
    die("QueryAllocatedBlocks called off the thread that opened the disk");
  VixError err = VIX_OK;
  if (!out || chunk < VIXDISKLIB_MIN_CHUNK_SIZE || start % chunk || n % chunk ||
      n / chunk > VIXDISKLIB_MAX_CHUNK_NUMBER || start > h->sectors || n > h->sectors - start + chunk) {
    err = VIX_E_INVALID_ARG;
  } else {
    size_t cap = 16, used = 0;
    VixDiskLibBlock *blocks = malloc(cap * sizeof *blocks);
    off_t pos = (off_t)(start * 512), end = (off_t)((start + n) * 512);
    while (pos < end) {
      off_t data = lseek(h->fd, pos, SEEK_DATA);
      if (data < 0 || data >= end)
        break;
      off_t hole = lseek(h->fd, data, SEEK_HOLE);
      if (hole > end)
        hole = end;
      uint64_t first = (uint64_t)data / 512 / chunk * chunk;
      uint64_t last = ((uint64_t)hole / 512 + chunk - 1) / chunk * chunk;
      if (used && blocks[used - 1].offset + blocks[used - 1].length >= first) {
        blocks[used - 1].length = last - blocks[used - 1].offset;
      } else {
        if (used == cap)
          blocks = realloc(blocks, (cap *= 2) * sizeof *blocks);
        blocks[used++] = (VixDiskLibBlock){first, last - first};
      }
      pos = hole;
    }
    VixDiskLibBlockList *list = malloc(sizeof *list + used * sizeof *blocks);
    list->numBlocks = (uint32_t)used;
    memcpy(list->blocks, blocks, used * sizeof *blocks);
    free(blocks);
    *out = list;
  }
  leave_handle(h);
  return err;
}

VixError VixDiskLib_FreeBlockList(VixDiskLibBlockList *list) {
  free(list);
  return VIX_OK;
}

VixDiskLibConnectParams *VixDiskLib_AllocateConnectParams(void) {
  require_live();
  return calloc(1, sizeof(VixDiskLibConnectParams));
}

void VixDiskLib_FreeConnectParams(VixDiskLibConnectParams *p) { free(p); }
#endif
