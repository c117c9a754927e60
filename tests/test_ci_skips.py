"""The rule in conftest.py for missing test dependencies: skip on a developer's machine, fail under CI=true.

Each case runs pytest in a child process, with or without CI=true, and reads its exit code and report.
"""

import os
import subprocess
import sys
import textwrap

from conftest import REPO_ROOT

TESTS = REPO_ROOT / "tests"


def run_pytest(args, ci, cwd=REPO_ROOT, pythonpath=()):
    env = {name: value for name, value in os.environ.items() if name not in ("CI", "PYTEST_ADDOPTS")}
    if ci:
        env["CI"] = "true"
    env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *args], cwd=cwd,
                            env=env, capture_output=True, text=True, timeout=600)
    return result.returncode, result.stdout + result.stderr


def test_test_app_with_gradio_unimportable_skips_locally_and_fails_under_ci(tmp_path):
    # gradio installed without one of its dependencies, as `pip install --no-deps gradio` left it
    shadow = tmp_path / "shadow" / "gradio"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'orjson'\", name='orjson')\n")

    code, report = run_pytest(["tests/test_app.py"], ci=False, pythonpath=[shadow.parent])
    assert code == 5, report  # pytest's "no tests ran": the whole module skipped
    assert "skipped" in report and "gradio cannot be imported (ModuleNotFoundError: No module named 'orjson')" in report

    code, report = run_pytest(["tests/test_app.py"], ci=True, pythonpath=[shadow.parent])
    assert code != 0, report
    assert "gradio cannot be imported" in report and "CI=true: a missing test dependency fails" in report
    assert " passed" not in report


def test_every_kind_of_skip_fails_under_ci_except_the_live_hub_upload(tmp_path):
    (tmp_path / "test_kinds.py").write_text(textwrap.dedent('''
        import pytest
        from conftest import missing

        @pytest.fixture
        def olah():
            pytest.skip("olah not found")

        def test_plain_skip():
            pytest.skip("Chromium is not installed")

        def test_skip_in_a_fixture(olah):
            pass

        @pytest.mark.skipif(True, reason="no data")
        def test_skipif():
            pass

        def test_helper():
            missing("the shared data is not there")

        @pytest.mark.xfail(reason="expected to fail", strict=True)
        def test_xfail():
            assert False

        def test_passes():
            pass
    '''))
    (tmp_path / "test_module_level.py").write_text('import pytest\npytest.importorskip("no_such_module_here")\n')
    (tmp_path / "test_hub_roundtrip.py").write_text(textwrap.dedent('''
        import pytest

        @pytest.mark.skipif(True, reason="live upload: needs HF_TOKEN")
        def test_push_to_hub_uploads_a_private_model_repo_live():
            pass
    '''))
    args = ["-p", "conftest", "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path)]

    code, report = run_pytest(args, ci=False, cwd=tmp_path, pythonpath=[TESTS])
    assert code == 0, report
    assert "1 passed, 6 skipped, 1 xfailed" in report

    code, report = run_pytest(["--continue-on-collection-errors", *args], ci=True, cwd=tmp_path, pythonpath=[TESTS])
    assert code == 1, report
    for name in ("test_plain_skip", "test_skip_in_a_fixture", "test_skipif", "test_helper"):
        assert f"test_kinds.py::{name}" in report
    assert "2 failed, 1 passed, 1 skipped, 1 xfailed, 3 errors" in report  # the module-level skip: a collection error
    assert "SKIPPED [1] test_hub_roundtrip.py" in report  # the one skip CI allows
