#!/usr/bin/env bash
# Install DETR+ and its dependencies into the current Python environment.
# Idempotent: every step is skipped when what it installs is already there.
#   - torch==2.13.0 only if no torch is importable (an existing torch is kept);
#   - setuptools<82 (mim, mmengine's `mmdet::` configs and mmcv's build need
#     pkg_resources), then full mmcv>=2.0.0rc4,<2.2.0 built without isolation,
#     from ../shared/wheelhouse when that folder exists (else from source,
#     ~20 minutes on 2 cores);
#   - mmdet==3.3.0, mmengine 0.10.x, pycocotools, scipy, openmim;
#   - the optional deploy extra (onnx, onnxruntime, onnxscript);
#   - the docs requirements (mkdocs, mkdocstrings-python);
#   - the style tools (flake8, isort, yapf, codespell; pinned);
#   - this package (editable, with its compiled MSDeformAttn extension).
set -euo pipefail
PYTHON=${PYTHON:-python}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PIP="$PYTHON -m pip --disable-pip-version-check"

have() { $PYTHON -c "$1" >/dev/null 2>&1; }
say() { echo "[install] $*"; }

if have "import torch"; then
    say "torch $($PYTHON -c 'import torch; print(torch.__version__)') found, keeping it"
else
    say "no torch found: installing torch==2.13.0"
    $PIP install "torch==2.13.0"
fi

# torch 2.13 needs setuptools >= 77.0.3; mim, mmengine's `mmdet::` configs
# and mmcv's build need pkg_resources, which setuptools 82 removed.
SETUPTOOLS='setuptools>=77.0.3,<82'
if ! have "import setuptools, wheel, pkg_resources, sys; \
from pip._vendor.packaging.version import Version as V; \
sys.exit(not V('77.0.3') <= V(setuptools.__version__) < V('82'))"; then
    $PIP install "$SETUPTOOLS" wheel
fi

MMCV_OK="import mmcv, mmcv.ops, sys; from mmengine.utils import digit_version as v; \
sys.exit(not (v('2.0.0rc4') <= v(mmcv.__version__) < v('2.2.0')))"
if ! have "$MMCV_OK"; then
    WHEELHOUSE="$ROOT/../shared/wheelhouse"
    if [ -d "$WHEELHOUSE" ]; then
        say "mmcv from $WHEELHOUSE (falls back to a source build)"
        export PIP_FIND_LINKS="$WHEELHOUSE${PIP_FIND_LINKS:+ $PIP_FIND_LINKS}"
    else
        say "building mmcv from source (about 20 minutes on 2 cores)"
    fi
    $PIP install "mmengine>=0.10.0,<0.11"
    $PIP install --no-build-isolation "mmcv>=2.0.0rc4,<2.2.0"
fi

# openmim 0.3.7: the last release before mim pulled opendatalab -> openxlab,
# which pins setuptools ~=60.2 (torch needs >= 77.0.3) and downgrades
# requests, urllib3 and rich, so `pip check` fails.  0.3.7's train, test,
# run and search work with mmdet 3.3 (tested); only `mim download --dataset`
# (OpenDataLab) is missing.
MIM='openmim==0.3.7'
if ! have "import mmdet, mmengine, pycocotools, scipy, mim, matplotlib, psutil; \
import sys, importlib.metadata as m; \
sys.exit(mmdet.__version__ != '3.3.0' or m.version('openmim') != '0.3.7')"; then
    $PIP install "mmdet==3.3.0" "mmengine>=0.10.0,<0.11" pycocotools scipy \
        "$MIM" matplotlib psutil "$SETUPTOOLS"
fi
if have "import openxlab"; then
    say "openxlab (pulled by a newer openmim) pins old setuptools/requests:"
    say "  'pip uninstall opendatalab openxlab' makes 'pip check' clean again"
fi

# the optional deploy extra (ONNX export, ONNX Runtime): installed here so
# that `make test` runs tests/test_onnx_export.py
if ! have "import onnx, onnxruntime, onnxscript"; then
    say "installing the deploy extra (onnx, onnxruntime, onnxscript)"
    $PIP install -r "$ROOT/requirements-deploy.txt"
fi

# the documentation tools (requirements-docs.txt): installed here so that
# `make docs` works and `make test` runs tests/test_docs.py
if ! have "import mkdocs, mkdocstrings_handlers.python"; then
    say "installing the docs requirements (mkdocs, mkdocstrings-python)"
    $PIP install -r "$ROOT/requirements-docs.txt"
fi

# the style tools (requirements-lint.txt, pinned): `make lint` and
# tests/test_lint.py
if ! have "import importlib.metadata as m; assert [m.version(p) for p in
        ('flake8', 'isort', 'yapf', 'codespell')] == ['7.5.0', '9.0.2',
        '0.43.0', '2.4.3']"; then
    say "installing the style tools (flake8, isort, yapf, codespell)"
    $PIP install -r "$ROOT/requirements-lint.txt"
fi

if ! have "import pytest, hypothesis"; then
    $PIP install pytest hypothesis
fi

# The package: rebuild only when its sources changed since the last install.
STAMP="$ROOT/.install-stamp"
# (configs/, tools/ and model-index.yml: copied into the package's .mim/)
HASH=$(cd "$ROOT" && cat setup.py requirements.txt requirements-deploy.txt \
    projects_detr_plus/version.py \
    model-index.yml $(find ops configs tools -type f -not -path '*/__pycache__/*' \
    | sort) | sha256sum | cut -d' ' -f1)
# checked from outside the repo (there the current folder would import it)
# and against this checkout (an earlier editable install may point elsewhere)
installed_here() {
    (cd / && $PYTHON -c "import os, projects_detr_plus as p
assert os.path.realpath(os.path.dirname(p.__file__)) == \
    os.path.realpath('$ROOT/projects_detr_plus')") >/dev/null 2>&1
}
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ] && installed_here; then
    say "projects_detr_plus is up to date"
else
    say "installing projects_detr_plus (editable, builds the op extension)"
    (cd "$ROOT" && $PIP install --no-build-isolation --no-deps -e .)
    # setuptools >= 80 runs `setup.py develop` as a PEP 660 editable install,
    # which leaves the compiled op under build/: put it beside the sources
    (cd "$ROOT" && $PYTHON setup.py -q build_ext --inplace)
    echo "$HASH" > "$STAMP"
fi
$PYTHON - <<'PY'
import importlib.util
if importlib.util.find_spec('projects_detr_plus.ops') is not None:
    try:
        from projects_detr_plus import ops
        impl = getattr(ops, 'active_implementation', lambda *a: '?')
        print(f'[install] MSDeformAttn implementation on CPU: {impl("cpu")}')
    except Exception as error:  # report, never fail the install here
        print(f'[install] could not query the MSDeformAttn op: {error!r}')
PY
say "done"
