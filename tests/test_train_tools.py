"""tools/train.py and tools/test.py on the shapes config, end to end."""
import json
import os.path as osp

import pytest
import torch

from conftest import run_tool

CONFIG = 'configs/shapes/dino-tiny_shapes.py'
TINY_DATA = [
    'train_dataloader.batch_size=2',
    'train_dataloader.dataset.num_images=12',
    'val_dataloader.dataset.num_images=4',
    'test_dataloader.dataset.num_images=4',
    'default_hooks.logger.interval=1',
]


def _train(repo_root, cwd, work_dir, *extra, options=(), config=CONFIG):
    args = [
        osp.join(repo_root, 'tools/train.py'),
        osp.join(repo_root, config), '--work-dir',
        str(work_dir), *extra, '--cfg-options', *TINY_DATA, *options
    ]
    return run_tool(args, cwd=cwd)


def _train_losses(work_dir, key='loss'):
    """{iter: value of key} from every run's scalars.json under
    ``work_dir``."""
    losses = {}
    for path in sorted(work_dir.glob('*/vis_data/scalars.json')):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if key in record:
                losses[record['iter']] = record[key]
    return losses


@pytest.fixture(scope='module')
def resumed_run(repo_root, tmp_path_factory):
    """Train 2 iterations, then resume the same work dir to 4."""
    cwd = tmp_path_factory.mktemp('resume')
    work_dir = cwd / 'work'
    # validation right after each checkpoint: it must not shift the streams
    first = [
        'train_cfg.max_iters=2', 'default_hooks.checkpoint.interval=2',
        'train_cfg.val_interval=2'
    ]
    _train(repo_root, cwd, work_dir, options=first)
    second = [
        'train_cfg.max_iters=4', 'default_hooks.checkpoint.interval=2',
        'train_cfg.val_interval=2'
    ]
    proc = _train(repo_root, cwd, work_dir, '--resume', options=second)
    return work_dir, proc


def test_three_iterations_train_evaluate_and_repeat_bit_identically(
        repo_root, tmp_path):
    """Two deterministic runs: same losses to the bit, then evaluation."""
    options = ['train_cfg.max_iters=3', 'randomness.deterministic=True']
    runs = []
    for name in ('first', 'second'):
        work_dir = tmp_path / name
        runs.append((_train(repo_root, tmp_path, work_dir,
                            options=options), _train_losses(work_dir)))
    (proc, losses), (_, repeated) = runs
    assert sorted(losses) == [1, 2, 3]
    assert all(loss > 0 and loss == loss for loss in losses.values())
    assert losses == repeated
    assert 'coco/bbox_mAP' in proc.stdout + proc.stderr
    assert (tmp_path / 'data/shapes/annotations/instances_train.json').exists()


def test_deformable_detr_shapes_config_trains(repo_root, tmp_path):
    work_dir = tmp_path / 'work'
    _train(
        repo_root,
        tmp_path,
        work_dir,
        options=['train_cfg.max_iters=3'],
        config='configs/shapes/deformable-detr-tiny_shapes.py')
    losses = _train_losses(work_dir)
    assert sorted(losses) == [1, 2, 3]
    assert all(loss > 0 for loss in losses.values())


@pytest.mark.parametrize('config', [
    CONFIG, 'configs/shapes/deformable-detr-tiny_shapes.py',
    'configs/shapes/group-dino-tiny_shapes.py',
    'configs/shapes/h-dino-tiny_shapes.py',
    'configs/shapes/co-dino-tiny_shapes.py',
    'configs/shapes/ddq-detr-tiny_shapes.py',
    'configs/shapes/ddq-fcn-tiny_shapes.py',
    'configs/shapes/ddq-rcnn-tiny_shapes.py'
])
def test_amp_on_cpu_trains_with_bf16_autocast(repo_root, tmp_path, config):
    """Every method, 4 iterations of bf16 autocast: finite losses and
    gradient norms."""
    work_dir = tmp_path / 'work'
    _train(
        repo_root,
        tmp_path,
        work_dir,
        '--amp',
        options=['train_cfg.max_iters=4'],
        config=config)
    losses = _train_losses(work_dir, key='loss')
    grad_norms = _train_losses(work_dir, key='grad_norm')
    assert sorted(losses) == [1, 2, 3, 4]
    assert all(0 < loss < float('inf') for loss in losses.values())
    assert all(0 < norm < float('inf') for norm in grad_norms.values())
    (dumped, ) = work_dir.glob('*.py')
    assert "type='CPUBF16AutocastOptimWrapper'" in dumped.read_text()


def test_bf16_wrapper_autocasts_the_forward():
    from projects_detr_plus.utils import CPUBF16AutocastOptimWrapper
    model = torch.nn.Linear(4, 4)
    wrapper = CPUBF16AutocastOptimWrapper(
        torch.optim.SGD(model.parameters(), lr=0.1))
    with wrapper.optim_context(model):
        assert model(torch.randn(2, 4)).dtype == torch.bfloat16
    assert model(torch.randn(2, 4)).dtype == torch.float32


def test_resume_continues_from_checkpoint(resumed_run):
    work_dir, proc = resumed_run
    log = proc.stdout + proc.stderr
    assert 'resumed' in log.lower()
    losses = _train_losses(work_dir)
    assert sorted(losses) == [1, 2, 3, 4], 'iterations 3-4 after resuming'
    checkpoint = torch.load(work_dir / 'iter_4.pth', weights_only=False)
    assert checkpoint['meta']['iter'] == 4


def test_resume_is_exact(resumed_run, repo_root):
    """Iterations 3-4 after resuming (a new process, mid-epoch) have the
    losses of an uninterrupted 4-iteration run: data order, denoising
    noise and flips continue the same random streams."""
    work_dir, _ = resumed_run
    checkpoint = torch.load(work_dir / 'iter_2.pth', weights_only=False)
    assert set(checkpoint['rng_state']) >= {'python', 'numpy', 'torch'}
    straight = work_dir.parent / 'straight'
    _train(
        repo_root,
        work_dir.parent,
        straight,
        options=[
            'train_cfg.max_iters=4', 'default_hooks.checkpoint.interval=2',
            'train_cfg.val_interval=2'
        ])
    resumed, uninterrupted = _train_losses(work_dir), _train_losses(straight)
    assert resumed[1] == uninterrupted[1] and resumed[2] == uninterrupted[2]
    assert resumed[3] == uninterrupted[3]
    assert resumed[4] == uninterrupted[4]


def test_resume_without_the_hook_changes_the_trajectory(repo_root, tmp_path):
    """The control for the test above: without the generator states the
    denoising noise after resuming differs (so that test can fail)."""
    work_dir = tmp_path / 'work'
    no_hook = ['custom_hooks=[]', 'default_hooks.checkpoint.interval=2']
    _train(
        repo_root,
        tmp_path,
        work_dir,
        options=['train_cfg.max_iters=2', *no_hook])
    _train(
        repo_root,
        tmp_path,
        work_dir,
        '--resume',
        options=['train_cfg.max_iters=3', *no_hook])
    straight = tmp_path / 'straight'
    _train(
        repo_root,
        tmp_path,
        straight,
        options=['train_cfg.max_iters=3', *no_hook])
    assert _train_losses(work_dir)[3] != _train_losses(straight)[3]


def test_test_tool_evaluates_a_checkpoint(resumed_run, repo_root):
    work_dir, _ = resumed_run
    proc = run_tool([
        osp.join(repo_root, 'tools/test.py'),
        osp.join(repo_root, CONFIG),
        str(work_dir / 'iter_4.pth'), '--work-dir',
        str(work_dir / 'test'), '--out',
        str(work_dir / 'preds.pkl'), '--cfg-options', *TINY_DATA
    ],
                    cwd=work_dir.parent)
    assert 'coco/bbox_mAP' in proc.stdout + proc.stderr
    import pickle
    with open(work_dir / 'preds.pkl', 'rb') as f:
        predictions = pickle.load(f)
    assert len(predictions) == 4
    assert predictions[0]['pred_instances']['bboxes'].shape[-1] == 4


def test_demo_draws_ground_truth_beside_predictions(repo_root, tmp_path):
    """tools/demo.py (what `make demo` runs): trains, prints the mAP and
    draws each val image 4x enlarged, ground truth left of predictions."""
    import mmcv
    work_dir = tmp_path / 'demo'
    proc = run_tool([
        osp.join(repo_root, 'tools/demo.py'),
        osp.join(repo_root, CONFIG), '--work-dir',
        str(work_dir), '--num-vis', '2', '--cfg-options', *TINY_DATA,
        'train_cfg.max_iters=2', 'train_cfg.val_interval=2'
    ],
                    cwd=tmp_path)
    assert 'DEMO: shapes val COCO bbox mAP = ' in proc.stdout
    result = json.loads((work_dir / 'demo_result.json').read_text())
    assert 0.0 <= result['bbox_mAP'] <= 1.0
    png = mmcv.imread(str(work_dir / 'demo_predictions.png'))
    assert png.shape[:2] == (2 * 4 * 128, 2 * 4 * 128)


def load_demo(repo_root):
    """tools/demo.py as a module (tools/ is not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        'demo', osp.join(repo_root, 'tools/demo.py'))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


def test_demo_quotes_the_study_not_a_second_training(repo_root, tmp_path):
    """The demo's comparison with plain DINO comes from a committed study:
    the one with the most seeds (then equal wall clock), its mean and
    range."""
    demo = load_demo(repo_root)
    recipe = 'configs/shapes/group-dino-tiny_shapes.py'

    def study(name, seeds, finals, **extra):
        summary = {
            m: dict(final_per_seed={
                str(s): v
                for s, v in zip(seeds, values)
            })
            for m, values in finals.items()
        }
        (tmp_path / name).write_text(
            json.dumps(
                dict(
                    iters=2000,
                    seeds=seeds,
                    summary=summary,
                    methods=dict(dino=demo.DINO, recipe=recipe),
                    **extra)))

    assert demo.study_line(recipe, str(tmp_path)) is None
    study('convergence_a.json', [0], dict(dino=[0.1], recipe=[0.2]))
    study(
        'convergence_b.json', [0, 1, 2],
        dict(dino=[0.2, 0.3, 0.4], recipe=[0.5, 0.6, 0.4]),
        seconds=900)
    # as many seeds at equal iterations: the equal-wall-clock study wins
    study('convergence_c.json', [0, 1, 2],
          dict(dino=[0.9, 0.9, 0.9], recipe=[0.9, 0.9, 0.9]))
    line = demo.study_line(recipe, str(tmp_path))
    assert line == (
        'this config in the study: 0.500 (seeds 0.400-0.600, 3 seeds) '
        'after 900 s of training in convergence_b.json; plain DINO in the '
        'study: 0.300 (seeds 0.200-0.400, 3 seeds) after 900 s of training'
        ' in convergence_b.json')
    assert demo.study_line(
        demo.DINO, str(tmp_path)).startswith('plain DINO in the study: 0.300')


def test_demo_recipe_trains_for_its_time_budget(repo_root, tmp_path):
    """`make demo`'s config sets its length from its step time: a 4-second
    budget ends far below the config's upper bound of 100000 iterations,
    with the single evaluation at the end."""
    work_dir = tmp_path / 'demo'
    proc = run_tool([
        osp.join(repo_root, 'tools/demo.py'),
        osp.join(repo_root,
                 'configs/shapes/ddq-detr-12min_shapes.py'), '--work-dir',
        str(work_dir), '--num-vis', '1', '--cfg-options', *TINY_DATA,
        'custom_hooks.2.seconds=4', 'custom_hooks.2.calibrate=2'
    ],
                    cwd=tmp_path)
    assert 'time budget:' in proc.stdout + proc.stderr
    result = json.loads((work_dir / 'demo_result.json').read_text())
    assert 2 < result['max_iters'] < 1000
    assert 0.0 <= result['bbox_mAP'] <= 1.0
    assert f'after {result["max_iters"]} iterations' in proc.stdout


def test_demo_quotes_the_study_of_the_config_a_budget_builds_on(
        repo_root, tmp_path):
    """The demo's config is the lean DDQ-DETR plus a time budget: it quotes
    the study of that config; a variant of a config (options) is not that
    config, and a config without a budget does not borrow its base's
    numbers."""
    demo = load_demo(repo_root)
    lean = 'configs/shapes/ddq-detr-lean-tiny_shapes.py'
    ddq = 'configs/shapes/ddq-detr-tiny_shapes.py'
    assert demo.trained_configs('configs/shapes/ddq-detr-12min_shapes.py') \
        == ['configs/shapes/ddq-detr-12min_shapes.py', lean]
    assert demo.trained_configs(ddq) == [ddq]  # no budget: itself only
    summary = {
        'dino': dict(final_per_seed={'0': 0.3}),
        'ddq-detr-lean': dict(final_per_seed={
            '0': 0.52,
            '1': 0.5
        }),
        'ddq-detr+2dec': dict(final_per_seed={'0': 0.9})
    }
    (tmp_path / 'convergence_x.json').write_text(
        json.dumps(
            dict(
                iters=1,
                seconds=780,
                seeds=[0, 1],
                summary=summary,
                methods={
                    'dino': demo.DINO,
                    'ddq-detr-lean': lean,
                    'ddq-detr+2dec': ddq
                },
                options={'ddq-detr+2dec': {
                    'model.decoder.num_layers': 2
                }})))
    line = demo.study_line('configs/shapes/ddq-detr-12min_shapes.py',
                           str(tmp_path))
    assert line.startswith('this config (ddq-detr-lean-tiny_shapes.py) in '
                           'the study: 0.510 (seeds 0.500-0.520, 2 seeds)')
    assert demo.study_line(ddq, str(tmp_path)).startswith('plain DINO')
