"""Triton kernels of kvpolicy: each module holds a kernel, its launcher and its torch reference.

Importing this package is cheap and never imports triton. It is a top-level package named ``kernels``;
transformers' optional hub-``kernels`` integration must stay off when it is installed (this package has no
``__version__`` and its distribution, kvpolicy, is not a hub-kernels release; tested in
``tests/test_packaging.py``).
"""
