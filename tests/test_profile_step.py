"""Smoke test of benchmarks/profile_step.py (its --quick mode)."""
import json
import os.path as osp

import pytest

from conftest import run_tool


def test_profile_step_quick(repo_root, tmp_path):
    out = tmp_path / 'profile.json'
    # passive OpenMP waits: 2 threads on a busy 2-core machine can
    # otherwise stall an op for seconds
    proc = run_tool([
        osp.join(repo_root, 'benchmarks/profile_step.py'), '--quick', '--json',
        str(out)
    ],
                    cwd=tmp_path,
                    env=dict(OMP_WAIT_POLICY='PASSIVE'))
    result = json.loads(out.read_text())
    assert result['quick'] and result['load'] and result['date']
    assert result['threads'] == 2 and 'torch' in result['machine']
    for part, phases in (('train_step',
                          ('backbone', 'neck', 'encoder', 'msda_forward',
                           'decoder', 'query_selection', 'matching',
                           'linear_sum_assignment', 'losses', 'backward',
                           'msda_backward', 'optimizer', 'other')),
                         ('predict',
                          ('backbone', 'encoder', 'msda_forward', 'decoder',
                           'query_selection', 'head_postprocess'))):
        profile = result[part]
        table = profile['phases']
        assert set(phases) <= set(table)
        for row in table.values():
            assert row['ms'] >= 0 and row['percent'] >= 0
            assert row['op_ms'] >= 0
        total = sum(row['percent'] for row in table.values())
        assert total == pytest.approx(100, abs=0.5)
        assert sum(row['ms'] for row in table.values()) == pytest.approx(
            profile['step_ms'], rel=5e-3)
        # these run in every DDQ-DETR step
        for phase in ('backbone', 'encoder', 'msda_forward', 'decoder',
                      'query_selection'):
            assert table[phase]['ms'] > 0, phase
        host = profile['host_overhead']
        assert 0 <= host['ms'] <= profile['step_ms'] and host['definition']
        assert len(profile['top_ops']) == 15
    train = result['train_step']['phases']
    for phase in ('matching', 'losses', 'backward', 'msda_backward',
                  'optimizer'):
        assert train[phase]['ms'] > 0, phase
    split = result['train_step']['backward_by_forward_phase']['ms']
    assert split['msda_forward'] > 0 and split['backbone'] > 0
    assert result['data_loading']['ms'] > 0
    assert 'host overhead' in proc.stdout
