"""Under CI=true a skip for a missing module that install.sh installs is a failure (conftest.py)."""

from pathlib import Path

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()
TEST = "import pytest\n\ndef test_a():\n    pytest.importorskip('gguf.not_a_module')\n\ndef test_b():\n    pytest.importorskip('vllm_not_installed_here')\n"


def test_ci_turns_install_sh_skips_into_failures(pytester, monkeypatch):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(TEST)
    monkeypatch.setenv("CI", "true")
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(failed=1, skipped=1)
    monkeypatch.setenv("CI", "false")
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(skipped=2)
