import subprocess
import sys

import torchslim


def test_every_public_name_resolves():
    missing = [name for name in torchslim.__all__ if getattr(torchslim, name, None) is None]
    assert missing == []
    assert len(torchslim.__all__) >= 20


def test_import_stays_light():
    code = ("import sys, torchslim; heavy = ['transformers', 'onnxruntime', 'timm', 'torchvision', 'onnx', "
            "'sklearn', 'torchao', 'jinja2', 'plotly']; print(','.join(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_every_registered_method_is_listed_with_a_config():
    methods = {(m.kind, m.name) for m in torchslim.list_methods()}
    assert {("prune", "magnitude"), ("finetune", "distill"), ("quantize", "int8-static")} <= methods


def test_describe_gives_one_line_even_for_empty_or_multiline_messages():
    from torchslim.errors import describe

    assert describe(ValueError("first\nsecond")) == "ValueError: first"
    assert describe(RuntimeError("")) == "RuntimeError"
    assert describe(OSError("\n\nlate line"), limit=4) == "OSError: late"
