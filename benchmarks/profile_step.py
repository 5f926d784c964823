r"""Where the time of a training step (and of ``predict``) goes.

A ``torch.profiler`` profile of one training step of a DETR+ config, split
into phases: backbone, neck, encoder, MSDeformAttn forward and backward
(our op), query selection (DDQ's distinct-query NMS included), decoder,
matching (the assigners, scipy's ``linear_sum_assignment`` counted
separately), losses, backward, optimiser step; then the same for
``predict``.  The phases are ``record_function`` ranges put on by module
forward hooks and by monkeypatches made here (the package is not edited);
each range's *exclusive* wall time (minus the ranges nested in it) is its
phase, so the phases sum to the step.  Orthogonal to the phases, the host
overhead is the step's wall time minus the time spent inside torch ops.
Data loading (the config's real train dataloader) is timed apart.

Warm-up steps first, then ``--iters`` profiled steps; the median step (by
wall time) is reported, with each phase's min / max over the profiled steps.

    python benchmarks/profile_step.py --model ddq-detr-12min \
        --json benchmarks/results/profile_ddq-detr-12min_cpu.json
    python benchmarks/profile_step.py --model dino-r50 \
        --json benchmarks/results/profile_dino-r50_cpu.json
    python benchmarks/profile_step.py --quick      # smoke run

On a machine busy with other jobs, run with ``OMP_WAIT_POLICY=PASSIVE``:
OpenMP threads that spin-wait on cores other processes hold stall the ops
(a 0.4 s step took 0.8-7.5 s with 2 threads on 2 busy cores).  The JSON
records the setting and ``--load``, a note on the concurrent load.
"""
import argparse
import bisect
import copy
import functools
import os
import statistics
import sys
import time
from os import path as osp

import torch
from torch.autograd.profiler import record_function

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import train_step  # noqa: E402

# name -> (config, image size, batch size); None: the config's own
MODELS = {
    'ddq-detr-12min': ('configs/shapes/ddq-detr-12min_shapes.py', None, None),
    'dino-r50': ('configs/dino/dino-4scale_r50_8xb2-12e_coco.py', 512, 2),
}
PREFIX = 'phase:'
NODE_EVENT = 'autograd::engine::evaluate_function: '
MSDA_BACKWARD_EVENT = NODE_EVENT + '_EagerMSDABackward'
BACKWARD_PHASES = ('backward', 'msda_backward')
VIEW_WRITE_NODES = ('CopySlices', 'AsStridedBackward0')
# exclusive phases, in table order, with what each covers
TRAIN_PHASES = {
    'preprocess':
    'data_preprocessor: normalise, pad, stack the batch',
    'backbone':
    'backbone forward',
    'neck':
    'neck forward',
    'encoder':
    'encoder forward, less the MSDeformAttn op',
    'query_selection':
    'pre_decoder (encoder proposal heads, top-k / DDQ '
    'NMS over the proposals, denoising and dense '
    'queries) and DDQ\'s distinct-query NMS between '
    'decoder layers',
    'decoder':
    'decoder forward, less the MSDeformAttn op and the NMS '
    'between layers',
    'msda_forward':
    'the MSDeformAttn op forward (encoder and decoder '
    'calls: argument checks, autograd Function, kernel)',
    'forward_other':
    'the rest of the forward: pre_transformer (masks, '
    'positional encodings, flattening), glue',
    'matching':
    'the assigners\' assign / assign_batch (cost matrices, '
    'host copies), less linear_sum_assignment',
    'linear_sum_assignment':
    'scipy.optimize.linear_sum_assignment',
    'losses':
    'the rest of the loss computation: per-set predictions of '
    'the head, targets, loss terms, parse_losses',
    'backward':
    'loss.backward(), less the MSDeformAttn backward node',
    'msda_backward':
    'the autograd node _EagerMSDABackward (our op\'s '
    'backward kernel and its Python)',
    'grad_clip':
    'clip_grad_norm_ of the optim wrapper',
    'optimizer':
    'optimizer.step() (AdamW) and zero_grad()',
    'other':
    'train_step glue outside every range above',
}
PREDICT_PHASES = {
    'preprocess': TRAIN_PHASES['preprocess'],
    'backbone': 'backbone forward',
    'neck': 'neck forward',
    'encoder': TRAIN_PHASES['encoder'],
    'query_selection': 'pre_decoder (encoder proposal heads, top-k / DDQ '
    'NMS) and DDQ\'s NMS between decoder layers',
    'decoder': TRAIN_PHASES['decoder'],
    'msda_forward': TRAIN_PHASES['msda_forward'],
    'forward_other': 'the rest of predict: pre_transformer, glue, '
    'add_pred_to_datasample',
    'head_postprocess': 'bbox_head.predict: last-layer predictions, '
    'top-k, box rescaling',
    'other': 'test_step glue outside every range above',
}
HOST_OVERHEAD = (
    'wall time of the step minus the time spent inside torch ops: the sum '
    'of the self CPU time of every op event (names with "::": aten::, '
    'detr_plus_C::, detr_plus::, torchvision::, ...; not autograd engine '
    'or node events) recorded on the step\'s thread, measured as the time '
    'covered by the outermost op events.  It is the Python of the model '
    'and of mmdet / mmengine, the dispatcher and autograd bookkeeping '
    'between ops, and non-torch code such as scipy\'s '
    'linear_sum_assignment and numpy; it includes the profiler\'s own '
    'per-op cost (compare step_ms with step_ms_unprofiled).  Per phase: '
    'the same split within each phase.  An op\'s CPU time is its wall time '
    'on the calling thread (intra-op worker threads run in parallel within '
    'it).')
BACKWARD_BY_FORWARD = (
    'the backward (backward + msda_backward) split by the forward phase '
    'whose op made each autograd node (matched by sequence number): the '
    'wall time of each node\'s autograd::engine::evaluate_function event; '
    'accumulate_grad: AccumulateGrad nodes (writing .grad); the nodes '
    'of in-place writes into views of tensors that need grad '
    '(CopySlices, AsStridedBackward0) take numbers no op recorded and go '
    'to the phase of the op just before (view_write_nodes_ms: their '
    'total, e.g. an in-place ReLU on the view F.linear returns for 3-D '
    'input, in mmdet\'s FFN); '
    'engine_between_nodes: the rest of the backward\'s wall time.')


# --------------------------------------------------------------------------
# Ranges: hooks and monkeypatches
# --------------------------------------------------------------------------
class Ranges:
    """Puts the phase ranges on a model; ``undo()`` takes them off."""

    def __init__(self):
        self._undo = []

    def undo(self):
        while self._undo:
            self._undo.pop()()

    def module(self, module, phase):
        """A range over ``module``'s forward (forward pre / post hooks)."""
        if module is None:
            return
        stack = []

        def pre(mod, args):
            rf = record_function(PREFIX + phase)
            rf.__enter__()
            stack.append(rf)

        def post(mod, args, output):
            stack.pop().__exit__(None, None, None)

        handles = [
            module.register_forward_pre_hook(pre),
            module.register_forward_hook(post)
        ]
        self._undo.append(lambda: [h.remove() for h in handles])

    def attribute(self, owner, name, phase):
        """A range over calls of ``owner.name`` (an instance, a class or a
        module); the original is put back by :meth:`undo`."""
        original = owner.__dict__.get(name) if isinstance(owner, type) \
            else getattr(owner, name)
        if original is None:
            return
        function = original.__func__ if isinstance(original,
                                                   (staticmethod,
                                                    classmethod)) else original

        @functools.wraps(function)
        def wrapped(*args, **kwargs):
            with record_function(PREFIX + phase):
                return function(*args, **kwargs)

        if isinstance(original, staticmethod):
            wrapped = staticmethod(wrapped)
        elif isinstance(original, classmethod):
            wrapped = classmethod(wrapped)
        had_own = not isinstance(owner, type) and name in getattr(
            owner, '__dict__', {})
        setattr(owner, name, wrapped)
        if isinstance(owner, type) or had_own or \
                not hasattr(owner, '__dict__'):
            self._undo.append(lambda: setattr(owner, name, original))
        else:  # an instance attribute shadowing a method: delete it
            self._undo.append(lambda: delattr(owner, name))


def assigner_classes():
    """Every assigner class registered by mmdet and DETR+ that defines
    ``assign`` or ``assign_batch``."""
    from mmdet.registry import TASK_UTILS
    classes = []
    for cls in TASK_UTILS.module_dict.values():
        if 'Assigner' in cls.__name__ and ('assign' in cls.__dict__
                                           or 'assign_batch' in cls.__dict__):
            classes.append(cls)
    return classes


def put_ranges(model, optim_wrapper=None):
    """The phase ranges on ``model`` (and its optim wrapper)."""
    from scipy.optimize import linear_sum_assignment

    from projects_detr_plus.models.layers import (distinct_queries,
                                                  msda_attention)
    ranges = Ranges()
    for phase in ('data_preprocessor', 'backbone', 'neck', 'encoder',
                  'decoder'):
        ranges.module(
            getattr(model, phase, None),
            'preprocess' if phase == 'data_preprocessor' else phase)
    ranges.attribute(model, 'pre_decoder', 'query_selection')
    ranges.attribute(distinct_queries.DistinctQuerySelection, '__call__',
                     'query_selection')
    ranges.attribute(msda_attention, 'multi_scale_deformable_attn',
                     'msda_forward')
    for cls in assigner_classes():
        for name in ('assign', 'assign_batch'):
            if name in cls.__dict__:
                ranges.attribute(cls, name, 'matching')
    for module in list(sys.modules.values()):
        module_name = getattr(module, '__name__', '') or ''
        if module_name.startswith(('projects_detr_plus', 'mmdet')) and \
                getattr(module, 'linear_sum_assignment', None) is \
                linear_sum_assignment:
            ranges.attribute(module, 'linear_sum_assignment',
                             'linear_sum_assignment')
    ranges.attribute(model, 'loss', 'forward_other')
    ranges.attribute(model, 'predict', 'forward_other')
    ranges.attribute(model, 'branch_losses', 'losses')
    ranges.attribute(model, 'parse_losses', 'losses')
    ranges.attribute(model.bbox_head, 'predict', 'head_postprocess')
    if optim_wrapper is not None:
        ranges.attribute(optim_wrapper, 'backward', 'backward')
        ranges.attribute(optim_wrapper, '_clip_grad', 'grad_clip')
        ranges.attribute(optim_wrapper, 'step', 'optimizer')
        ranges.attribute(optim_wrapper, 'zero_grad', 'optimizer')
    return ranges


# --------------------------------------------------------------------------
# Analysis of one profiled step
# --------------------------------------------------------------------------
def is_op(name):
    """A torch op event (aten::, detr_plus_C::, ...), not a range of ours
    or an autograd engine / node event."""
    return '::' in name and not name.startswith(
        (PREFIX, 'autograd::', 'torch::autograd::'))


def phase_of_event(name):
    """The phase a range event opens, or None."""
    if name.startswith(PREFIX):
        return name[len(PREFIX):]
    if name == MSDA_BACKWARD_EVENT:
        return 'msda_backward'
    return None


def analyse(events, step_phase='step'):
    """Exclusive wall ms and op ms per phase of the one step in ``events``
    (the profiler's FunctionEvents); the time outside every phase range
    inside the step is ``other``.  Also the backward's autograd nodes by
    the forward phase that made them (``backward_by_forward``).

    One sweep over the phase ranges, the outermost op events and the
    autograd node events of the step's thread, in start order, with a
    stack of the open ranges: each stretch of time goes to the innermost
    open range, each op to the innermost range open at its start.  A
    forward op's sequence number maps its autograd node to its phase.
    """
    step = [e for e in events if e.name == PREFIX + step_phase]
    assert len(step) == 1, f'expected one {step_phase} range, got {len(step)}'
    step = step[0]
    t0, t1 = step.time_range.start, step.time_range.end
    items = []  # (start, -end, kind: 0 range / 1 op / 2 node, payload)
    for e in events:
        if e.thread != step.thread or e is step:
            continue
        start, end = e.time_range.start, e.time_range.end
        if start < t0 or end > t1:
            continue
        phase = phase_of_event(e.name)
        if phase is not None:
            items.append((start, -end, 0, phase))
        if e.name.startswith(NODE_EVENT):
            items.append((start, -end, 2, (e.sequence_nr, e.name)))
        elif is_op(e.name) or e.sequence_nr >= 0:  # (autograd Functions)
            items.append((start, -end, 1, (e.sequence_nr, is_op(e.name))))
    items.sort(key=lambda item: item[:3])
    wall, op_time, nodes, seq_phase = {}, {}, [], {}
    stack = [(t1, 'other')]  # (end, phase) of the open ranges
    cursor, op_end = t0, -float('inf')

    def close_until(time):
        nonlocal cursor
        while len(stack) > 1 and stack[-1][0] <= time:
            end, phase = stack.pop()
            wall[phase] = wall.get(phase, 0.0) + end - cursor
            cursor = end

    for start, neg_end, kind, payload in items:
        end = -neg_end
        close_until(start)
        owner = stack[-1][1]
        if kind == 1:
            seq, op = payload
            if op and start >= op_end:  # outermost: nested ops inside it
                op_time[owner] = op_time.get(owner, 0.0) + end - start
                op_end = end
            if seq >= 0 and owner not in BACKWARD_PHASES:
                seq_phase[seq] = owner  # the last op of that number
        elif kind == 2:
            nodes.append((payload, end - start))
        else:
            wall[owner] = wall.get(owner, 0.0) + start - cursor
            cursor = start
            stack.append((min(end, stack[-1][0]), payload))
    close_until(t1)
    wall['other'] = wall.get('other', 0.0) + t1 - cursor
    by_phase, view_writes = node_phases(nodes, seq_phase)
    us = 1e-3
    return dict(
        step_ms=(t1 - t0) * us,
        wall_ms={
            k: v * us
            for k, v in wall.items()
        },
        op_ms={
            k: v * us
            for k, v in op_time.items()
        },
        backward_by_forward={
            k: v * us
            for k, v in by_phase.items()
        },
        view_write_nodes_ms=view_writes * us)


def node_phases(nodes, seq_phase):
    """Backward node time (``nodes``: ((seq, name), us)) by the forward
    phase of the op of that sequence number.  The nodes of in-place
    writes into views (CopySlices, AsStridedBackward0) take numbers no
    op recorded: they go to the phase of the nearest lower number (the
    in-place op just before).  Also their total time."""
    known = sorted(seq_phase)
    by_phase, view_writes = {}, 0.0
    for (seq, name), us in nodes:
        if name.endswith('AccumulateGrad'):
            phase = 'accumulate_grad'
        elif seq in seq_phase:
            phase = seq_phase[seq]
        else:
            below = bisect.bisect_left(known, seq) - 1
            phase = seq_phase[known[below]] if below >= 0 else 'unmatched'
        if name.endswith(VIEW_WRITE_NODES):
            view_writes += us
        by_phase[phase] = by_phase.get(phase, 0.0) + us
    return by_phase, view_writes


def top_ops(key_averages, steps, step_ms, count=15):
    """The ``count`` ops with the most self CPU time, per step."""
    rows = [a for a in key_averages if is_op(a.key)]
    rows.sort(key=lambda a: a.self_cpu_time_total, reverse=True)
    return [
        dict(
            op=a.key,
            self_ms=a.self_cpu_time_total * 1e-3 / steps,
            percent_of_step=100 * a.self_cpu_time_total * 1e-3 / steps /
            step_ms,
            calls=a.count / steps) for a in rows[:count]
    ]


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------
def profile_calls(call, iters, warmup, phases):
    """Profile ``iters`` calls of ``call`` after ``warmup``: the median
    call's phases (ms, percent, op / host split), min / max per phase,
    the top ops and the per-call wall times."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(warmup):
        call()
    results, averages = [], []
    for _ in range(iters):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function(PREFIX + 'step'):
                call()
        results.append(analyse(prof.events()))
        averages.append(prof.key_averages())
    order = sorted(range(iters), key=lambda i: results[i]['step_ms'])
    median = order[(iters - 1) // 2]
    chosen = results[median]
    step_ms = chosen['step_ms']
    unknown = set().union(*(r['wall_ms'] for r in results)) - set(phases)
    assert not unknown, f'phases without a description: {unknown}'
    table = {}
    for phase in phases:
        ms = chosen['wall_ms'].get(phase, 0.0)
        ops = chosen['op_ms'].get(phase, 0.0)
        across = [r['wall_ms'].get(phase, 0.0) for r in results]
        table[phase] = dict(
            ms=ms,
            percent=100 * ms / step_ms,
            op_ms=ops,
            host_ms=ms - ops,
            min_ms=min(across),
            max_ms=max(across))
    op_total = sum(chosen['op_ms'].values())
    extra = {}
    if chosen['backward_by_forward']:
        nodes = chosen['backward_by_forward']
        backward = sum(chosen['wall_ms'].get(p, 0.0) for p in BACKWARD_PHASES)
        nodes = dict(sorted(nodes.items(), key=lambda kv: -kv[1]))
        nodes['engine_between_nodes'] = backward - sum(nodes.values())
        extra['backward_by_forward_phase'] = dict(
            definition=BACKWARD_BY_FORWARD,
            ms={
                k: v
                for k, v in nodes.items()
            },
            percent_of_backward={
                k: 100 * v / backward
                for k, v in nodes.items()
            },
            view_write_nodes_ms=chosen['view_write_nodes_ms'],
            view_write_nodes_percent_of_backward=100 *
            chosen['view_write_nodes_ms'] / backward)
    return dict(
        step_ms=step_ms,
        profiled_step_ms=[r['step_ms'] for r in results],
        median_index=median,
        phases=table,
        host_overhead=dict(
            ms=step_ms - op_total,
            percent=100 * (step_ms - op_total) / step_ms,
            op_ms=op_total,
            definition=HOST_OVERHEAD),
        top_ops=top_ops(averages[median], 1, step_ms),
        **extra)


def time_calls(call, iters):
    """Median wall seconds of ``iters`` unprofiled calls."""
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def data_loading_ms(cfg, batches):
    """Median ms to produce one batch from ``cfg``'s train dataloader
    (after one warm-up batch), and its settings."""
    from mmengine.runner import Runner
    loader_cfg = copy.deepcopy(cfg.train_dataloader)
    dataset = loader_cfg.dataset
    if not osp.isabs(dataset.data_root):
        dataset.data_root = osp.join(train_step.ROOT, dataset.data_root)
    loader = iter(Runner.build_dataloader(loader_cfg, seed=0))
    next(loader)
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        next(loader)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, dict(
        batch_size=loader_cfg.batch_size,
        num_workers=loader_cfg.num_workers,
        batches=batches)


def describe_load(note):
    """The concurrent load: ``note`` plus the load averages."""
    try:
        one, five, fifteen = os.getloadavg()
        avg = (f'load average {one:.2f} / {five:.2f} / {fifteen:.2f} '
               f'(1 / 5 / 15 min) on {os.cpu_count()} cores at the end')
    except OSError:
        avg = 'load average unavailable'
    return f'{note}; {avg}' if note else avg


def load_config(args):
    from mmengine.config import Config
    path, image_size, batch_size = MODELS[args.model]
    cfg = Config.fromfile(osp.join(train_step.ROOT, path))
    cfg.model.backbone.init_cfg = None  # no pretrained weights offline
    if image_size is None:  # the shapes configs: from the dataset
        image_size = cfg.train_dataloader.dataset.image_size
        batch_size = cfg.train_dataloader.batch_size
    return cfg, path, image_size, batch_size


def quiet_mmengine():
    """No INFO log of every parameter's initialisation."""
    import logging

    from mmengine.logging import MMLogger
    MMLogger.get_current_instance().setLevel(logging.WARNING)


def run(args):
    torch.set_num_threads(args.threads)
    quiet_mmengine()
    cfg, path, image_size, batch_size = load_config(args)
    if args.quick:
        batch_size = 1
    torch.manual_seed(0)
    model, optim_wrapper = train_step.build(cfg, 'cpu')
    batch = train_step.synthetic_batch(image_size, batch_size, args.num_gts, 0,
                                       'cpu')

    def one_step():
        model.train_step(copy.deepcopy(batch), optim_wrapper)

    def predict():
        with torch.no_grad():
            model.test_step(copy.deepcopy(batch))

    result = dict(
        model=args.model,
        config=path,
        device='cpu',
        machine=train_step.machine('cpu'),
        threads=torch.get_num_threads(),
        omp_wait_policy=os.environ.get('OMP_WAIT_POLICY'),
        image_size=image_size,
        batch_size=batch_size,
        num_gts=args.num_gts,
        warmup=args.warmup,
        iters=args.iters,
        quick=args.quick,
        optim_wrapper=dict(
            type=type(optim_wrapper).__name__,
            optimizer=repr(optim_wrapper.optimizer).split(' (')[0],
            clip_grad=cfg.optim_wrapper.get('clip_grad')),
        reported='the profiled step with the median wall time: '
        'ms and percent per phase are exclusive and sum '
        'to step_ms; min_ms / max_ms over the profiled '
        'steps')
    ranges = put_ranges(model, optim_wrapper)
    try:
        model.train()
        train = profile_calls(one_step, args.iters, args.warmup, TRAIN_PHASES)
        phases = train['phases']
        train['backward_total_ms'] = phases['backward']['ms'] + \
            phases['msda_backward']['ms']
        train['step_ms_unprofiled'] = time_calls(one_step, args.iters) * 1e3
        model.eval()
        pred = profile_calls(predict, args.iters, args.warmup, PREDICT_PHASES)
        pred['step_ms_unprofiled'] = time_calls(predict, args.iters) * 1e3
    finally:
        ranges.undo()
    result['train_step'] = train
    result['predict'] = pred
    result['phase_definitions'] = dict(
        train_step=TRAIN_PHASES, predict=PREDICT_PHASES)
    if 'ShapesDataset' in str(cfg.train_dataloader.dataset.get('type')):
        ms, settings = data_loading_ms(cfg, 1 if args.quick else 10)
        result['data_loading'] = dict(
            ms=ms,
            percent_of_unprofiled_step=100 * ms / train['step_ms_unprofiled'],
            **settings,
            note='outside the step: median time to produce one batch from '
            'the config\'s real train dataloader (shapes data); with '
            'num_workers=0 it runs in series with the step')
    else:
        result['data_loading'] = dict(
            ms=None,
            note='skipped: the COCO config\'s data is not on this '
            'machine (the step runs on a synthetic batch)')
    result['load'] = describe_load(args.load)
    result['date'] = time.strftime('%Y-%m-%d')
    return result


def print_table(title, part, phases):
    print(f"\n{title}: {part['step_ms']:.0f} ms profiled (median of "
          f"{len(part['profiled_step_ms'])}), "
          f"{part['step_ms_unprofiled']:.0f} ms unprofiled")
    print(f"{'phase':<24}{'ms':>9}{'%':>7}{'ops ms':>9}{'host ms':>9}")
    for phase in phases:
        row = part['phases'][phase]
        print(f"{phase:<24}{row['ms']:>9.1f}{row['percent']:>7.1f}"
              f"{row['op_ms']:>9.1f}{row['host_ms']:>9.1f}")
    host = part['host_overhead']
    print(f"{'host overhead (all)':<24}{host['ms']:>9.1f}"
          f"{host['percent']:>7.1f}")
    print('top ops by self CPU time:')
    for row in part['top_ops']:
        print(f"  {row['op']:<40}{row['self_ms']:>9.1f} ms"
              f"{row['percent_of_step']:>6.1f} %{row['calls']:>7.0f} calls")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        '--model', choices=sorted(MODELS), default='ddq-detr-12min')
    parser.add_argument(
        '--num-gts',
        type=int,
        default=10,
        help='ground truths per synthetic image (10, as '
        'train_step.py)')
    parser.add_argument(
        '--iters',
        type=int,
        default=3,
        help='profiled steps (the median is reported)')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument(
        '--threads', type=int, default=2, help='torch CPU threads (2)')
    parser.add_argument(
        '--load',
        default='',
        help='what else ran on the machine (for the JSON)')
    parser.add_argument(
        '--quick',
        action='store_true',
        help='smoke run: ddq-detr-12min, batch 1, 1 step, '
        'no warm-up')
    parser.add_argument('--json', help='write the result here')
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.iters, args.warmup = 'ddq-detr-12min', 1, 0
    return args


def main(argv=None):
    args = parse_args(argv)
    result = run(args)
    print(f"{args.model}: {result['image_size']} px, batch "
          f"{result['batch_size']}, {result['threads']} threads; "
          f"{result['load']}")
    print_table('train step', result['train_step'], TRAIN_PHASES)
    train = result['train_step']
    print(f"backward total: {train['backward_total_ms']:.1f} ms; by "
          'forward phase (% of backward):')
    split = train['backward_by_forward_phase']['percent_of_backward']
    print('  ' + ', '.join(f'{k} {v:.1f}' for k, v in split.items()))
    print_table('predict', result['predict'], PREDICT_PHASES)
    data = result['data_loading']
    print('\ndata loading: ' + (f"{data['ms']:.1f} ms per batch"
                                if data['ms'] is not None else data['note']))
    train_step.write_json(result, args.json)
    return result


if __name__ == '__main__':
    main()
