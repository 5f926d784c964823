"""Runner checkpoints load under torch >= 2.6 once the plugin is imported."""
import pickle

import pytest
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader, _load_checkpoint

import projects_detr_plus  # noqa: F401
from projects_detr_plus.utils import load_from_local_trusted


@pytest.fixture
def runner_like_checkpoint(tmp_path):
    """A checkpoint holding non-tensor objects, like mmengine's runner's."""
    buffer = HistoryBuffer()
    buffer.update(1.5)
    path = tmp_path / 'iter_2.pth'
    torch.save(
        dict(
            meta=dict(iter=2, seed=0),
            state_dict={'w': torch.arange(3.)},
            message_hub=dict(log_scalars={'loss': buffer})), path)
    return str(path)


def test_torch_default_rejects_it(runner_like_checkpoint):
    """The failure this fix exists for (torch >= 2.6 defaults)."""
    with pytest.raises(pickle.UnpicklingError):
        torch.load(runner_like_checkpoint)


def test_mmengine_local_loader_is_ours():
    assert CheckpointLoader._get_checkpoint_loader('/a/b.pth') is \
        load_from_local_trusted


def test_mmengine_loads_runner_checkpoint(runner_like_checkpoint):
    checkpoint = _load_checkpoint(runner_like_checkpoint, map_location='cpu')
    assert checkpoint['meta']['iter'] == 2
    assert torch.equal(checkpoint['state_dict']['w'], torch.arange(3.))
    assert checkpoint['message_hub']['log_scalars']['loss'].current() == 1.5


def test_weights_only_opt_in(runner_like_checkpoint, monkeypatch):
    monkeypatch.setenv('DETR_PLUS_WEIGHTS_ONLY', '1')
    with pytest.raises(pickle.UnpicklingError):
        _load_checkpoint(runner_like_checkpoint, map_location='cpu')


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match='nothing.pth'):
        _load_checkpoint(str(tmp_path / 'nothing.pth'))


def test_other_schemes_untouched():
    loader = CheckpointLoader._get_checkpoint_loader('https://x/y.pth')
    assert loader is not load_from_local_trusted
