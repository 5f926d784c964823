"""``CheckedCocoDataset``: mmdet's ``CocoDataset`` that validates its boxes.

mmdet's ``CocoDataset`` silently drops annotations whose category id is
unknown, keeps NaN/inf boxes (they surface hours later as NaN losses) and
keeps boxes that stick out of the image.  This subclass, a drop-in for
``type='CocoDataset'``, checks every annotation when the annotation file is
loaded:

* NaN/inf coordinates or a malformed ``bbox``: ``ValueError`` naming the
  image file, image id, annotation id and the box;
* a ``category_id`` that is not among the file's categories: ``ValueError``
  (ids of categories the config leaves out on purpose, via
  ``metainfo.classes``, are skipped as in mmdet);
* boxes partly outside the image are clipped to it, boxes of zero or
  negative size (or, after clipping, outside the image) are dropped as in
  mmdet; one warning per dataset counts both.
"""
import math
import warnings

from mmdet.datasets import CocoDataset
from mmdet.registry import DATASETS


@DATASETS.register_module()
class CheckedCocoDataset(CocoDataset):
    """COCO-format dataset that rejects broken boxes with a clear error."""

    def load_data_list(self):
        self._clipped, self._dropped = 0, 0
        data_list = super().load_data_list()
        if self._clipped or self._dropped:
            warnings.warn(
                f'{self.ann_file}: clipped {self._clipped} boxes to their '
                f'image and dropped {self._dropped} boxes of zero size or '
                'outside the image')
        return data_list

    def parse_data_info(self, raw_data_info):
        img_info = raw_data_info['raw_img_info']
        checked = [
            self._checked(ann, img_info)
            for ann in raw_data_info['raw_ann_info']
        ]
        return super().parse_data_info(
            dict(
                raw_data_info,
                raw_ann_info=[a for a in checked if a is not None]))

    def _checked(self, ann, img_info):
        """``ann`` with its box clipped to the image, None to drop it."""
        where = (f"{img_info.get('file_name')} (image id "
                 f"{img_info.get('img_id')}, annotation id {ann.get('id')})")
        bbox = ann.get('bbox')
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise ValueError(f'{where}: bbox must be [x, y, w, h], got '
                             f'{bbox!r}')
        if not all(
                isinstance(v, (int, float)) and math.isfinite(v)
                for v in bbox):
            raise ValueError(f'{where}: bbox has NaN/inf or non-numeric '
                             f'coordinates: {bbox}')
        if ann.get('category_id') not in self.coco.cats:
            raise ValueError(
                f"{where}: category_id {ann.get('category_id')!r} is not a "
                f'category of {self.ann_file} (ids: '
                f'{sorted(self.coco.cats)})')
        x, y, w, h = bbox
        if w <= 0 or h <= 0:
            self._dropped += 1
            return None
        width, height = img_info['width'], img_info['height']
        x1, y1 = min(max(x, 0), width), min(max(y, 0), height)
        x2, y2 = min(max(x + w, 0), width), min(max(y + h, 0), height)
        if (x2 - x1) < 1 or (y2 - y1) < 1:
            self._dropped += 1
            return None
        if (x1, y1, x2, y2) != (x, y, x + w, y + h):
            self._clipped += 1
            ann = dict(ann, bbox=[x1, y1, x2 - x1, y2 - y1])
        return ann
