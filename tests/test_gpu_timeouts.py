"""The conftest hook that bounds every GPU test: run on a throwaway suite through pytester (no GPU needed, the
tests are selected with -m gpu but do nothing GPU-specific)."""

from pathlib import Path

pytest_plugins = ["pytester"]


def test_every_gpu_test_gets_a_timeout(pytester, monkeypatch):
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs a CUDA GPU\n")
    pytester.makepyfile(test_hang="""
import time
import pytest

@pytest.mark.gpu
def test_hangs():
    time.sleep(30)

@pytest.mark.gpu
@pytest.mark.timeout(20)
def test_own_limit_kept():
    time.sleep(2)

def test_cpu_not_bounded():
    time.sleep(2)
""")
    monkeypatch.setenv("ZEBRA_GPU_TEST_TIMEOUT", "1")
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    res.assert_outcomes(passed=2, failed=1)
    out = res.stdout.str()
    assert "FAILED test_hang.py::test_hangs" in out and "Timeout" in out
