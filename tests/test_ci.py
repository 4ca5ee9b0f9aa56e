"""The suite's own skip policy (tests/conftest.py), run on a scratch copy without a CIFAR-10 copy:
a user's plain pytest skips the integration tests and says so; CI (REQUIRE_ALL_TESTS=1, set by
.ci/run) refuses to start without the copy, and fails any skip but a missing GPU's."""
import os
import shutil
import subprocess
import sys

from conftest import ROOT

SCRATCH_TESTS = '''
import pytest
from conftest import needs_cifar


@needs_cifar
def test_needs_the_copy():
    pass


def test_uses_small_data(small_data):
    pass


def test_skips_for_no_machine_reason():
    pytest.skip("not today")


@pytest.mark.cuda
def test_needs_a_gpu():
    pytest.skip("no CUDA device")
'''


def scratch_pytest(tmp_path, *args, **env):
    """pytest on tests/test_scratch.py in a copy of the repository's modules and conftest, with no
    CIFAR-10 copy beside it and CIFAR10_DIR as given."""
    repo = tmp_path / "repo"
    if not repo.exists():
        (repo / "tests").mkdir(parents=True)
        for module in ROOT.glob("*.py"):
            shutil.copy(module, repo)
        for name in ("conftest.py", "script_runner.py"):
            shutil.copy(ROOT / "tests" / name, repo / "tests")
        (repo / "tests" / "test_scratch.py").write_text(SCRATCH_TESTS)
    base = {k: v for k, v in os.environ.items() if k not in ("CIFAR10_DIR", "REQUIRE_ALL_TESTS")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                           "tests/test_scratch.py", *args], cwd=repo, env={**base, **env},
                          capture_output=True, text=True, timeout=300)


def test_plain_pytest_without_the_copy_skips_the_integration_tests_and_says_so(tmp_path):
    result = scratch_pytest(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 skipped" in result.stdout
    assert "2 integration tests skipped: no local CIFAR-10 copy (set CIFAR10_DIR)" in result.stdout


def test_ci_refuses_to_run_without_the_copy(tmp_path):
    result = scratch_pytest(tmp_path, REQUIRE_ALL_TESTS="1")
    assert result.returncode == 4  # pytest's usage error: no test ran
    assert "REQUIRE_ALL_TESTS=1 and no local CIFAR-10 copy" in result.stderr


def test_ci_fails_every_skip_but_a_missing_gpus(tmp_path):
    (tmp_path / "cifar").mkdir()  # a copy is there (the tests that need its images are left out)
    result = scratch_pytest(tmp_path, "-k", "not small_data", REQUIRE_ALL_TESTS="1", CIFAR10_DIR=str(tmp_path / "cifar"))
    assert result.returncode == 1
    assert "1 failed, 1 passed, 1 skipped" in result.stdout, result.stdout
    assert "skipped under REQUIRE_ALL_TESTS=1, where every test must run: not today" in result.stdout
    assert "SKIPPED [1] tests/test_scratch.py" in result.stdout and "no CUDA device" in result.stdout
