"""The documentation builds strictly, and README's links land.

``mkdocs build --strict`` (what ``make docs`` runs) into a temporary folder:
``mkdocs.yml`` turns every warning into an error (broken links and anchors,
pages missing from the nav, docstrings mkdocstrings cannot parse), and the
output must not hold a single ``WARNING`` line either.  Skipped only when
mkdocs itself is not importable (``make install`` installs it from
``requirements-docs.txt``); a missing mkdocstrings fails the build.
"""
import importlib.util
import os.path as osp
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec('mkdocs') is None,
    reason='mkdocs is not installed (pip install -r requirements-docs.txt, '
    'or make install)')

METHODS = ('deformable_detr', 'dino', 'group_detr', 'h_detr', 'co_detr', 'ddq',
           'align_detr', 'stable_dino', 'ms_detr')
PAGES = ('index', 'installation', 'training', 'finetuning', 'deployment', 'op',
         'op_kernels', 'benchmarks', 'reliability', 'faq', 'architecture',
         'adding_a_method', 'api') + tuple(f'methods/{m}' for m in METHODS)


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp('site')
    proc = subprocess.run([
        sys.executable, '-m', 'mkdocs', 'build', '--strict', '-f',
        osp.join(REPO_ROOT, 'mkdocs.yml'), '-d',
        str(out)
    ],
                          cwd=REPO_ROOT,
                          capture_output=True,
                          text=True,
                          timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f'mkdocs build --strict failed:\n{log}'
    warnings = [line for line in log.splitlines() if 'WARNING' in line]
    assert not warnings, '\n'.join(warnings)
    return out


def _html(site, page):
    path = site / page / 'index.html' if page != 'index' else site / \
        'index.html'
    assert path.is_file(), f'{page} is not in the built site'
    return path.read_text()


def test_every_page_is_built(site):
    for page in PAGES:
        _html(site, page)


def test_plots_are_in_the_site(site):
    html = _html(site, 'benchmarks')
    plots = re.findall(r'<img [^>]*src="\.\./(results/[^"]+\.png)"', html)
    assert len(plots) >= 5
    for plot in plots:
        assert (site / plot).is_file(), plot


def test_api_reference_documents_the_public_modules(site):
    html = _html(site, 'api')
    for name in ('models.branches.GroupQueryBranch',
                 'models.losses.matched_set_loss', 'models.detectors.DINOPlus',
                 'utils.NonFiniteGuardHook', 'ops.multi_scale_deformable_attn',
                 'deployment.export_onnx'):
        assert f'id="projects_detr_plus.{name}"' in html, name


def test_readme_links_land(site):
    """Every relative link of README.md names a file of the repository, and
    every ``docs/PAGE.md#anchor`` an anchor of the built page."""
    text = open(osp.join(REPO_ROOT, 'README.md')).read()
    links = re.findall(r'\]\(([^)\s]+)\)', text)
    assert links
    for link in links:
        if re.match(r'[a-z]+://', link):
            continue
        path, _, anchor = link.partition('#')
        assert osp.exists(osp.join(REPO_ROOT, path)), link
        if anchor:
            assert path.startswith('docs/') and path.endswith('.md'), link
            page = path[len('docs/'):-len('.md')]
            assert f'id="{anchor}"' in _html(site, page), link
