"""The losses of a query detector: main queries, encoder, branches.

The predictions of every query set are split apart
(:class:`~..branches.protocol.SetPredictions`); the main queries get their
one-to-one loss per decoder layer and the encoder proposals theirs (or a
branch's replacement of them), every branch the loss of its own queries
and its terms on the main ones.  All of them go through the set-loss core
(:mod:`..losses.set_losses`).
"""
from ..branches.protocol import SetPredictions
from ..branches.queries import set_predictions, split_query_sets
from ..losses.set_losses import matched_set_loss, matched_targets, set_loss


class QueryLosses:
    """Mixin of :class:`~.query_detector.QueryBranchDetector`: its
    ``loss``."""

    def loss(self, batch_inputs, batch_data_samples):
        """Losses of the main branch, the encoder proposals and each branch."""
        img_feats = self.extract_feat(batch_inputs)
        head_inputs = self.forward_transformer(img_feats, batch_data_samples)
        return self.branch_losses(
            batch_data_samples=batch_data_samples, **head_inputs)

    def branch_losses(self, hidden_states, references, enc_outputs_class,
                      enc_outputs_coord, query_sets, batch_data_samples,
                      **decoder_outputs):
        """Split the predictions by query set and sum up their losses.

        Args:
            hidden_states (Tensor): (num_layers, bs, N, dim).
            references (list[Tensor]): num_layers + 1 of (bs, N, 4).
            enc_outputs_class (Tensor): (bs, k, num_classes), the encoder
                predictions of the encoder loss (DINO: the top k;
                Deformable DETR: every token, k = num_keys).
            enc_outputs_coord (Tensor): (bs, k, 4) in [0, 1].
            query_sets (list[QuerySet]): main first.
            batch_data_samples (list[DetDataSample]): the batch.
            **decoder_outputs: the rest of :meth:`forward_decoder`'s outputs
                (see :meth:`main_keep`).

        A branch's ``main_loss_weight`` (Group DETR: 1 / K) scales the
        losses of the main queries (decoder, encoder) and those of the
        branches that belong to them (``belongs_to_main``: DINO's
        denoising), ``supervise_main``'s terms included.
        """
        per_set = self._split_predictions(hidden_states, references,
                                          query_sets)
        per_set[0].keep = self.main_keep(decoder_outputs)
        main_losses = self._main_losses(per_set[0], enc_outputs_class,
                                        enc_outputs_coord, batch_data_samples)
        other_losses = {}
        branches = {branch.name: branch for branch in self.training_branches}
        for queries, predictions in zip(query_sets[1:], per_set[1:]):
            branch = branches[queries.name]
            losses = branch.loss(self, predictions, queries,
                                 batch_data_samples)
            target = main_losses if branch.belongs_to_main else other_losses
            target.update(losses)
        weight = 1.0
        for branch in self.training_branches:
            target = main_losses if branch.belongs_to_main else other_losses
            if not branch.replaces_main_loss:
                target.update(
                    branch.supervise_main(self, per_set[0],
                                          batch_data_samples))
            weight *= branch.main_loss_weight
        if weight != 1.0:
            main_losses = {k: v * weight for k, v in main_losses.items()}
        return dict(main_losses, **other_losses)

    def _main_losses(self, predictions, enc_cls, enc_coord,
                     batch_data_samples):
        """The main queries' decoder and encoder losses: the detector's,
        or those of the branch that replaces them."""
        gts = [s.gt_instances for s in batch_data_samples]
        metas = [s.metainfo for s in batch_data_samples]
        replacing = [b for b in self.training_branches if b.replaces_main_loss]
        if replacing:
            losses = replacing[0].supervise_main(self, predictions,
                                                 batch_data_samples)
        else:
            losses = self.main_decoder_loss(predictions, gts, metas)
        encoder = [
            b.supervise_encoder(self, enc_cls, enc_coord, batch_data_samples)
            for b in self.training_branches
        ]
        encoder = [e for e in encoder if e is not None]
        losses.update(encoder[0] if encoder else self.
                      encoder_loss(enc_cls, enc_coord, gts, metas))
        return losses

    def _split_predictions(self, hidden_states, references, query_sets):
        """:class:`SetPredictions` of every query set, in order."""
        cls_scores, bbox_preds = set_predictions(self.bbox_head, hidden_states,
                                                 references, query_sets)
        columns = [
            split_query_sets(x, query_sets, dim=2)
            for x in (cls_scores, bbox_preds, hidden_states)
        ]
        refs = [split_query_sets(r, query_sets, dim=1) for r in references]
        return [
            SetPredictions(cls, bbox, states, [r[i] for r in refs])
            for i, (cls, bbox, states) in enumerate(zip(*columns))
        ]

    def main_keep(self, decoder_outputs):
        """Per decoder layer, the main queries it is trained on ((bs, N)
        bool or None: all); all of them by default."""
        return None

    def encoder_loss(self, enc_cls, enc_coord, batch_gt_instances,
                     batch_img_metas):
        """DINO's: the one-to-one loss of the top-k proposals, with classes.

        Args:
            enc_cls (Tensor): (bs, k, num_classes) logits.
            enc_coord (Tensor): (bs, k, 4) boxes in [0, 1].
        """
        targets = matched_targets(
            self.bbox_head, list(enc_cls), list(enc_coord),
            self.encoder_gt_instances(batch_gt_instances), batch_img_metas)
        enc_losses = set_loss(self.bbox_head, enc_cls.flatten(0, 1),
                              enc_coord.flatten(0, 1), targets)
        return dict(
            zip(('enc_loss_cls', 'enc_loss_bbox', 'enc_loss_iou'), enc_losses))

    def encoder_gt_instances(self, batch_gt_instances):
        """The ground truth the encoder proposals are trained on (DINO:
        as it is)."""
        return batch_gt_instances

    def main_decoder_loss(self, predictions, batch_gt_instances,
                          batch_img_metas):
        """Hungarian loss of the main queries in every decoder layer (over
        the queries ``predictions.keep`` says each layer is trained on)."""
        return matched_set_loss(
            self.bbox_head,
            '',
            predictions.cls_scores,
            predictions.bbox_preds,
            batch_gt_instances,
            batch_img_metas,
            keeps=predictions.keep)
