/* Whether a SOP Instance UID is catalogued, asked of an SQLite catalogue without letting go
 * of the interpreter lock.
 *
 * Every instance the listener receives asks this once, on its association's thread, while
 * its data set arrives. The question itself takes about 10 us (one indexed lookup, its
 * pages cached). Asked through Python's sqlite3 module, the lock is released and taken
 * back around each step of it (the statement's step, the step after its row, its reset):
 * with ten associations receiving at once, each of those hand-overs waited behind the
 * other threads, 1.7 ms per question in all, and the listener's processor time per
 * instance rose by 0.15-0.2 ms (futex calls and context switches). Held throughout, the
 * question costs what it costs; a page not cached is one read of the disk, during which
 * the other threads wait.
 *
 * Nothing here waits on a lock of SQLite's: the connection has no busy timeout, and a
 * question SQLite cannot answer at once (SQLITE_BUSY, or any other failure) raises
 * LookupFailed, and the caller asks the usual way, which waits, or says why it cannot.
 *
 * One connection, in autocommit: each question is a read transaction of its own, ended by
 * the statement's reset, so it sees every commit before it and holds no snapshot after.
 * Used only with the interpreter lock held, so one connection serves every thread.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <sqlite3.h>

static PyObject *LookupFailed;

typedef struct {
    PyObject_HEAD
    sqlite3 *db;
    sqlite3_stmt *statement;
} Catalogued;

static void release(Catalogued *self) {
    if (self->statement != NULL) sqlite3_finalize(self->statement);
    if (self->db != NULL) sqlite3_close_v2(self->db);
    self->statement = NULL;
    self->db = NULL;
}

static int Catalogued_init(Catalogued *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"path", "sql", NULL};
    PyObject *path;
    const char *sql;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&s", keywords, PyUnicode_FSConverter, &path,
                                     &sql))
        return -1;
    release(self);
    /* Read and write, as the catalogue's other connections open it: a connection that may
     * not write cannot take part in WAL's shared-memory index. It only reads. */
    int rc = sqlite3_open_v2(PyBytes_AS_STRING(path), &self->db,
                             SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL);
    Py_DECREF(path);
    if (rc == SQLITE_OK)
        rc = sqlite3_prepare_v3(self->db, sql, -1, SQLITE_PREPARE_PERSISTENT, &self->statement,
                                NULL);
    if (rc == SQLITE_OK && sqlite3_bind_parameter_count(self->statement) != 1) {
        PyErr_SetString(PyExc_ValueError, "the lookup takes one parameter, the UID");
        release(self);
        return -1;
    }
    if (rc != SQLITE_OK) {
        PyErr_Format(LookupFailed, "cannot open the catalogue: %s",
                     self->db != NULL ? sqlite3_errmsg(self->db) : sqlite3_errstr(rc));
        release(self);
        return -1;
    }
    return 0;
}

static PyObject *Catalogued_call(Catalogued *self, PyObject *args, PyObject *kwargs) {
    const char *uid;
    Py_ssize_t length;
    if (!PyArg_ParseTuple(args, "s#", &uid, &length)) return NULL;
    if (self->statement == NULL) {
        PyErr_SetString(LookupFailed, "closed");
        return NULL;
    }
    int rc = sqlite3_bind_text(self->statement, 1, uid, (int)length, SQLITE_STATIC);
    if (rc == SQLITE_OK) rc = sqlite3_step(self->statement);
    sqlite3_reset(self->statement); /* ends the read transaction, whatever the step said */
    sqlite3_clear_bindings(self->statement);
    if (rc == SQLITE_ROW) Py_RETURN_TRUE;
    if (rc == SQLITE_DONE) Py_RETURN_FALSE;
    PyErr_Format(LookupFailed, "%s", sqlite3_errstr(rc));
    return NULL;
}

static PyObject *Catalogued_close(Catalogued *self, PyObject *Py_UNUSED(ignored)) {
    release(self);
    Py_RETURN_NONE;
}

static void Catalogued_dealloc(Catalogued *self) {
    release(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Catalogued_methods[] = {
    {"close", (PyCFunction)Catalogued_close, METH_NOARGS, "Close the connection (safe to repeat)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CataloguedType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "node.catalogue._uid_lookup.Catalogued",
    .tp_basicsize = sizeof(Catalogued),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Catalogued(path, sql): called with a UID, whether ``sql`` (a query with one "
              "parameter, the UID) finds a row in the SQLite database at ``path``.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Catalogued_init,
    .tp_dealloc = (destructor)Catalogued_dealloc,
    .tp_call = (ternaryfunc)Catalogued_call,
    .tp_methods = Catalogued_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_uid_lookup",
    "Whether a UID is catalogued in SQLite, asked without letting go of the interpreter lock.", -1,
    NULL,
};

PyMODINIT_FUNC PyInit__uid_lookup(void) {
    if (PyType_Ready(&CataloguedType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    LookupFailed = PyErr_NewException("node.catalogue._uid_lookup.LookupFailed", NULL, NULL);
    if (LookupFailed == NULL || PyModule_AddObjectRef(m, "LookupFailed", LookupFailed) < 0 ||
        PyModule_AddObjectRef(m, "Catalogued", (PyObject *)&CataloguedType) < 0) {
        Py_XDECREF(LookupFailed);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
