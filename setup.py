"""The node's one compiled module; everything else is in setup.cfg.

``node.dimse._receive`` receives a C-STORE's data set without the interpreter lock. It is
optional: where it cannot be built, the listener receives in Python, as it always could.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "node.dimse._receive",
            ["node/dimse/_receive.c"],
            optional=True,
            extra_compile_args=["-O2"],
        )
    ]
)
