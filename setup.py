"""Build and install DETR+.

The compiled MSDeformAttn extension (``projects_detr_plus.ops._C``) is built
from the top-level ``ops/`` folder:

* the CPU kernel whenever torch and a C++ compiler are available;
* the CUDA kernel as well when torch has CUDA and a CUDA toolkit is found, or
  when ``FORCE_CUDA=1``; ``TORCH_CUDA_ARCH_LIST`` and ``MAX_JOBS`` are honoured
  by torch's build helpers.

A failed extension build never fails the install: the package falls back to the
pure-PyTorch path and says so, here and once at run time.

Build without isolation (``pip install --no-build-isolation .``) so the build
sees the torch you already have instead of downloading another one.
"""
import glob
import os
import os.path as osp
import shutil
import sys
import warnings
from setuptools import find_packages, setup

ROOT = osp.dirname(osp.abspath(__file__))
EXT_NAME = 'projects_detr_plus.ops._C'


def read_version():
    namespace = {}
    with open(osp.join(ROOT, 'projects_detr_plus', 'version.py')) as f:
        exec(f.read(), namespace)
    return namespace['__version__']


def read_requirements(name='requirements.txt'):
    with open(osp.join(ROOT, name)) as f:
        lines = [line.split('#')[0].strip() for line in f]
    return [line for line in lines if line]


def _warn(message):
    banner = '=' * 78
    sys.stderr.write(f'\n{banner}\nDETR+ WARNING: {message}\n{banner}\n')


def _want_cuda(torch, cuda_home):
    if os.getenv('FORCE_CUDA', '0') == '1':
        return True
    return torch.version.cuda is not None and cuda_home is not None


def make_extensions():
    """Return (ext_modules, cmdclass); empty when torch is not importable."""
    try:
        import torch
        from torch.utils.cpp_extension import (CUDA_HOME, BuildExtension,
                                               CppExtension, CUDAExtension)
    except ImportError:
        _warn('torch is not importable at build time, so the compiled '
              'MSDeformAttn extension is skipped and the pure-PyTorch path '
              'will be used. Install torch first and build with '
              '`pip install --no-build-isolation .`.')
        return [], {}

    if os.getenv('DETR_PLUS_BUILD_EXT', '1') == '0':
        _warn('DETR_PLUS_BUILD_EXT=0: skipping the compiled MSDeformAttn '
              'extension; the pure-PyTorch path will be used.')
        return [], {}
    cpp_sources = sorted(glob.glob('ops/csrc/**/*.cpp', recursive=True))
    cuda_sources = sorted(glob.glob('ops/csrc/**/*.cu', recursive=True))
    if not cpp_sources:
        return [], {}
    cxx_flags = ['-O3', '-std=c++17']
    if sys.platform != 'darwin':
        cxx_flags.append('-fopenmp')
    extra_link_args = ['-fopenmp'] if sys.platform != 'darwin' else []
    define_macros = []
    kwargs = dict(include_dirs=[osp.join(ROOT, 'ops', 'csrc')])
    if cuda_sources and _want_cuda(torch, CUDA_HOME):
        define_macros.append(('WITH_CUDA', None))
        ext = CUDAExtension(
            EXT_NAME,
            cpp_sources + cuda_sources,
            define_macros=define_macros,
            extra_compile_args={
                'cxx': cxx_flags,
                'nvcc': ['-O3', '--use_fast_math', '-std=c++17']
            },
            extra_link_args=extra_link_args,
            **kwargs)
    else:
        ext = CppExtension(
            EXT_NAME,
            cpp_sources,
            define_macros=define_macros,
            extra_compile_args={'cxx': cxx_flags},
            extra_link_args=extra_link_args,
            **kwargs)

    class TolerantBuildExtension(BuildExtension):
        """Builds the extension, but degrades to the PyTorch path on error."""

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as error:  # noqa: BLE001 - any compiler failure
                _warn(f'building {extension.name} failed ({error!r}). DETR+ '
                      'installs without it and runs MSDeformAttn on the '
                      'pure-PyTorch path (slower; results are the same).')

    return [ext], {
        'build_ext':
        TolerantBuildExtension.with_options(
            use_ninja=shutil.which('ninja') is not None)
    }


def mim_files():
    """Ship configs/, tools/ and model-index.yml inside the package for
    `mim train` and `mim search`."""
    mim_dir = osp.join(ROOT, 'projects_detr_plus', '.mim')
    if 'develop' in sys.argv or '--editable' in sys.argv:
        return []
    for name in ('configs', 'tools'):
        dst = osp.join(mim_dir, name)
        if osp.islink(dst) or osp.isfile(dst):
            os.remove(dst)
        elif osp.isdir(dst):
            shutil.rmtree(dst)
        shutil.copytree(
            osp.join(ROOT, name),
            dst,
            ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
    shutil.copy(osp.join(ROOT, 'model-index.yml'), mim_dir)
    files = []
    for path in glob.glob(osp.join(mim_dir, '**', '*'), recursive=True):
        if osp.isfile(path):
            files.append(
                osp.relpath(path, osp.join(ROOT, 'projects_detr_plus')))
    return files


if __name__ == '__main__':
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ext_modules, cmdclass = make_extensions()
    setup(
        name='projects_detr_plus',
        version=read_version(),
        description='DETR-family detectors for MMDetection 3.x on a fast '
        'multi-scale deformable attention op',
        long_description=open(osp.join(ROOT, 'README.md')).read(),
        long_description_content_type='text/markdown',
        python_requires='>=3.8',
        packages=find_packages(
            include=['projects_detr_plus', 'projects_detr_plus.*']),
        package_data={'projects_detr_plus': mim_files()},
        include_package_data=False,
        install_requires=read_requirements(),
        # ONNX export / ONNX Runtime: pip install "projects_detr_plus[deploy]"
        extras_require={
            'deploy': read_requirements('requirements-deploy.txt')
        },
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        zip_safe=False,
    )
