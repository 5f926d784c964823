"""The optional ``deploy`` extra: onnx, onnxruntime, onnxscript."""
import importlib

__all__ = ['DEPLOY_PACKAGES', 'require']

# import name -> what to install
DEPLOY_PACKAGES = {
    'onnx': 'onnx',
    'onnxruntime': 'onnxruntime',
    'onnxscript': 'onnxscript'
}
INSTALL_HINT = ('pip install "projects_detr_plus[deploy]" (or, from a '
                'checkout, `pip install -e ".[deploy]"` / `make install`)')


def require(*names):
    """Import and return the deploy packages ``names`` (default: all).

    Raises:
        ImportError: naming every missing package and the ``deploy`` extra.
    """
    names = names or tuple(DEPLOY_PACKAGES)
    modules, missing = [], []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            missing.append(DEPLOY_PACKAGES.get(name, name))
    if missing:
        raise ImportError(
            f'ONNX deployment needs {", ".join(missing)}, which '
            f'{"is" if len(missing) == 1 else "are"} not installed: they '
            f'come with the optional "deploy" extra: {INSTALL_HINT}')
    return modules[0] if len(modules) == 1 else tuple(modules)
