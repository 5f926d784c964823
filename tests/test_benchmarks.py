"""Each benchmark script runs in its quickest mode, so they cannot rot."""
import json
import os.path as osp

from conftest import run_tool


def test_msda_op_benchmark_quick(repo_root, tmp_path):
    out = tmp_path / 'msda.json'
    run_tool([osp.join(repo_root, 'benchmarks/msda_op.py'), '--device',
              'cpu', '--quick', '--json', str(out)], cwd=tmp_path)
    result = json.loads(out.read_text())
    assert result['device'] == 'cpu' and result['cases']
    for case in result['cases']:
        assert case['results']['ours']['fwd_bwd_ms'] > 0


def test_train_step_benchmark_quick(repo_root, tmp_path):
    out = tmp_path / 'step.json'
    proc = run_tool([osp.join(repo_root, 'benchmarks/train_step.py'),
                     '--quick', '--json', str(out)], cwd=tmp_path)
    result = json.loads(out.read_text())
    seconds = result['seconds_per_step']
    assert seconds['ours'] > 0 and seconds['mmdet'] > 0
    assert result['speedup_vs_mmdet'] == seconds['mmdet'] / seconds['ours']
    assert 'speed-up' in proc.stdout


def test_query_branches_benchmark_quick(repo_root, tmp_path):
    out = tmp_path / 'branches.json'
    run_tool([osp.join(repo_root, 'benchmarks/query_branches.py'), '--quick',
              '--variants', 'dino', 'group-k3', '--json', str(out)],
             cwd=tmp_path)
    result = json.loads(out.read_text())
    seconds = result['seconds_per_step']
    assert set(seconds) == {'dino', 'group-k3'}
    assert result['time_ratio_vs_dino']['dino'] == 1.0
    assert result['time_ratio_vs_dino']['group-k3'] == \
        seconds['group-k3'] / seconds['dino']


def test_convergence_benchmark_quick(repo_root, tmp_path):
    out = tmp_path / 'conv'
    proc = run_tool([osp.join(repo_root, 'benchmarks/convergence.py'),
                     '--quick', '--methods', 'dino', 'group-dino', '--out',
                     str(out)], cwd=tmp_path)
    result = json.loads((tmp_path / 'conv.json').read_text())
    assert (tmp_path / 'conv.png').stat().st_size > 0
    for method in ('dino', 'group-dino'):
        summary = result['summary'][method]
        assert summary['iterations'] == [1, 2]
        assert 0.0 <= summary['mean'][-1] <= 1.0
        assert f'| {method} |' in proc.stdout
    merged = tmp_path / 'merged'
    run_tool([osp.join(repo_root, 'benchmarks/convergence.py'), '--combine',
              str(tmp_path / 'conv.json'), '--out', str(merged)],
             cwd=tmp_path)
    combined = json.loads((tmp_path / 'merged.json').read_text())
    assert combined['summary'] == result['summary']


def test_crowded_memory_benchmark_quick(repo_root, tmp_path):
    out = tmp_path / 'crowded.json'
    run_tool([osp.join(repo_root, 'benchmarks/crowded_memory.py'),
              '--num-gts', '1', '3', '--batch-size', '1', '--json', str(out)],
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
    proc = run_tool([osp.join(repo_root, 'benchmarks/inference.py'),
                     '--quick', '--json', str(out)], cwd=tmp_path)
    result = json.loads(out.read_text())
    (row, ) = result['results']
    assert row['batch_size'] == 1
    latency = row['latency_s']
    assert row['speedup_vs_mmdet'] == latency['mmdet'] / latency['ours']
    assert row['images_per_s']['ours'] == 1 / latency['ours']
    assert 'speed-up' in proc.stdout
