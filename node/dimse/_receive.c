/* A C-STORE's data set received from a plain TCP socket without the interpreter lock.
 *
 * The Python loop over a data set's P-DATA-TF PDUs (header, body, PDV, fragment, journal
 * write) cost the association's thread about as much processor time as the kernel's work
 * of copying the bytes, and took the interpreter lock back after every system call, from
 * the threads filing earlier instances. Here the common case runs in one call, the lock
 * released throughout: P-DATA-TF PDUs of one PDV each, data fragments of the expected
 * presentation context, read straight into one buffer after the Part 10 file meta that
 * is already there, their whole pages written to the instance's journal room and started
 * on their way to the disk as they arrive.
 *
 * Anything else stops the loop and is handed back to the Python upper layer with the
 * bytes of it already read (:mod:`node.dimse.pdu`, :mod:`node.dimse.acceptor`), which
 * checks and answers it as before: another PDU type, several PDVs in one PDU, a command
 * fragment or another context, a fragment that does not fit the buffer.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

enum {
    DONE = 0,     /* the last fragment is in */
    FIRST = 1,    /* the first fragment is in (asked to stop there) */
    HANDOFF = 2,  /* a PDU this loop does not take: its type, length and bytes read so far */
    CLOSED = 3,   /* the peer closed the connection */
    TIMEOUT = 4,  /* the peer was silent too long, or a PDU did not arrive whole in time */
    FAILED = 5,   /* the socket failed (errno) */
    TOO_LONG = 6, /* a PDU over the maximum length */
    UNSENT = 7,   /* the answer could not be sent (errno) */
};

#define P_DATA 0x04
#define PAGE 4096

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int set_rcvtimeo(int fd, int64_t ns) {
    struct timeval tv;
    if (ns <= 0) {
        tv.tv_sec = 0;
        tv.tv_usec = 0; /* no limit */
    } else {
        tv.tv_sec = (time_t)(ns / 1000000000);
        tv.tv_usec = (suseconds_t)((ns % 1000000000) / 1000);
        if (tv.tv_sec == 0 && tv.tv_usec == 0) tv.tv_usec = 1;
    }
    return setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
}

typedef struct {
    int fd;
    int64_t rcvtimeo;  /* SO_RCVTIMEO as set now, in ns (0: none) */
    int error;         /* errno of a failure */
} Link;

/* Read exactly `size` bytes into `into`. Without a deadline (0) the socket's timeout bounds
 * each wait (silence between PDUs); with one, each wait is set to end by it, give or take a
 * sixteenth, as the Python reader does (pdu.Connection._wait_at_most): a PDU once begun
 * must arrive whole by then, however its bytes are paced, and a pause in it longer than
 * the silence allowed between PDUs is not an end. */
static int read_exact(Link *link, char *into, size_t size, int64_t deadline) {
    size_t got = 0;
    while (got < size) {
        if (deadline) {
            int64_t left = deadline - now_ns();
            if (left <= 0) return TIMEOUT;
            if (link->rcvtimeo == 0 || link->rcvtimeo < left || link->rcvtimeo > left + left / 16) {
                if (set_rcvtimeo(link->fd, left) != 0) {
                    link->error = errno;
                    return FAILED;
                }
                link->rcvtimeo = left;
            }
        }
        ssize_t n = recv(link->fd, into + got, size - got, MSG_WAITALL);
        if (n > 0) {
            got += (size_t)n;
            continue;
        }
        if (n == 0) return CLOSED;
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            if (deadline) continue; /* the deadline, checked above, says whether it is over */
            return TIMEOUT;
        }
        link->error = errno;
        return FAILED;
    }
    return DONE;
}

/* Read a PDU's 6-byte header: the wait for its first bytes is the socket's timeout (silence
 * between PDUs); from them on, the PDU must arrive whole by `*deadline` (now + `within`, 0
 * for none), which is set here, as the Python reader does (pdu.Connection.read_pdu). */
static int read_head(Link *link, unsigned char *head, int64_t within, int64_t *deadline) {
    ssize_t n;
    for (;;) {
        n = recv(link->fd, head, 6, 0);
        if (n > 0) break;
        if (n == 0) return CLOSED;
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return TIMEOUT;
        link->error = errno;
        return FAILED;
    }
    *deadline = within > 0 ? now_ns() + within : 0;
    return n < 6 ? read_exact(link, (char *)head + n, (size_t)(6 - n), *deadline) : DONE;
}

/* Put the socket's timeout back to the caller's (the silence allowed between PDUs) once a
 * PDU's deadline changed it. */
static int restore(Link *link, int64_t wait) {
    if (link->rcvtimeo == wait) return DONE;
    if (set_rcvtimeo(link->fd, wait) != 0) {
        link->error = errno;
        return FAILED;
    }
    link->rcvtimeo = wait;
    return DONE;
}

static uint32_t be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* Write the whole pages of buffer[placed:end] to the journal room and start them on their
 * way to the disk, once `step` bytes of them wait; returns the new `placed` (-1 once a
 * write fails or the room is outgrown: the record is then appended after its last byte). */
static Py_ssize_t place(const char *buffer, Py_ssize_t placed, Py_ssize_t end, int journal,
                        long long base, Py_ssize_t room, Py_ssize_t step) {
    if (placed < 0 || journal < 0) return placed;
    if (end > room) return -1;
    Py_ssize_t whole = end / PAGE * PAGE;
    if (whole - placed < step) return placed;
    Py_ssize_t done = placed;
    while (done < whole) {
        ssize_t n = pwrite(journal, buffer + done, (size_t)(whole - done), base + done);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        done += n;
    }
#ifdef SYNC_FILE_RANGE_WRITE
    sync_file_range(journal, base + placed, whole - placed, SYNC_FILE_RANGE_WRITE);
#endif
    return whole;
}

static PyObject *receive(PyObject *self, PyObject *args) {
    int fd, context, journal, first_only;
    Py_buffer view;
    Py_ssize_t end, placed, room, step;
    long long base, within, rcvtimeo;
    unsigned long max_pdu;
    if (!PyArg_ParseTuple(args, "iw*nikiLnnnLLp", &fd, &view, &end, &context, &max_pdu, &journal,
                          &base, &placed, &room, &step, &within, &rcvtimeo, &first_only))
        return NULL;
    char *buffer = (char *)view.buf;
    Py_ssize_t capacity = view.len;
    Link link = {fd, rcvtimeo, 0};
    const int64_t wait = rcvtimeo; /* the caller's: silence allowed between PDUs */
    int status = DONE;
    unsigned char head[12];
    Py_ssize_t held = 0; /* bytes of head read and handed back */
    unsigned int pdu_type = 0;
    uint32_t pdu_length = 0;
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        held = 0;
        int64_t deadline = 0;
        status = read_head(&link, head, within, &deadline);
        if (status != DONE) break;
        held = 6;
        pdu_type = head[0];
        pdu_length = be32(head + 2);
        if (pdu_length > max_pdu) {
            status = TOO_LONG;
            break;
        }
        if (pdu_type != P_DATA || pdu_length < 6) {
            status = HANDOFF;
            break;
        }
        status = read_exact(&link, (char *)head + 6, 6, deadline);
        if (status != DONE) break;
        held = 12;
        uint32_t item = be32(head + 6);
        Py_ssize_t value = (Py_ssize_t)item - 2;
        unsigned int flags = head[11];
        if ((uint64_t)item + 4 != pdu_length || item < 2 || head[10] != context ||
            (flags & 0x01) || value > capacity - end) {
            status = HANDOFF;
            break;
        }
        status = read_exact(&link, buffer + end, (size_t)value, deadline);
        if (status != DONE) {
            held = 0; /* the fragment is cut short: the association ends */
            break;
        }
        held = 0;
        end += value;
        int last = flags & 0x02;
        placed = place(buffer, placed, end, journal, base, room, step);
        status = restore(&link, wait);
        if (status != DONE) break;
        if (last) {
            status = DONE;
            break;
        }
        if (first_only) {
            status = FIRST;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return Py_BuildValue("inniIy#iL", status, end, placed, (int)pdu_type, (unsigned int)pdu_length,
                         (const char *)head, held, link.error, (long long)link.rcvtimeo);
}

/* Send all of `data` (the socket's SO_SNDTIMEO bounds each wait for room). */
static int send_all(Link *link, const char *data, size_t size) {
    size_t sent = 0;
    while (sent < size) {
        ssize_t n = send(link->fd, data + sent, size - sent, MSG_NOSIGNAL);
        if (n >= 0) {
            sent += (size_t)n;
            continue;
        }
        if (errno == EINTR) continue;
        link->error = errno;
        return UNSENT;
    }
    return DONE;
}

/* The body of a PDU this short comes back whole from exchange(); a longer one (a data set's
 * P-DATA-TF, where a sender sends its command and data in one) is read by the caller. */
#define SHORT_PDU 4096

/* exchange(fd, answer, max_pdu, within_ns, rcvtimeo_ns) -> (status, pdu_type, pdu_length,
 * body or None, errno, rcvtimeo_ns)
 *
 * The answer to one message sent and the next PDU's header read (and its body, where it is
 * short: the next command), in one call without the interpreter lock: a C-STORE's response
 * and its sender's next command cost the association's thread one hand-over of the lock
 * instead of three (a send, the wait for the next PDU, its body). The wait for the PDU is
 * the socket's timeout (silence between PDUs); once begun, it must arrive whole within
 * `within_ns`, as in receive(). Status: DONE (the PDU whole), HANDOFF (its header only: the
 * caller reads the body), or why it ended (UNSENT: the answer could not be sent). */
static PyObject *exchange(PyObject *self, PyObject *args) {
    int fd;
    Py_buffer answer;
    unsigned long max_pdu;
    long long within, rcvtimeo;
    if (!PyArg_ParseTuple(args, "iy*kLL", &fd, &answer, &max_pdu, &within, &rcvtimeo)) return NULL;
    Link link = {fd, rcvtimeo, 0};
    const int64_t wait = rcvtimeo;
    unsigned char head[6] = {0};
    char body[SHORT_PDU];
    unsigned int pdu_type = 0;
    uint32_t pdu_length = 0;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = send_all(&link, (const char *)answer.buf, (size_t)answer.len);
    int64_t deadline = 0;
    if (status == DONE) status = read_head(&link, head, within, &deadline);
    if (status == DONE) {
        pdu_type = head[0];
        pdu_length = be32(head + 2);
        if (pdu_length > max_pdu) {
            status = TOO_LONG;
        } else if (pdu_length > SHORT_PDU) {
            status = HANDOFF;
        } else {
            status = read_exact(&link, body, pdu_length, deadline);
            if (status == DONE) status = restore(&link, wait);
        }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&answer);
    PyObject *whole = NULL;
    if (status == DONE) {
        whole = PyBytes_FromStringAndSize(body, pdu_length);
        if (whole == NULL) return NULL;
    } else {
        whole = Py_NewRef(Py_None);
    }
    return Py_BuildValue("iiINiL", status, (int)pdu_type, (unsigned int)pdu_length, whole,
                         link.error, (long long)link.rcvtimeo);
}

static PyObject *buffer_of(PyObject *self, PyObject *arg) {
    Py_ssize_t size = PyLong_AsSsize_t(arg);
    if (size < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "a negative size");
        return NULL;
    }
    return PyByteArray_FromStringAndSize(NULL, size); /* not zero-filled: written before read */
}

static PyMethodDef methods[] = {
    {"receive", receive, METH_VARARGS,
     "receive(fd, buffer, end, context_id, max_pdu, journal_fd, journal_base, placed, room, step, within_ns,"
     " rcvtimeo_ns, first_only) -> (status, end, placed, pdu_type, pdu_length, held, errno,"
     " rcvtimeo_ns)"},
    {"exchange", exchange, METH_VARARGS,
     "exchange(fd, answer, max_pdu, within_ns, rcvtimeo_ns) -> (status, pdu_type, pdu_length,"
     " body or None, errno, rcvtimeo_ns)"},
    {"buffer", buffer_of, METH_O, "buffer(size) -> a bytearray of size bytes, not zero-filled"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_receive", NULL, -1, methods};

PyMODINIT_FUNC PyInit__receive(void) { return PyModule_Create(&module); }
