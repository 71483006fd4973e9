"""`import deploykit` (and the CLI's --help / recipe parsing) must not import heavy stacks."""

import subprocess
import sys

HEAVY = ("torch", "onnxruntime", "onnx", "timm", "bentoml", "openvino", "tensorrt", "nncf", "matplotlib")


def _imported_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True).stdout.split()
    return {m for m in out if m.split(".")[0] in HEAVY}


def test_import_deploykit_is_light():
    assert _imported_after("import deploykit") == set()


def test_recipe_validation_and_cli_module_are_light():
    assert _imported_after("import deploykit.cli\nfrom deploykit.recipe import load_recipe\nload_recipe('int8-ptq')") == set()
