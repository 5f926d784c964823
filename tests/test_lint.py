"""The style check CI runs (tools/lint.sh: flake8, isort, yapf, codespell
with the settings of setup.cfg), and that it sees a violation."""
import os.path as osp
import shutil
import subprocess

import pytest

from conftest import REPO_ROOT

LINT = osp.join(REPO_ROOT, 'tools/lint.sh')


def _tools_missing():
    try:
        import codespell_lib  # noqa: F401
        import flake8  # noqa: F401
        import isort  # noqa: F401
        import yapf  # noqa: F401
    except ImportError as error:
        return str(error)
    return None


pytestmark = pytest.mark.skipif(
    _tools_missing() is not None or shutil.which('git') is None,
    reason=f'lint tools (requirements-lint.txt) or git missing: '
    f'{_tools_missing()}')


def _lint(root):
    return subprocess.run(['bash', osp.join(root, 'tools/lint.sh')],
                          cwd=root,
                          capture_output=True,
                          text=True,
                          timeout=600)


def test_the_repository_passes_the_style_check():
    proc = _lint(REPO_ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


def test_the_check_fails_on_a_violation(tmp_path):
    """A copy of the check's inputs with one unsorted, misformatted,
    misspelt file fails every tool."""
    root = tmp_path / 'repo'
    (root / 'tools').mkdir(parents=True)
    shutil.copy(LINT, root / 'tools/lint.sh')
    shutil.copy(osp.join(REPO_ROOT, 'setup.cfg'), root / 'setup.cfg')
    typo = 'rec' + 'ieve'  # spelt out, codespell would flag this file
    (root / 'bad.py'
     ).write_text(f'import sys\nimport os\n\nx = dict( a = 1 )  # {typo}\n')
    subprocess.run(['git', 'init', '-q'], cwd=root, check=True)
    subprocess.run(['git', 'add', '.'], cwd=root, check=True)
    proc = _lint(str(root))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert "F401 'sys' imported but unused" in output  # flake8
    assert 'bad.py Imports are incorrectly sorted' in output  # isort
    assert '-x = dict( a = 1 )' in output  # yapf
    assert f'{typo} ==> receive' in output  # codespell
