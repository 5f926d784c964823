"""Shared pytest fixtures and markers for DETR+."""
import os
import os.path as osp
import subprocess
import sys

import pytest

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line(
        'markers', 'slow: long test, excluded from `make test` (run with '
        '`make test-all`)')


def run_tool(args, cwd, timeout=900, env=None):
    """Run ``python <args>`` from the repo; fail the test with its output."""
    full_env = dict(os.environ, PYTHONPATH=REPO_ROOT, **(env or {}))
    proc = subprocess.run([sys.executable, *args],
                          cwd=cwd,
                          env=full_env,
                          capture_output=True,
                          text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f'{args} exited {proc.returncode}\n--- stdout ---\n'
                    f'{proc.stdout[-4000:]}\n--- stderr ---\n'
                    f'{proc.stderr[-6000:]}')
    return proc


@pytest.fixture(scope='session')
def repo_root():
    return REPO_ROOT
