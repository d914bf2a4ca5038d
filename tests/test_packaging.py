"""Packaging: the top-level ``kernels`` package must not switch on transformers' hub-kernels integration."""

from __future__ import annotations

import subprocess
import sys


def test_transformers_kernels_integration_stays_off():
    code = (
        "import kernels, transformers;"
        "from transformers.utils import import_utils as iu;"
        "from transformers.integrations import hub_kernels as hk;"
        "assert not iu.is_kernels_available(), 'transformers sees kvpolicy kernels as hub kernels';"
        "assert not hk.is_kernels_available();"
        "import transformers.models.llama.modeling_llama as m;"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_kernels_import_is_light():
    out = subprocess.run(
        [sys.executable, "-c", "import sys, kernels; print('triton' in sys.modules, 'transformers' in sys.modules)"],
        capture_output=True, text=True,
    )
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_kvpolicy_import_does_not_load_transformers():
    out = subprocess.run(
        [sys.executable, "-c", "import sys, kvpolicy; kvpolicy.get_registry(); print('transformers' in sys.modules)"],
        capture_output=True, text=True,
    )
    assert out.stdout.strip() == "False", out.stderr
