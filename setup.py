"""Only the C part of the build (metadata lives in pyproject.toml): the Rank path's loops,
appliance/ranking/_rankcore.c, and the sequence encoder's query, appliance/ranking/_seqcore.c. Both are
optional: without a compiler the package installs and ranks with numpy."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "appliance.ranking._rankcore",
            ["appliance/ranking/_rankcore.c"],
            depends=["appliance/ranking/_buffers.h"],
            # No fused multiply-add (aarch64 contracts by default): the roundings stay numpy's.
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno", "-std=c11"],
            optional=True,
        ),
        Extension(
            "appliance.ranking._seqcore",
            ["appliance/ranking/_seqcore.c"],
            depends=["appliance/ranking/_buffers.h"],
            extra_compile_args=["-O3", "-fno-math-errno", "-ffp-contract=fast", "-Wno-psabi", "-std=c11"],
            optional=True,
        ),
    ]
)
