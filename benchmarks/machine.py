"""The machine a benchmark ran on, for its JSON."""
import importlib.metadata as metadata
import os
import platform


def cpu_model():
    """The CPU's model name (Linux), else what ``platform`` says."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(packages=('torch', 'mmdet', 'mmcv', 'mmengine', 'numpy')):
    """CPU model, cores, torch threads, platform and package versions."""
    import torch
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return dict(
        cpu=cpu_model(),
        cores=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        platform=platform.platform(),
        python=platform.python_version(),
        versions=versions)
