"""A regular build ships configs, tools and the model index under .mim/ for
`mim train` and `mim search`."""
import subprocess
import sys
import zipfile

import pytest


@pytest.fixture(scope='module')
def wheel(repo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp('wheel')
    env = dict(__import__('os').environ, DETR_PLUS_BUILD_EXT='0')
    proc = subprocess.run([
        sys.executable, '-m', 'pip', 'wheel', '--no-deps',
        '--no-build-isolation', '-w',
        str(out), repo_root
    ],
                          capture_output=True,
                          text=True,
                          env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path, ) = out.glob('projects_detr_plus-*.whl')
    return path


def test_wheel_contains_mim_configs_and_tools(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ('projects_detr_plus/.mim/configs/shapes/'
                     'dino-tiny_shapes.py',
                     'projects_detr_plus/.mim/configs/shapes/'
                     'shapes_runtime.py',
                     'projects_detr_plus/.mim/tools/train.py',
                     'projects_detr_plus/.mim/tools/test.py',
                     'projects_detr_plus/.mim/model-index.yml',
                     'projects_detr_plus/.mim/configs/h_detr/metafile.yml',
                     'projects_detr_plus/__init__.py',
                     'projects_detr_plus/datasets/shapes_generator.py'):
        assert required in names, f'{required} missing from {wheel.name}'


def test_wheel_has_no_build_junk(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if '__pycache__' in n or n.endswith('.pyc')]


def test_mim_search_lists_every_config_of_the_installed_wheel(wheel, tmp_path):
    """`mim search projects_detr_plus` against a regular install of the
    wheel (an editable install has no .mim/ where mim looks)."""
    import os
    import os.path as osp

    import yaml

    from conftest import REPO_ROOT
    target = tmp_path / 'site'
    subprocess.run([
        sys.executable, '-m', 'pip', 'install', '--no-deps', '--target',
        str(target),
        str(wheel)
    ],
                   check=True,
                   capture_output=True,
                   timeout=300)
    env = dict(os.environ, PYTHONPATH=str(target))
    where = subprocess.run([
        sys.executable, '-c', 'from mim.utils import get_installed_path; '
        "print(get_installed_path('projects_detr_plus'))"
    ],
                           env=env,
                           cwd=tmp_path,
                           capture_output=True,
                           text=True,
                           timeout=300)
    assert where.stdout.strip().startswith(str(target)), where.stdout
    proc = subprocess.run(
        [sys.executable, '-m', 'mim', 'search', 'projects_detr_plus'],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(osp.join(REPO_ROOT, 'model-index.yml')) as f:
        metafiles = yaml.safe_load(f)['Import']
    names = [
        m['Name'] for path in metafiles
        for m in yaml.safe_load(open(osp.join(REPO_ROOT, path)))['Models']
    ]
    assert len(names) > 20
    for name in names:
        assert f'config id: {name}\n' in proc.stdout, name
