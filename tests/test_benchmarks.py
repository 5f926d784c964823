"""Each benchmark script runs in its quickest mode, so they cannot rot."""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest

from conftest import run_tool


def test_msda_op_benchmark_quick(repo_root, tmp_path):
    out = tmp_path / 'msda.json'
    run_tool([
        osp.join(repo_root, 'benchmarks/msda_op.py'), '--device', 'cpu',
        '--quick', '--json',
        str(out)
    ],
             cwd=tmp_path)
    result = json.loads(out.read_text())
    assert result['device'] == 'cpu' and result['cases']
    for case in result['cases']:
        assert case['results']['ours']['fwd_bwd_ms'] > 0


def test_train_step_benchmark_quick(repo_root, tmp_path):
    out = tmp_path / 'step.json'
    proc = run_tool([
        osp.join(repo_root, 'benchmarks/train_step.py'), '--quick', '--json',
        str(out)
    ],
                    cwd=tmp_path)
    result = json.loads(out.read_text())
    seconds = result['seconds_per_step']
    assert seconds['ours'] > 0 and seconds['mmdet'] > 0
    assert result['speedup_vs_mmdet'] == seconds['mmdet'] / seconds['ours']
    assert 'speed-up' in proc.stdout


def test_query_branches_benchmark_quick(repo_root, tmp_path):
    out = tmp_path / 'branches.json'
    run_tool([
        osp.join(repo_root, 'benchmarks/query_branches.py'), '--quick',
        '--variants', 'dino', 'group-k3', '--json',
        str(out)
    ],
             cwd=tmp_path)
    result = json.loads(out.read_text())
    seconds = result['seconds_per_step']
    assert set(seconds) == {'dino', 'group-k3'}
    assert result['time_ratio_vs_dino']['dino'] == 1.0
    assert result['time_ratio_vs_dino']['group-k3'] == \
        seconds['group-k3'] / seconds['dino']


def test_convergence_benchmark_quick(repo_root, tmp_path):
    out = tmp_path / 'conv'
    proc = run_tool([
        osp.join(repo_root, 'benchmarks/convergence.py'), '--quick',
        '--methods', 'dino', 'group-dino', '--out',
        str(out)
    ],
                    cwd=tmp_path)
    result = json.loads((tmp_path / 'conv.json').read_text())
    assert (tmp_path / 'conv.png').stat().st_size > 0
    for method in ('dino', 'group-dino'):
        summary = result['summary'][method]
        assert summary['iterations'] == [1, 2]
        assert 0.0 <= summary['mean'][-1] <= 1.0
        assert f'| {method} |' in proc.stdout
    group = result['summary']['group-dino']
    assert group['base'] == 'dino'
    assert group['vs_base'] == pytest.approx(
        group['mean'][-1] - result['summary']['dino']['mean'][-1])
    merged = tmp_path / 'merged'
    run_tool([
        osp.join(repo_root, 'benchmarks/convergence.py'), '--combine',
        str(tmp_path / 'conv.json'), '--out',
        str(merged)
    ],
             cwd=tmp_path)
    combined = json.loads((tmp_path / 'merged.json').read_text())
    assert combined['summary'] == result['summary']
    # another seed's file: the runs of both seeds are kept, per method
    other = json.loads((tmp_path / 'conv.json').read_text())
    other['seeds'] = [1]
    for runs in other['runs'].values():
        runs[0]['seed'] = 1
    (tmp_path / 'seed1.json').write_text(json.dumps(other))
    run_tool([
        osp.join(repo_root, 'benchmarks/convergence.py'), '--combine',
        str(tmp_path / 'conv.json'),
        str(tmp_path / 'seed1.json'), '--out',
        str(merged)
    ],
             cwd=tmp_path)
    combined = json.loads((tmp_path / 'merged.json').read_text())
    assert combined['seeds'] == [0, 1]
    for method in ('dino', 'group-dino'):
        assert [r['seed'] for r in combined['runs'][method]] == [0, 1]
        assert set(combined['summary'][method]['final_per_seed']) == {'0', '1'}


def test_convergence_equal_wall_clock_and_resume(repo_root, tmp_path):
    """--seconds: the run sets its length from its step time (4
    evaluations, the last at its end, the LR drop at 90 %); a stored unit is
    reused by the same command and refused by one of another length."""
    runs, out = tmp_path / 'runs', tmp_path / 'conv'
    args = [
        osp.join(repo_root, 'benchmarks/convergence.py'), '--quick',
        '--methods', 'dino', '--seconds', '8', '--calibrate', '2', '--workdir',
        str(runs), '--out',
        str(out)
    ]
    run_tool(args, cwd=tmp_path)
    unit = json.loads((runs / 'dino_8s_seed0.json').read_text())
    its = [p['iteration'] for p in unit['curve']]
    assert len(its) == 4 and its[-1] == unit['iters'] == 4 * its[0]
    assert unit['budget_seconds'] == 8
    assert 'time budget' in (runs / 'dino_8s_seed0.log').read_text()
    seconds = [p['seconds'] for p in unit['curve']]
    assert seconds == sorted(seconds) and seconds[-1] > 0
    (runs / 'dino_8s_seed0.log').unlink()  # not needed to resume
    again = run_tool(args, cwd=tmp_path)
    assert not (runs / 'dino_8s_seed0.log').exists(), again.stdout
    assert unit['recheck'] is None  # set once unless --recheck
    rechecked = subprocess.run(
        [sys.executable] + args + ['--recheck', '5'],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=repo_root))
    assert rechecked.returncode != 0
    assert 'use another --workdir' in rechecked.stderr
    (runs / 'dino_8s_seed0.json').rename(runs / 'dino_9s_seed0.json')
    proc = subprocess.run(
        [sys.executable] + args[:5] + ['9'] + args[6:],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=repo_root))
    assert proc.returncode != 0 and 'use another --workdir' in proc.stderr


def test_crowded_memory_benchmark_quick(repo_root, tmp_path):
    out = tmp_path / 'crowded.json'
    run_tool([
        osp.join(repo_root, 'benchmarks/crowded_memory.py'), '--num-gts', '1',
        '3', '--batch-size', '1', '--json',
        str(out)
    ],
             cwd=tmp_path)
    result = json.loads(out.read_text())
    memory = result['peak_memory_mb']
    assert set(memory) == {'1', '3'}
    for which in ('ours', 'mmdet'):
        assert memory['1'][which] > 0
        assert result['growth'][which] == memory['3'][which] / \
            memory['1'][which]


def test_inference_benchmark_quick(repo_root, tmp_path):
    out = tmp_path / 'inference.json'
    proc = run_tool([
        osp.join(repo_root, 'benchmarks/inference.py'), '--quick', '--json',
        str(out)
    ],
                    cwd=tmp_path)
    result = json.loads(out.read_text())
    (row, ) = result['results']
    assert row['batch_size'] == 1
    latency = row['latency_s']
    assert row['speedup_vs_mmdet'] == latency['mmdet'] / latency['ours']
    assert row['images_per_s']['ours'] == 1 / latency['ours']
    assert 'speed-up' in proc.stdout


def _two_image_gt():
    """COCO annotations: two objects (classes 1, 2) in image 1, one in 2."""
    objects = [(1, 1, [10, 10, 30, 30]), (1, 2, [50, 50, 20, 40]),
               (2, 1, [5, 60, 25, 25])]
    annotations = [
        dict(
            id=i,
            image_id=img,
            category_id=cat,
            bbox=box,
            area=box[2] * box[3],
            iscrowd=0) for i, (img, cat, box) in enumerate(objects, 1)
    ]
    images = [
        dict(id=i, width=100, height=100, file_name=f'{i}.png') for i in (1, 2)
    ]
    categories = [dict(id=1, name='a'), dict(id=2, name='b')]
    return dict(images=images, annotations=annotations, categories=categories)


def test_error_analysis_scores_confusion_and_duplicates():
    from benchmarks.error_analysis import breakdown
    gt = _two_image_gt()
    truth = [
        dict(
            image_id=a['image_id'],
            category_id=a['category_id'],
            bbox=list(a['bbox']),
            score=0.4) for a in gt['annotations']
    ]
    perfect = breakdown(gt, truth, [1, 2], nms_iou=0.6)
    assert all(s['mAP'] == 1.0 for s in perfect.values())

    swapped = [dict(d, category_id=3 - d['category_id']) for d in truth]
    confused = breakdown(gt, swapped, [1, 2], nms_iou=0.6)
    assert confused['classwise']['mAP'] == 0.0
    assert confused['agnostic']['mAP'] == 1.0

    # image 1's objects, each found twice (the copy 2 px off, IoU ~0.8 with
    # the original), outscore image 2's object: a false positive ranks
    # above a true one until NMS removes the copies
    copies = [
        dict(d, bbox=[d['bbox'][0] + 2] + d['bbox'][1:], score=0.9)
        for d in truth if d['image_id'] == 1
    ]
    truth_high = [
        dict(d, score=0.95) if d['image_id'] == 1 else d for d in truth
    ]
    duplicated = breakdown(gt, truth_high + copies, [1, 2], nms_iou=0.6)
    assert duplicated['agnostic']['mAP'] < 1.0
    assert duplicated['agnostic_nms']['mAP'] == 1.0
    assert duplicated['classwise_nms']['mAP'] == 1.0


def test_error_analysis_quick(repo_root, tmp_path):
    out = tmp_path / 'errors.json'
    proc = run_tool([
        osp.join(repo_root, 'benchmarks/error_analysis.py'),
        osp.join(repo_root, 'configs/shapes/dino-tiny_shapes.py'), '--quick',
        '--json',
        str(out)
    ],
                    cwd=tmp_path)
    result = json.loads(out.read_text())
    assert result['images'] == 8
    assert set(result['scores']) == {
        'classwise', 'agnostic', 'classwise_nms', 'agnostic_nms'
    }
    for score in result['scores'].values():
        assert all(0.0 <= v <= 1.0 for v in score.values())
    assert 'agnostic_nms' in proc.stdout


def test_activation_checkpointing_benchmark_quick(repo_root, tmp_path):
    out = tmp_path / 'cp.json'
    proc = run_tool([
        osp.join(repo_root, 'benchmarks/activation_checkpointing.py'),
        '--quick', '--json',
        str(out)
    ],
                    cwd=tmp_path)
    result = json.loads(out.read_text())
    settings = result['settings']
    assert settings['none']['memory_ratio'] == 1.0
    for r in settings.values():
        assert r['peak_mb'] > 0 and r['seconds'] > 0
    assert '| encoder-4 (official) |' in proc.stdout


def test_train_step_benchmark_against_a_baseline_method(repo_root, tmp_path):
    """DDQ FCN against mmdet's ATSS: different models, no shared weights."""
    out = tmp_path / 'step.json'
    proc = run_tool([
        osp.join(repo_root, 'benchmarks/train_step.py'), '--pair',
        'ddq-fcn-tiny', '--quick', '--skip-memory', '--json',
        str(out)
    ],
                    cwd=tmp_path)
    result = json.loads(out.read_text())
    assert result['mmdet_is_baseline_method'] is True
    assert result['configs'][1] == 'configs/shapes/atss-tiny_shapes.py'
    assert min(result['seconds_per_step'].values()) > 0
    assert 'mmdet baseline' in proc.stdout


def test_convergence_variant_applies_its_options(repo_root, tmp_path):
    """An ablation variant trains its base config with its options."""
    out = tmp_path / 'conv'
    run_tool([
        osp.join(repo_root, 'benchmarks/convergence.py'), '--quick',
        '--methods', 'ddq-fcn+near-centre', '--workdir',
        str(tmp_path / 'runs'), '--out',
        str(out)
    ],
             cwd=tmp_path)
    result = json.loads((tmp_path / 'conv.json').read_text())
    assert result['methods']['ddq-fcn+near-centre'] == \
        'configs/shapes/ddq-fcn-tiny_shapes.py'
    assert result['options'] == {
        'ddq-fcn+near-centre': {
            'model.bbox_head.positives_near_centre': 9
        }
    }
    log = (tmp_path / 'runs' / 'ddq-fcn+near-centre_seed0.log').read_text()
    assert 'positives_near_centre=9' in log


def test_step_variants_benchmark_quick(repo_root, tmp_path):
    out = tmp_path / 'variants.json'
    data = dict(num_images=4, data_root=str(tmp_path / 'shapes') + '/')
    common = {f'train_dataloader.dataset.{k}': v for k, v in data.items()}
    proc = run_tool([
        osp.join(repo_root, 'benchmarks/step_variants.py'),
        osp.join(repo_root, 'configs/shapes/dino-tiny_shapes.py'), '--common',
        json.dumps(common), '--iters', '1', '--warmup', '0', '--variant',
        'batch 2', '{"train_dataloader.batch_size": 2}', '--json',
        str(out)
    ],
                    cwd=tmp_path)
    result = json.loads(out.read_text())
    rows = result['variants']
    assert set(rows) == {'as is', 'batch 2'}
    assert rows['as is']['step_time_vs_as_is'] == 1.0
    for name, batch in (('as is', 4), ('batch 2', 2)):
        row = rows[name]
        assert row['images_per_second'] == pytest.approx(
            batch / row['seconds_per_step'])
    assert rows['batch 2']['step_time_vs_as_is'] == pytest.approx(
        rows['batch 2']['seconds_per_step'] /
        rows['as is']['seconds_per_step'])
    assert 'x the step as is' in proc.stdout


def test_lean_recipe_is_ddq_detr_with_the_studied_options(repo_root):
    """configs/shapes/ddq-detr-lean-tiny_shapes.py is ddq-detr-tiny with 2
    decoder layers, LEAN_QUERIES and FUSED_ADAMW, nothing else: the study's
    'ddq-detr-lean' units and its variants share one definition."""
    from mmengine.config import Config
    sys.path.insert(0, osp.join(repo_root, 'benchmarks'))
    import convergence
    shapes = osp.join(repo_root, 'configs/shapes')
    lean = Config.fromfile(osp.join(shapes, 'ddq-detr-lean-tiny_shapes.py'))
    ddq = Config.fromfile(osp.join(shapes, 'ddq-detr-tiny_shapes.py'))
    ddq.merge_from_dict(
        dict(convergence.FUSED_ADAMW, **convergence.LEAN_QUERIES,
             **{'model.decoder.num_layers': 2}))
    assert lean.to_dict() == ddq.to_dict()
    assert ddq.model.decoder.num_layers == 2
    assert ddq.model.dn_cfg.group_cfg.num_dn_queries == 20
    assert ddq.optim_wrapper.optimizer.fused is True


def test_time_plot_uses_the_budget_clock(repo_root):
    """An equal-wall-clock curve is placed at iteration x budget / length:
    a run slowed by other jobs after its length was set (measured seconds
    stretched) lands where its calibrated pace puts it; seeds average."""
    sys.path.insert(0, osp.join(repo_root, 'benchmarks'))
    import convergence

    def run(seed, iters, seconds):
        curve = [
            dict(
                iteration=it, seconds=s, metrics={'coco/bbox_mAP': it / 1000})
            for it, s in zip((iters // 2, iters), seconds)
        ]
        return dict(
            seed=seed,
            iters=iters,
            budget_seconds=780,
            seconds=seconds[-1],
            curve=curve)

    summary = convergence.summarize(
        {'dino': [run(0, 100, (400.0, 800.0)),
                  run(1, 200, (900.0, 1800.0))]})['dino']
    assert summary['budget_clock'] == [390.0, 780.0]
    assert summary['seconds'] == [650.0, 1300.0]  # measured, kept
    assert summary['final_per_seed'] == {0: 0.1, 1: 0.2}
    equal_iterations = dict(
        seed=0,
        iters=10,
        seconds=5.0,
        curve=[
            dict(iteration=10, seconds=5.0, metrics={'coco/bbox_mAP': 0.3})
        ])
    assert convergence.budget_clock(equal_iterations) == [0.0]
    equal_iterations['budget_seconds'] = None  # as the units store it
    assert convergence.budget_clock(equal_iterations) == [0.0]


def test_finetune_study_quick_and_resume(repo_root, tmp_path):
    work = tmp_path / 'units'
    cmd = [
        osp.join(repo_root, 'benchmarks/finetune_study.py'), '--quick',
        '--workdir',
        str(work), '--out',
        str(tmp_path / 'ft')
    ]
    proc = run_tool(cmd, cwd=tmp_path)
    result = json.loads((tmp_path / 'ft.json').read_text())
    assert (work / 'dino_pretrain_seed0.pth').stat().st_size > 0
    finetune = (work / 'dino_finetune_seed0.log').read_text()
    assert 'class-dependent weights keep their initialisation' in finetune
    assert 'Load checkpoint' not in (work /
                                     'dino_scratch_seed0.log').read_text()
    summary = result['summary']['dino']
    assert summary['gain'] == pytest.approx(
        summary['finetune']['coco/bbox_mAP']['mean'] -
        summary['scratch']['coco/bbox_mAP']['mean'])
    assert result['runs']['dino']['finetune'][0]['iters'] == 2
    assert '| dino |' in proc.stdout
    units = {p: p.stat().st_mtime_ns for p in work.glob('*.json')}
    run_tool(cmd, cwd=tmp_path)  # resumes: nothing runs again
    assert {p: p.stat().st_mtime_ns for p in work.glob('*.json')} == units


@pytest.mark.parametrize('method', ['ddq-detr', 'co-dino'])
def test_finetune_study_puts_every_method_on_the_target_data(
        repo_root, method):
    """The target config's data and class count reach every head of the
    method (Co-DINO's auxiliary heads, DDQ-DETR's dense branch)."""
    from mmengine.config import Config
    sys.path.insert(0, osp.join(repo_root, 'benchmarks'))
    import finetune_study
    from detr_testing import build
    cfg = Config.fromfile(
        osp.join(finetune_study.ROOT, finetune_study.METHODS[method]))
    cfg.merge_from_dict(finetune_study.target_options())
    assert cfg.train_dataloader.dataset.shapes_cfg['classes'] == [
        'triangle', 'ring', 'arrow'
    ]
    assert cfg.val_evaluator.ann_file.startswith('data/shapes_stripes/')
    model = build(cfg.model)
    classifiers = [
        m for name, m in model.named_modules()
        if name.endswith(('cls_branches.0', 'atss_cls', 'fc_cls'))
    ]
    assert classifiers
    for module in classifiers:
        out = module.out_features if hasattr(module, 'out_features') else \
            module.out_channels
        assert out in (3, 4), (module, out)  # 3 classes (+1: R-CNN's bg)


@pytest.mark.parametrize('method',
                         ['deformable-detr-2stage', 'h-deformable-detr'])
def test_upscaled_variants_resize_every_pipeline(repo_root, method):
    """The @256px variants (H-Deformable-DETR's token share) change the
    Resize steps of the train, val and test pipelines, nothing else; the
    H-DETR one is compared with the upscaled base."""
    from mmengine.config import Config
    sys.path.insert(0, osp.join(repo_root, 'benchmarks'))
    import convergence
    variant = f'{method}@256px'
    cfg = Config.fromfile(osp.join(repo_root, convergence.METHODS[variant]))
    before = Config.fromfile(osp.join(repo_root, convergence.METHODS[method]))
    cfg.merge_from_dict(
        json.loads(json.dumps(convergence.method_options(variant))))
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        steps = cfg[loader].dataset.pipeline
        resized = [s for s in steps if s.get('scale') == 256]
        assert [s.type for s in resized] == ['Resize'], loader
        assert len(steps) == len(before[loader].dataset.pipeline)
    assert convergence.BASES['h-deformable-detr@256px'] == \
        'deformable-detr-2stage@256px'
