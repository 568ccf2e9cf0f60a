"""Builds the optional C++ CPU backend ``adamoe_kernels._C`` from csrc/ and python_bindings/.

Install with ``pip install --no-build-isolation -e .`` so the installed torch is used. If torch is
missing at build time, or ``ADAMOE_NO_EXT=1`` is set, the package installs without the extension
and falls back to the Triton-interpreter / torch backends on CPU.
"""

import glob
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("ADAMOE_NO_EXT", "0") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # no torch at build time: pure-Python install
        BuildExtension = CppExtension = None
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("python_bindings/*.cpp"))
    if CppExtension is not None and sources:
        ext_modules = [
            CppExtension(
                name="adamoe_kernels._C",
                sources=sources,
                include_dirs=[os.path.abspath("csrc")],
                extra_compile_args=["-O3", "-fopenmp", "-std=c++20", "-fno-math-errno", "-fno-trapping-math"],
                extra_link_args=["-fopenmp"],
            )
        ]
        cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=False)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
