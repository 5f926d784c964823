"""mim metadata: model-index.yml and the per-method metafile.yml files."""
import glob
import os.path as osp

import yaml

from conftest import REPO_ROOT

# partial configs that other configs inherit, not models
BASES = {
    'configs/shapes/shapes_runtime.py', 'configs/shapes/tiny_backbone.py',
    'configs/shapes/co_detr_aux_heads.py',
    'configs/ddq_fcn/detr_augmentation.py'
}


def _metafiles():
    with open(osp.join(REPO_ROOT, 'model-index.yml')) as f:
        imports = yaml.safe_load(f)['Import']
    return {
        path: yaml.safe_load(open(osp.join(REPO_ROOT, path)))
        for path in imports
    }


def test_every_config_is_listed_once_and_every_entry_exists():
    listed = []
    for path, meta in _metafiles().items():
        for model in meta['Models']:
            assert osp.isfile(osp.join(REPO_ROOT, model['Config'])), \
                (path, model['Config'])
            assert model['Name'] == osp.splitext(
                osp.basename(model['Config']))[0]
            listed.append(model['Config'])
    shipped = {
        osp.relpath(p, REPO_ROOT)
        for p in glob.glob(osp.join(REPO_ROOT, 'configs', '*', '*.py'))
    } - BASES
    assert sorted(listed) == sorted(shipped)
    assert sorted(osp.dirname(p) for p in _metafiles()) == sorted(
        osp.relpath(p, REPO_ROOT)
        for p in glob.glob(osp.join(REPO_ROOT, 'configs', '*'))
        if osp.isdir(p) and osp.basename(p) != '__pycache__')


def test_coco_entries_name_paper_code_and_whose_result():
    collections = {}
    for meta in _metafiles().values():
        collections.update({c['Name']: c for c in meta.get('Collections', [])})
    for meta in _metafiles().values():
        for model in meta['Models']:
            collection = collections[model['In Collection']]
            source = model['Metadata']['Results Source']
            if collection['Metadata']['Training Data'] != 'COCO':
                continue
            assert collection['Paper']['URL'].startswith('https://')
            assert collection['Code']['URL'].startswith('https://github.com/')
            if 'Results' in model:
                ap = model['Results'][0]['Metrics']['box AP']
                assert 30 < ap < 70, model['Name']
                assert 'not measured here' in source, model['Name']
            else:
                assert 'no result' in source or 'no reported' in source


def test_mim_reads_the_model_index():
    from mim.commands.search import convert2df
    from modelindex.load_model_index import load
    frame = convert2df(load(osp.join(REPO_ROOT, 'model-index.yml')))
    listed = {
        m['Name']
        for meta in _metafiles().values()
        for m in meta['Models']
    }
    assert set(frame.index) == listed
