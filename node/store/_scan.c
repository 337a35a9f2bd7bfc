/* The walk over a data set's element headers (node.store.structure), compiled.
 *
 * The Python walker reads each element header with struct and steps over its value: about
 * 1 us an element, so 90-300 us for a CT header of 256 elements, on the answer's path of
 * every instance a listener receives. This walks the same headers by the same rules
 * (node/store/structure.py, _Walk._elements, _items and _fragments) and answers what the
 * Python walker would: the wanted top-level values, whether pydicom reads the bytes as this
 * walk does, where pixel data that runs past the start ends, or why the bytes are not well
 * formed, in the Python walker's words.
 *
 * One thing it does not decide: whether pydicom reads an implicit VR element of undefined
 * length as a sequence depends on pydicom's dictionary, so the tags of such elements are
 * handed back and the caller asks it.
 *
 * A long walk (a large buffer: enhanced multi-frame headers, thousands of fragments) runs
 * without the interpreter lock; the values it keeps are copied out once it has it back.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ITEM 0xFFFEE000u
#define ITEM_END 0xFFFEE00Du
#define SEQUENCE_END 0xFFFEE0DDu
#define UNDEFINED 0xFFFFFFFFu
#define PIXEL_DATA 0x7FE00010u
#define FLOAT_PIXEL_DATA 0x7FE00008u
#define DOUBLE_PIXEL_DATA 0x7FE00009u
#define RELEASE_FROM (1 << 20) /* bytes from which the walk lets go of the lock */

/* Offsets into the data: 64-bit wherever Py_ssize_t is not, so that an offset plus a 32-bit
 * length never wraps. */
typedef int64_t Pos;

enum { VR_UNKNOWN = 0, VR_SHORT = 1, VR_LONG = 2 };
static unsigned char vr_kinds[65536]; /* by the VR's two bytes, as read */

enum {
    OK = 0,
    CUT_SHORT,       /* an element header is cut short */
    DELIMITER,       /* a delimiter or item tag among elements at {pos} */
    UNKNOWN_VR,      /* unknown VR {vr!r} at {pos} */
    UNDEFINED_VALUE, /* undefined length for {vr} at {pos} */
    NOT_ENCAPSULATED,
    VALUE_PAST,    /* a value of {length} bytes runs past its end at {pos} */
    NESTED,        /* sequences nested more than {max} deep */
    NOT_ITEM,      /* a sequence holds something other than items at {pos} */
    ITEM_PAST,     /* an item of {length} bytes runs past its end at {pos} */
    NOT_FRAGMENT,  /* encapsulated pixel data holds a non-fragment at {pos} */
    FRAGMENT_PAST, /* a fragment of {length} bytes runs past its end at {pos} */
    NO_MEMORY,
};

typedef struct {
    uint32_t tag;
    char vr[2];
    Pos at, length;
} Kept;

typedef struct {
    const unsigned char *data;
    int little, encapsulated, open_end, max_nesting;  /* encapsulated: -1 unknown */
    uint32_t *wanted;
    Pos n_wanted;
    int stopped, plain;
    Pos pixel_end; /* -1: none */
    Kept *kept;
    Pos n_kept, room_kept;
    uint32_t *asks;
    Pos n_asks, room_asks;
    /* why it stopped */
    int error;
    Pos error_at;
    uint32_t error_length;
    char error_vr[2];
} Walk;

static inline uint16_t u16(const Walk *w, Pos at) {
    const unsigned char *p = w->data + at;
    return w->little ? (uint16_t)(p[0] | p[1] << 8) : (uint16_t)(p[0] << 8 | p[1]);
}

static inline uint32_t u32(const Walk *w, Pos at) {
    const unsigned char *p = w->data + at;
    return w->little ? (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                           (uint32_t)p[3] << 24
                     : (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 |
                           (uint32_t)p[3];
}

static inline int wanted(const Walk *w, uint32_t tag) {
    for (Pos i = 0; i < w->n_wanted; i++)
        if (w->wanted[i] == tag) return 1;
    return 0;
}

static int fail(Walk *w, int error, Pos at, uint32_t length) {
    w->error = error;
    w->error_at = at;
    w->error_length = length;
    return -1;
}

static int keep(Walk *w, uint32_t tag, const char *vr, Pos at, Pos length) {
    if (w->n_kept == w->room_kept) {
        Pos room = w->room_kept ? 2 * w->room_kept : 16;
        Kept *grown = realloc(w->kept, (size_t)room * sizeof(Kept));
        if (grown == NULL) return fail(w, NO_MEMORY, 0, 0);
        w->kept = grown;
        w->room_kept = room;
    }
    Kept *k = &w->kept[w->n_kept++];
    k->tag = tag;
    if (vr) {
        k->vr[0] = vr[0];
        k->vr[1] = vr[1];
    } else {
        k->vr[0] = k->vr[1] = 0;
    }
    k->at = at;
    k->length = length;
    return 0;
}

static int ask(Walk *w, uint32_t tag) {
    if (w->n_asks == w->room_asks) {
        Pos room = w->room_asks ? 2 * w->room_asks : 8;
        uint32_t *grown = realloc(w->asks, (size_t)room * sizeof(uint32_t));
        if (grown == NULL) return fail(w, NO_MEMORY, 0, 0);
        w->asks = grown;
        w->room_asks = room;
    }
    w->asks[w->n_asks++] = tag;
    return 0;
}

#define IS_VR(vr, a, b) ((vr)[0] == (a) && (vr)[1] == (b))

static Pos items(Walk *w, Pos pos, Pos limit, int delimited, int implicit,
                        int depth);

/* An undefined length that pydicom's reader meets: does it read it as this walk does?
 * (_Walk._undefined) */
static int undefined(Walk *w, uint32_t tag, const char *vr, int depth) {
    if (depth == 0 && wanted(w, tag))
        w->plain = 0; /* pydicom parses it into a sequence as it reads */
    else if (vr == NULL) {
        if (w->plain) return ask(w, tag); /* a sequence in pydicom's dictionary? */
    } else if (!IS_VR(vr, 'S', 'Q'))
        w->plain = 0; /* UN read as explicit items, or fragments read as a value */
    return 0;
}

/* Encapsulated pixel data: items of defined length, then the delimiter. */
static Pos fragments(Walk *w, Pos pos, Pos limit) {
    for (;;) {
        if (pos + 8 > limit) return fail(w, CUT_SHORT, pos, 0);
        uint32_t tag = (uint32_t)u16(w, pos) << 16 | u16(w, pos + 2);
        uint32_t length = u32(w, pos + 4);
        if (tag == SEQUENCE_END) return pos + 8;
        if (tag != ITEM || length == UNDEFINED) return fail(w, NOT_FRAGMENT, pos, 0);
        Pos end = pos + 8 + (Pos)length;
        if (end > limit) return fail(w, FRAGMENT_PAST, pos, length);
        pos = end;
    }
}

/* Elements from `pos` up to `limit` or, if `delimited`, up to an item delimiter; where
 * they end, or -1. */
static Pos elements(Walk *w, Pos pos, Pos limit, int delimited,
                           int implicit, int depth) {
    const unsigned char *data = w->data;
    for (;;) {
        if (pos == limit && !delimited) return pos;
        if (pos + 8 > limit) return fail(w, CUT_SHORT, pos, 0);
        uint32_t tag = (uint32_t)u16(w, pos) << 16 | u16(w, pos + 2);
        const char *vr = NULL;
        uint32_t length;
        if (implicit)
            length = u32(w, pos + 4);
        else {
            vr = (const char *)data + pos + 4;
            length = u16(w, pos + 6);
        }
        if (tag == ITEM_END && delimited) return pos + 8;
        if (tag >> 16 == 0xFFFE) return fail(w, DELIMITER, pos, 0);
        Pos start = pos;
        if (vr == NULL)
            pos += 8;
        else {
            int kind = vr_kinds[(unsigned char)vr[0] << 8 | (unsigned char)vr[1]];
            if (kind == VR_LONG) {
                if (pos + 12 > limit) return fail(w, CUT_SHORT, pos, 0);
                length = u32(w, pos + 8);
                pos += 12;
            } else if (kind == VR_SHORT)
                pos += 8;
            else {
                w->error_vr[0] = vr[0];
                w->error_vr[1] = vr[1];
                return fail(w, UNKNOWN_VR, start, 0);
            }
        }
        int reading = !w->stopped; /* pydicom's reader is here too */
        if (reading && depth == 0 &&
            (tag == PIXEL_DATA || tag == FLOAT_PIXEL_DATA || tag == DOUBLE_PIXEL_DATA)) {
            w->stopped = 1;
            reading = 0;
        }
        if (length == UNDEFINED) {
            if (reading && undefined(w, tag, vr, depth) < 0) return -1;
            if (tag == PIXEL_DATA && vr != NULL && (IS_VR(vr, 'O', 'B') || IS_VR(vr, 'O', 'W')) &&
                w->encapsulated != 0)
                pos = fragments(w, pos, limit);
            else if (implicit || IS_VR(vr, 'S', 'Q') || IS_VR(vr, 'U', 'N'))
                /* UN of undefined length: implicit VR */
                pos = items(w, pos, limit, 1, vr != NULL && IS_VR(vr, 'U', 'N') ? 1 : implicit,
                            depth + 1);
            else {
                w->error_vr[0] = vr[0];
                w->error_vr[1] = vr[1];
                return fail(w, UNDEFINED_VALUE, start, 0);
            }
            if (pos < 0) return -1;
            continue;
        }
        if (tag == PIXEL_DATA && depth == 0 && w->encapsulated == 1)
            return fail(w, NOT_ENCAPSULATED, start, 0);
        Pos end = pos + (Pos)length;
        if (end > limit) {
            if (w->open_end && depth == 0 && tag == PIXEL_DATA) {
                w->pixel_end = end; /* the rest of the data set is beyond the start */
                return limit;
            }
            return fail(w, VALUE_PAST, start, length);
        }
        if (reading && depth == 0 && wanted(w, tag) && keep(w, tag, vr, pos, end - pos) < 0)
            return -1;
        if (vr != NULL && IS_VR(vr, 'S', 'Q')) {
            pos = items(w, pos, end, 0, implicit, depth + 1);
            if (pos < 0) return -1;
        } else
            pos = end;
    }
}

/* The items of a sequence, up to `limit` or its delimiter. */
static Pos items(Walk *w, Pos pos, Pos limit, int delimited, int implicit,
                        int depth) {
    if (depth > w->max_nesting) return fail(w, NESTED, 0, 0);
    for (;;) {
        if (pos == limit && !delimited) return pos;
        if (pos + 8 > limit) return fail(w, CUT_SHORT, pos, 0);
        uint32_t tag = (uint32_t)u16(w, pos) << 16 | u16(w, pos + 2);
        uint32_t length = u32(w, pos + 4);
        if (tag == SEQUENCE_END && delimited) return pos + 8;
        if (tag != ITEM) return fail(w, NOT_ITEM, pos, 0);
        pos += 8;
        if (length == UNDEFINED) {
            pos = elements(w, pos, limit, 1, implicit, depth);
        } else {
            Pos end = pos + (Pos)length;
            if (end > limit) return fail(w, ITEM_PAST, pos - 8, length);
            pos = elements(w, pos, end, 0, implicit, depth);
        }
        if (pos < 0) return -1;
    }
}

static PyObject *why(const Walk *w) {
    long long at = (long long)w->error_at;
    unsigned long length = (unsigned long)w->error_length;
    switch (w->error) {
    case CUT_SHORT:
        return PyUnicode_FromString("an element header is cut short");
    case DELIMITER:
        return PyUnicode_FromFormat("a delimiter or item tag among elements at %lld", at);
    case UNKNOWN_VR: {
        PyObject *vr = PyUnicode_DecodeLatin1(w->error_vr, 2, NULL);
        if (vr == NULL) return NULL;
        PyObject *text = PyUnicode_FromFormat("unknown VR %R at %lld", vr, at);
        Py_DECREF(vr);
        return text;
    }
    case UNDEFINED_VALUE:
        return PyUnicode_FromFormat("undefined length for %c%c at %lld", w->error_vr[0],
                                    w->error_vr[1], at);
    case NOT_ENCAPSULATED:
        return PyUnicode_FromString(
            "pixel data not encapsulated in an encapsulated transfer syntax");
    case VALUE_PAST:
        return PyUnicode_FromFormat("a value of %lu bytes runs past its end at %lld",
                                    length, at);
    case NESTED:
        return PyUnicode_FromFormat("sequences nested more than %d deep", w->max_nesting);
    case NOT_ITEM:
        return PyUnicode_FromFormat("a sequence holds something other than items at %lld",
                                    at);
    case ITEM_PAST:
        return PyUnicode_FromFormat("an item of %lu bytes runs past its end at %lld",
                                    length, at);
    case NOT_FRAGMENT:
        return PyUnicode_FromFormat("encapsulated pixel data holds a non-fragment at %lld",
                                    at);
    case FRAGMENT_PAST:
        return PyUnicode_FromFormat("a fragment of %lu bytes runs past its end at %lld",
                                    length, at);
    default:
        return PyErr_NoMemory();
    }
}

/* The answer once the walk is over, with the interpreter lock: (elements, plain, pixel end
 * or None, tags to ask pydicom's dictionary of), or the reason as a str. */
static PyObject *answer(const Walk *w, Pos end) {
    if (end < 0) return why(w);
    PyObject *kept = PyDict_New();
    if (kept == NULL) return NULL;
    for (Py_ssize_t i = 0; i < w->n_kept; i++) {
        const Kept *k = &w->kept[i];
        PyObject *tag = PyLong_FromUnsignedLong(k->tag);
        PyObject *vr = k->vr[0] || k->vr[1] ? PyBytes_FromStringAndSize(k->vr, 2)
                                            : Py_NewRef(Py_None);
        PyObject *value =
            PyBytes_FromStringAndSize((const char *)w->data + k->at, (Py_ssize_t)k->length);
        PyObject *pair = tag && vr && value ? PyTuple_Pack(2, vr, value) : NULL;
        int set = pair ? PyDict_SetItem(kept, tag, pair) : -1;
        Py_XDECREF(tag);
        Py_XDECREF(vr);
        Py_XDECREF(value);
        Py_XDECREF(pair);
        if (set < 0) {
            Py_DECREF(kept);
            return NULL;
        }
    }
    PyObject *asks = PyTuple_New(w->n_asks);
    if (asks == NULL) {
        Py_DECREF(kept);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < w->n_asks; i++) {
        PyObject *tag = PyLong_FromUnsignedLong(w->asks[i]);
        if (tag == NULL) {
            Py_DECREF(kept);
            Py_DECREF(asks);
            return NULL;
        }
        PyTuple_SET_ITEM(asks, i, tag);
    }
    PyObject *pixel_end = w->pixel_end < 0 ? Py_NewRef(Py_None) : PyLong_FromLongLong(w->pixel_end);
    if (pixel_end == NULL) {
        Py_DECREF(kept);
        Py_DECREF(asks);
        return NULL;
    }
    return Py_BuildValue("(NNNN)", kept, PyBool_FromLong(w->plain), pixel_end, asks);
}

PyDoc_STRVAR(walk_doc,
             "walk(data, start, implicit, little, encapsulated, open_end, wanted, max_nesting)\n"
             "\n"
             "Walk the data set in ``data`` from ``start`` to its end, as structure._Walk's\n"
             "_elements(start, len(data), False, implicit, 0) does with the same settings\n"
             "(``encapsulated``: True, False or None). Returns (elements, plain, pixel_end,\n"
             "asks): the wanted top-level values before the pixel data, tag -> (VR or None,\n"
             "value); False where pydicom reads the bytes otherwise; where pixel data running\n"
             "past an open end ends, or None; the tags of implicit VR elements of undefined\n"
             "length whose reading by pydicom depends on its dictionary. Or, for bytes that are\n"
             "not well formed, why, as a str.");

static PyObject *walk(PyObject *self, PyObject *args) {
    Py_buffer buffer;
    Py_ssize_t start;
    int implicit, little, open_end, max_nesting;
    PyObject *encapsulated, *tags;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nppOpOi", &buffer, &start, &implicit, &little, &encapsulated,
                          &open_end, &tags, &max_nesting))
        return NULL;
    Walk w;
    memset(&w, 0, sizeof w);
    w.data = buffer.buf;
    w.little = little;
    w.encapsulated = encapsulated == Py_None ? -1 : PyObject_IsTrue(encapsulated);
    w.open_end = open_end;
    w.max_nesting = max_nesting;
    w.plain = 1;
    w.pixel_end = -1;
    PyObject *result = NULL;
    if (start < 0 || start > buffer.len) {
        PyErr_SetString(PyExc_ValueError, "start is outside the data");
        goto done;
    }
    PyObject *listed = PySequence_Fast(tags, "wanted must be an iterable of tags");
    if (listed == NULL) goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(listed);
    w.wanted = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(uint32_t));
    if (w.wanted == NULL) {
        Py_DECREF(listed);
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long tag = PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(listed, i));
        if (tag == (unsigned long)-1 && PyErr_Occurred()) break;
        w.wanted[w.n_wanted++] = (uint32_t)tag;
    }
    Py_DECREF(listed);
    if (PyErr_Occurred()) goto done;
    Pos end;
    if (buffer.len - start >= RELEASE_FROM) {
        Py_BEGIN_ALLOW_THREADS
        end = elements(&w, start, buffer.len, 0, implicit, 0);
        Py_END_ALLOW_THREADS
    } else
        end = elements(&w, start, buffer.len, 0, implicit, 0);
    result = answer(&w, end);
done:
    PyMem_Free(w.wanted);
    free(w.kept);
    free(w.asks);
    PyBuffer_Release(&buffer);
    return result;
}

static PyMethodDef methods[] = {
    {"walk", walk, METH_VARARGS, walk_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_scan", NULL, -1, methods};

PyMODINIT_FUNC PyInit__scan(void) {
    static const char *shorts[] = {"AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS",
                                   "LO", "LT", "PN", "SH", "SL", "SS", "ST", "TM", "UI", "UL",
                                   "US"};
    static const char *longs[] = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ",
                                  "SV", "UC", "UN", "UR", "UT", "UV"};
    for (size_t i = 0; i < sizeof shorts / sizeof *shorts; i++)
        vr_kinds[(unsigned char)shorts[i][0] << 8 | (unsigned char)shorts[i][1]] = VR_SHORT;
    for (size_t i = 0; i < sizeof longs / sizeof *longs; i++)
        vr_kinds[(unsigned char)longs[i][0] << 8 | (unsigned char)longs[i][1]] = VR_LONG;
    return PyModule_Create(&module);
}
