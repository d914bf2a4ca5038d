"""Package discovery only (everything else is in pyproject.toml).

The Triton kernels live in the folder ``kernels/`` but install as ``kvpolicy_kernels``: a top-level ``kernels``
module would shadow Hugging Face's ``kernels`` distribution, which transformers imports.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["kvpolicy", "kvpolicy.*", "kvpolicy_icecache*", "kvpolicy_contrib*"])
    + ["kvpolicy_kernels"],
    package_dir={"kvpolicy_kernels": "kernels"},
)
