/* A journal segment's writes and group commit, without the interpreter lock.
 *
 * An append to the journal writes its record (pwritev) and then waits until an fdatasync
 * covers it, started by itself or by another association's thread (group commit). Done in
 * Python, that is a hand-over of the interpreter lock at each system call and at each
 * wait on the journal's condition and lock: with ten senders, every association's thread
 * took the lock back from the others four to six times per instance, and waited for it
 * each time. Here one call writes the record's parts and waits for the flush that covers
 * them, the lock released throughout; the counters of the group commit are kept in C,
 * under a mutex of the segment's own.
 *
 * The rule is the Python one's (node.store.journal.Journal._sync): whoever finds fewer than
 * `at_once` flushes running flushes for every append finished by then; the others wait for
 * one that covers them. An fdatasync makes durable every byte written before it was called,
 * so a flush started beside another covers what the first did not.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

enum { OK = 0, WRITE_FAILED = 1, FLUSH_FAILED = 2, UNSENT = 3 };

typedef struct {
    PyObject_HEAD
    int fd;
    int at_once;
    pthread_mutex_t mutex;
    pthread_cond_t changed;
    uint64_t finished; /* appends written, ready to be covered by a flush */
    uint64_t synced;   /* appends the last completed flush covered */
    int syncing;       /* flushes in flight */
    unsigned long long flushes; /* fdatasyncs made */
    double pause;      /* seconds slept before each fdatasync: a slow disk, for tests */
} Flusher;

static int flusher_init(Flusher *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"fd", "at_once", "pause", NULL};
    int fd, at_once = 2;
    double pause = 0.0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "i|id", names, &fd, &at_once, &pause))
        return -1;
    if (at_once < 1 || pause < 0) {
        PyErr_SetString(PyExc_ValueError, "at_once must be 1 or more, pause 0 or more");
        return -1;
    }
    self->fd = fd;
    self->at_once = at_once;
    self->pause = pause;
    return 0;
}

static PyObject *flusher_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    Flusher *self = (Flusher *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    pthread_mutex_init(&self->mutex, NULL);
    pthread_cond_init(&self->changed, NULL);
    self->fd = -1;
    return (PyObject *)self;
}

static void flusher_dealloc(Flusher *self) {
    pthread_cond_destroy(&self->changed);
    pthread_mutex_destroy(&self->mutex);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Write `count` iovecs at `offset`, pwritev again until all are written. */
static int write_all(int fd, struct iovec *iov, int count, off_t offset) {
    while (count > 0) {
        int batch = count < IOV_MAX ? count : IOV_MAX;
        ssize_t n = pwritev(fd, iov, batch, offset);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        offset += n;
        size_t left = (size_t)n;
        while (count > 0 && left >= iov->iov_len) {
            left -= iov->iov_len;
            iov++;
            count--;
        }
        if (count > 0 && left) {
            iov->iov_base = (char *)iov->iov_base + left;
            iov->iov_len -= left;
        }
    }
    return 0;
}

/* Wait until a flush covers the append just finished (group commit); errno on failure. */
static int covered(Flusher *self) {
    int error = 0;
    pthread_mutex_lock(&self->mutex);
    uint64_t ticket = ++self->finished;
    while (self->synced < ticket) {
        if (self->syncing >= self->at_once) {
            pthread_cond_wait(&self->changed, &self->mutex);
            continue;
        }
        self->syncing++;
        uint64_t target = self->finished;
        self->flushes++;
        pthread_mutex_unlock(&self->mutex);
        if (self->pause > 0) {
            struct timespec nap = {(time_t)self->pause,
                                   (long)((self->pause - (double)(time_t)self->pause) * 1e9)};
            nanosleep(&nap, NULL);
        }
        int failed = fdatasync(self->fd) != 0;
        error = failed ? errno : 0;
        pthread_mutex_lock(&self->mutex);
        self->syncing--;
        pthread_cond_broadcast(&self->changed);
        if (failed) break;
        if (target > self->synced) self->synced = target;
    }
    pthread_mutex_unlock(&self->mutex);
    return error;
}

/* Send all of `size` bytes on socket `fd` (its SO_SNDTIMEO bounds each wait); 0 or errno. */
static int send_all(int fd, const char *data, size_t size) {
    while (size > 0) {
        ssize_t n = send(fd, data, size, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        data += n;
        size -= (size_t)n;
    }
    return 0;
}

/* commit(writes, socket=-1, answer=b"") -> (status, errno): `writes` a sequence of (offset,
 * parts), each part a contiguous buffer; all written, then the call waits for a flush that
 * covers them, and then sends `answer` on `socket`, where given: the sender is answered the
 * moment its instance is durable, and the interpreter's bookkeeping of it comes after, while
 * the sender turns to its next instance. Status: OK, WRITE_FAILED (nothing waited for),
 * FLUSH_FAILED (nothing sent), or UNSENT (durable, but the answer could not be sent). */
static PyObject *flusher_commit(Flusher *self, PyObject *args) {
    PyObject *writes;
    int socket_fd = -1;
    Py_buffer answer = {0};
    if (!PyArg_ParseTuple(args, "O|iy*", &writes, &socket_fd, &answer)) return NULL;
    PyObject *sequence = PySequence_Fast(writes, "writes must be a sequence");
    if (sequence == NULL) {
        PyBuffer_Release(&answer);
        return NULL;
    }
    Py_ssize_t groups = PySequence_Fast_GET_SIZE(sequence);
    Py_ssize_t total = 0;
    for (Py_ssize_t g = 0; g < groups; g++) {
        PyObject *item = PySequence_Fast_GET_ITEM(sequence, g);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            Py_DECREF(sequence);
            PyBuffer_Release(&answer);
            PyErr_SetString(PyExc_TypeError, "each write must be (offset, parts)");
            return NULL;
        }
        Py_ssize_t parts = PyObject_Length(PyTuple_GET_ITEM(item, 1));
        if (parts < 0) {
            Py_DECREF(sequence);
            PyBuffer_Release(&answer);
            return NULL;
        }
        total += parts;
    }
    Py_buffer *views = PyMem_Calloc((size_t)(total ? total : 1), sizeof(Py_buffer));
    struct iovec *iov = PyMem_Calloc((size_t)(total ? total : 1), sizeof(struct iovec));
    off_t *offsets = PyMem_Calloc((size_t)(groups ? groups : 1), sizeof(off_t));
    int *counts = PyMem_Calloc((size_t)(groups ? groups : 1), sizeof(int));
    Py_ssize_t held = 0;
    PyObject *result = NULL;
    if (views == NULL || iov == NULL || offsets == NULL || counts == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t g = 0; g < groups; g++) {
        PyObject *item = PySequence_Fast_GET_ITEM(sequence, g);
        long long offset = PyLong_AsLongLong(PyTuple_GET_ITEM(item, 0));
        if (offset < 0) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "a negative offset");
            goto done;
        }
        offsets[g] = (off_t)offset;
        PyObject *parts = PySequence_Fast(PyTuple_GET_ITEM(item, 1), "parts must be a sequence");
        if (parts == NULL) goto done;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(parts);
        for (Py_ssize_t i = 0; i < n; i++) {
            if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(parts, i), &views[held],
                                   PyBUF_SIMPLE) != 0) {
                Py_DECREF(parts);
                goto done;
            }
            if (views[held].len == 0) {
                PyBuffer_Release(&views[held]);
                continue;
            }
            iov[held].iov_base = views[held].buf;
            iov[held].iov_len = (size_t)views[held].len;
            held++;
            counts[g]++;
        }
        Py_DECREF(parts);
    }
    int status = OK, error = 0;
    Py_BEGIN_ALLOW_THREADS
    struct iovec *at = iov;
    for (Py_ssize_t g = 0; g < groups && status == OK; g++) {
        if (write_all(self->fd, at, counts[g], offsets[g]) != 0) {
            status = WRITE_FAILED;
            error = errno;
        }
        at += counts[g];
    }
    if (status == OK) {
        error = covered(self);
        if (error) status = FLUSH_FAILED;
    }
    if (status == OK && socket_fd >= 0 && answer.len > 0) {
        error = send_all(socket_fd, (const char *)answer.buf, (size_t)answer.len);
        if (error) status = UNSENT;
    }
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("ii", status, error);
done:
    for (Py_ssize_t i = 0; i < held; i++) PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(iov);
    PyMem_Free(offsets);
    PyMem_Free(counts);
    Py_DECREF(sequence);
    PyBuffer_Release(&answer);
    return result;
}

/* wait_quiet(timeout) -> None: until no flush is in flight, or `timeout` seconds at most. */
static PyObject *flusher_wait_quiet(Flusher *self, PyObject *arg) {
    double timeout = PyFloat_AsDouble(arg);
    if (timeout == -1.0 && PyErr_Occurred()) return NULL;
    Py_BEGIN_ALLOW_THREADS
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    long long ns = until.tv_nsec + (long long)(timeout * 1e9);
    until.tv_sec += (time_t)(ns / 1000000000);
    until.tv_nsec = (long)(ns % 1000000000);
    pthread_mutex_lock(&self->mutex);
    while (self->syncing) {
        if (pthread_cond_timedwait(&self->changed, &self->mutex, &until) == ETIMEDOUT) break;
    }
    pthread_mutex_unlock(&self->mutex);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *flusher_flushing(Flusher *self, void *closure) {
    pthread_mutex_lock(&self->mutex);
    int syncing = self->syncing;
    pthread_mutex_unlock(&self->mutex);
    return PyLong_FromLong(syncing);
}

static PyMethodDef flusher_methods[] = {
    {"commit", (PyCFunction)flusher_commit, METH_VARARGS,
     "commit(writes, socket=-1, answer=b'') -> (status, errno): write each (offset, parts),"
     " wait for a flush that covers them, then send answer on socket"},
    {"wait_quiet", (PyCFunction)flusher_wait_quiet, METH_O,
     "wait_quiet(timeout): until no flush is in flight, or timeout seconds"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef flusher_getset[] = {
    {"flushing", (getter)flusher_flushing, NULL, "flushes in flight", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef flusher_members[] = {
    {"fd", T_INT, offsetof(Flusher, fd), READONLY, "the segment's file descriptor"},
    {"flushes", T_ULONGLONG, offsetof(Flusher, flushes), READONLY, "fdatasyncs made so far"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject FlusherType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "node.store._flush.Flusher",
    .tp_basicsize = sizeof(Flusher),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Flusher(fd, at_once=2, pause=0.0): a journal segment's writes and group commit"
              " (pause: seconds slept before each flush, a slow disk for tests)",
    .tp_new = flusher_new,
    .tp_init = (initproc)flusher_init,
    .tp_dealloc = (destructor)flusher_dealloc,
    .tp_methods = flusher_methods,
    .tp_getset = flusher_getset,
    .tp_members = flusher_members,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_flush", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__flush(void) {
    if (PyType_Ready(&FlusherType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&FlusherType);
    if (PyModule_AddObject(m, "Flusher", (PyObject *)&FlusherType) < 0) {
        Py_DECREF(&FlusherType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "OK", OK);
    PyModule_AddIntConstant(m, "WRITE_FAILED", WRITE_FAILED);
    PyModule_AddIntConstant(m, "FLUSH_FAILED", FLUSH_FAILED);
    PyModule_AddIntConstant(m, "UNSENT", UNSENT);
    return m;
}
