"""The project's shape: the three scripts are leaves, and the shared modules never import them."""
import ast

import pytest

from conftest import ROOT

SCRIPTS = {"tester", "trainer", "adversarialExample"}
MODULES = sorted(p.stem for p in ROOT.glob("*.py"))


def imported_modules(path):
    """Top-level names of every module path imports, anywhere in the file (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", MODULES)
def test_no_module_imports_a_script(module):
    imported = imported_modules(ROOT / f"{module}.py") & SCRIPTS
    assert not imported, f"{module}.py imports the script(s) {sorted(imported)}; move what it needs to a shared module"


def test_the_shared_modules_are_there():
    # What the scripts share lives in modules named for what they hold.
    assert {"cli", "dataset", "models", "metrics", "attacks", "images", "untrusted", "restricted_pickle",
            "resume_state", "treatments", "label_repair", "lr_sweep", "explain", "gradient_masking",
            "adversarial_figures"} <= set(MODULES)
