"""The project's shape: the three scripts are leaves, the shared modules never import them, and no
module imports one that imports it back."""
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


def import_cycle():
    """A list of modules each importing the next and the last the first, or None: a depth-first walk of
    the graph of project modules, every import counted (lazy ones too)."""
    graph = {m: sorted(imported_modules(ROOT / f"{m}.py") & set(MODULES) - {m}) for m in MODULES}
    done, path = set(), []

    def walk(module):
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        path.append(module)
        found = next(filter(None, map(walk, graph[module])), None)
        path.pop()
        done.add(module)
        return found

    return next(filter(None, map(walk, MODULES)), None)


def test_no_module_imports_itself_back():
    # Each module sits on its own floor: a circle (cli -> untrusted -> cli, say) means neither can be
    # read, tested or imported without the other, and only a lazy import keeps it from failing.
    cycle = import_cycle()
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_shared_modules_are_there():
    # What the scripts share lives in modules named for what they hold.
    assert {"cli", "dataset", "models", "metrics", "attacks", "images", "untrusted", "restricted_pickle",
            "pickled_tensors", "pickled_data",
            "resume_state", "treatments", "label_repair", "lr_sweep", "training_report", "explain", "gradient_masking",
            "adversarial_figures"} <= set(MODULES)


def test_no_dict_literal_names_a_key_twice():
    # {"case": a, ..., "case": b} keeps b silently: a table of test cases would lose one without a word.
    for path in sorted([*ROOT.glob("*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Dict):
                keys = [ast.literal_eval(k) for k in node.keys if isinstance(k, ast.Constant)]
                twice = sorted({repr(k) for k in keys if keys.count(k) > 1})
                assert not twice, f"{path.name}:{node.lineno}: the dict literal names {', '.join(twice)} twice"
