# Fine-tune DINO-4scale R50 (or any DETR+ config: change _base_) on your own
# COCO-format dataset.  Edit the four marked lines; then
#   python tools/train.py \
#       configs/finetune/dino-4scale_r50_8xb2-12e_my-coco-format-dataset.py
# `load_from` may be a checkpoint trained with another number of classes (a
# COCO one): the class-dependent weights (class branches, the denoising label
# embedding, auxiliary classifiers) keep their initialisation, with a log
# line naming them, and everything else loads.
_base_ = '../dino/dino-4scale_r50_8xb2-12e_coco.py'

data_root = 'data/my_dataset/'  # EDIT: folder of your images and json files
classes = ('cat', 'dog', 'bird')  # EDIT: category names, as in the json
load_from = None  # EDIT: e.g. 'checkpoints/dino-4scale_r50_12e_coco.pth'
metainfo = dict(classes=classes)

model = dict(
    # the only num_classes to set: denoising, encoder proposals and query
    # branches take the head's (setting it elsewhere is an error)
    bbox_head=dict(num_classes=len(classes)),
    # DETRs always return max_per_img boxes, most of them with low scores:
    # COCO mAP wants them all (score_thr=0); for deployment or drawing,
    # keep the confident ones, e.g. --cfg-options model.test_cfg.score_thr=0.3
    test_cfg=dict(max_per_img=100, score_thr=0.0))


def _split(name):  # EDIT the file layout if yours differs
    return dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file=f'annotations/{name}.json',
        data_prefix=dict(img=f'{name}/'))


train_dataloader = dict(dataset=_split('train'))
val_dataloader = dict(dataset=_split('val'))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/val.json')
test_evaluator = val_evaluator
# before training and validation: the heads' num_classes must equal the
# number of classes in metainfo (mmdet's check, error otherwise)
custom_hooks = [
    dict(type='RandomStateHook'),
    dict(type='NumClassCheckHook'),
    dict(type='NonFiniteGuardHook')
]
