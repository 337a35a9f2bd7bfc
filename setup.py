"""The node's compiled modules; everything else is in setup.cfg.

``node.dimse._receive`` receives a C-STORE's data set without the interpreter lock;
``node.store._flush`` writes a journal record and waits for the flush that covers it
without it; ``node.store._scan`` walks a data set's element headers; ``node.store._filing``
writes a batch of spool files in threads of its own;
``node.catalogue._uid_lookup`` asks an SQLite catalogue whether a UID is in it without
letting go of the lock (it needs SQLite's headers, Debian's libsqlite3-dev). All are
optional: where one cannot be built, the node does the same in Python, as it always could.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "node.dimse._receive",
            ["node/dimse/_receive.c"],
            optional=True,
            extra_compile_args=["-O2"],
        ),
        Extension(
            "node.store._flush",
            ["node/store/_flush.c"],
            optional=True,
            extra_compile_args=["-O2"],
        ),
        Extension(
            "node.store._scan",
            ["node/store/_scan.c"],
            optional=True,
            extra_compile_args=["-O2"],
        ),
        Extension(
            "node.store._filing",
            ["node/store/_filing.c"],
            optional=True,
            extra_compile_args=["-O2", "-pthread"],
            extra_link_args=["-pthread"],
        ),
        Extension(
            "node.catalogue._uid_lookup",
            ["node/catalogue/_uid_lookup.c"],
            libraries=["sqlite3"],
            optional=True,
            extra_compile_args=["-O2"],
        ),
    ]
)
