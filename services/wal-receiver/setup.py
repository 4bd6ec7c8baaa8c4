"""The optional native turn of the synchronous standby (see src/klio_wal_receiver/_turn.c).

Built where a C compiler, the Python headers, OpenSSL's and zlib's are present; without them the
package installs all the same and `pump.SyncPump` runs its Python loop.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "klio_wal_receiver._turn",
            ["src/klio_wal_receiver/_turn.c"],
            libraries=["crypto", "z"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
            optional=True,
        )
    ]
)
