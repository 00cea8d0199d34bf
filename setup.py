# The one thing pyproject.toml cannot say: build the cffi extension (see build_native.py).
from setuptools import setup

setup(cffi_modules=["build_native.py:ffibuilder"])
