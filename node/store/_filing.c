/* A batch of spool files written past the page cache, in threads of this module's own,
 * without the interpreter lock.
 *
 * The filing process wrote each spool file from a pool of Python threads: every open,
 * write and close let go of the interpreter lock and took it back, and the threads woke
 * one another for the lock and for the pool's queue. A third of the filing process's
 * processor time went to those hand-overs (futex waits and wake-ups, task switches).
 * Here a whole batch is written in one call: a few threads take the files in turn, each
 * opened with O_DIRECT where the file system allows, its whole blocks written from where
 * they are when page-aligned (a journal segment's map) or through a page-aligned buffer
 * of the thread's own, its tail through the page cache, as node.store.direct_write does
 * one file at a time. A file that cannot be written is removed, and its errno returned.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define BLOCK 4096         /* a multiple of every logical block size O_DIRECT asks for */
#define STEP (4 << 20)     /* bytes written at a time, and the thread's buffer */
#define MOST_THREADS 16

typedef struct {
    const char *path;
    const char *data;
    size_t size;
    int error;
} Job;

typedef struct {
    Job *jobs;
    Py_ssize_t count;
    int release; /* the data are views of shared file maps: let go of their pages once written */
    atomic_long next;
} Work;

static int write_all(int fd, const char *data, size_t size, off_t offset) {
    while (size > 0) {
        ssize_t n = pwrite(fd, data, size, offset);
        if (n < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        if (n == 0) return EIO;
        data += n;
        size -= (size_t)n;
        offset += n;
    }
    return 0;
}

/* Create (or truncate) one file holding the job's bytes; 0 or the errno that stopped it. */
static int write_one(const Job *job, char **buffer) {
    const int flags = O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC;
    const size_t whole = job->size / BLOCK * BLOCK;
    int fd = -1, direct = 0;
    if (whole > 0) {
        fd = open(job->path, flags | O_DIRECT, 0600);
        if (fd >= 0) {
            direct = 1;
        } else if (errno != EINVAL) { /* EINVAL: the file system refuses O_DIRECT */
            return errno;
        }
    }
    if (fd < 0) {
        fd = open(job->path, flags, 0600);
        if (fd < 0) return errno;
    }
    int error = 0;
    size_t done = 0;
    if (direct) {
        const int aligned = ((uintptr_t)job->data % BLOCK) == 0;
        while (done < whole) {
            size_t step = whole - done < STEP ? whole - done : STEP;
            const char *from = job->data + done;
            if (!aligned) {
                if (*buffer == NULL && posix_memalign((void **)buffer, BLOCK, STEP) != 0) {
                    *buffer = NULL;
                    error = ENOMEM;
                    break;
                }
                memcpy(*buffer, from, step);
                from = *buffer;
            }
            error = write_all(fd, from, step, (off_t)done);
            if (error) break;
            done += step;
        }
        if (error == EINVAL) { /* blocks larger than BLOCK: the whole file through the cache */
            error = 0;
            done = 0;
        }
        if (!error) { /* the tail, less than a block, through the cache */
            int now = fcntl(fd, F_GETFL);
            if (now < 0 || fcntl(fd, F_SETFL, now & ~O_DIRECT) < 0) error = errno;
        }
    }
    if (!error) error = write_all(fd, job->data + done, job->size - done, (off_t)done);
    if (close(fd) != 0 && !error) error = errno;
    if (error) unlink(job->path);
    return error;
}

static void *worker(void *arg) {
    Work *work = (Work *)arg;
    char *buffer = NULL;
    for (;;) {
        long index = atomic_fetch_add(&work->next, 1);
        if (index >= work->count) break;
        Job *job = &work->jobs[index];
        job->error = write_one(job, &buffer);
        if (work->release && job->size > 0) {
            /* The pages stay in the page cache; only this process's map of them goes, so
             * that a batch does not count as the filing process's resident memory. */
            uintptr_t start = (uintptr_t)job->data / BLOCK * BLOCK;
            madvise((void *)start, (uintptr_t)job->data + job->size - start, MADV_DONTNEED);
        }
    }
    free(buffer);
    return NULL;
}

/* write_files(jobs, threads, release) -> [errno or 0 per job]; jobs: [(path, bytes-like)];
 * release: every job's data is a view of a shared file map (MADV_DONTNEED would clear
 * anything else). */
static PyObject *write_files(PyObject *self, PyObject *args) {
    PyObject *list;
    int threads, release = 0;
    if (!PyArg_ParseTuple(args, "O!i|p", &PyList_Type, &list, &threads, &release)) return NULL;
    Py_ssize_t count = PyList_GET_SIZE(list);
    Job *jobs = PyMem_Calloc(count ? (size_t)count : 1, sizeof(Job));
    Py_buffer *views = PyMem_Calloc(count ? (size_t)count : 1, sizeof(Py_buffer));
    PyObject **paths = PyMem_Calloc(count ? (size_t)count : 1, sizeof(PyObject *));
    PyObject *result = NULL;
    Py_ssize_t held = 0;
    if (jobs == NULL || views == NULL || paths == NULL) {
        PyErr_NoMemory();
        goto end;
    }
    for (; held < count; held++) {
        PyObject *item = PyList_GET_ITEM(list, held), *path = NULL, *data = NULL;
        if (!PyArg_ParseTuple(item, "OO", &path, &data)) goto end;
        if (!PyUnicode_FSConverter(path, &paths[held])) goto end;
        if (PyObject_GetBuffer(data, &views[held], PyBUF_SIMPLE) != 0) {
            Py_CLEAR(paths[held]);
            goto end;
        }
        jobs[held].path = PyBytes_AS_STRING(paths[held]);
        jobs[held].data = (const char *)views[held].buf;
        jobs[held].size = (size_t)views[held].len;
    }
    if (threads < 1) threads = 1;
    if (threads > MOST_THREADS) threads = MOST_THREADS;
    if (threads > count) threads = (int)(count ? count : 1);
    Work work = {jobs, count, release, 0};
    pthread_t started[MOST_THREADS];
    int running = 0;
    Py_BEGIN_ALLOW_THREADS
    for (int i = 1; i < threads; i++) {
        if (pthread_create(&started[running], NULL, worker, &work) == 0) running++;
    }
    worker(&work); /* this thread takes its turns too; the others' failures to start leave it all */
    for (int i = 0; i < running; i++) pthread_join(started[i], NULL);
    Py_END_ALLOW_THREADS
    result = PyList_New(count);
    if (result == NULL) goto end;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *error = PyLong_FromLong(jobs[i].error);
        if (error == NULL) {
            Py_CLEAR(result);
            goto end;
        }
        PyList_SET_ITEM(result, i, error);
    }
end:
    for (Py_ssize_t i = 0; i < held; i++) {
        PyBuffer_Release(&views[i]);
        Py_XDECREF(paths[i]);
    }
    PyMem_Free(jobs);
    PyMem_Free(views);
    PyMem_Free(paths);
    return result;
}

static PyMethodDef methods[] = {
    {"write_files", write_files, METH_VARARGS,
     "write_files(jobs, threads, release=False) -> [errno or 0 for each (path, data) job]: each"
     " file created (or truncated) holding its data, past the page cache where allowed; one"
     " that failed removed; release: the data are views of shared file maps, whose pages are"
     " let go of once written"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_filing", NULL, -1, methods};

PyMODINIT_FUNC PyInit__filing(void) { return PyModule_Create(&module); }
