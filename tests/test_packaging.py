"""A regular build ships configs and tools under .mim/ for `mim train`."""
import subprocess
import sys
import zipfile

import pytest


@pytest.fixture(scope='module')
def wheel(repo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp('wheel')
    env = dict(__import__('os').environ, DETR_PLUS_BUILD_EXT='0')
    proc = subprocess.run(
        [sys.executable, '-m', 'pip', 'wheel', '--no-deps',
         '--no-build-isolation', '-w', str(out), repo_root],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = out.glob('projects_detr_plus-*.whl')
    return path


def test_wheel_contains_mim_configs_and_tools(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ('projects_detr_plus/.mim/configs/shapes/'
                     'dino-tiny_shapes.py',
                     'projects_detr_plus/.mim/configs/shapes/'
                     'shapes_runtime.py',
                     'projects_detr_plus/.mim/tools/train.py',
                     'projects_detr_plus/.mim/tools/test.py',
                     'projects_detr_plus/__init__.py',
                     'projects_detr_plus/datasets/shapes_generator.py'):
        assert required in names, f'{required} missing from {wheel.name}'


def test_wheel_has_no_build_junk(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if '__pycache__' in n or n.endswith('.pyc')]
