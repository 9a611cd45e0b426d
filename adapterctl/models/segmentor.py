"""Encoder-decoder semantic segmentor: normalise -> backbone -> heads; losses in training, logits in inference.

Inference follows mmseg 0.20's ``EncoderDecoder``: ``whole`` (one pass), ``slide`` (crops averaged as logits)
and ``aug`` (multi-scale + flip, softmax probabilities averaged). Inputs are padded to multiples of 32 for the
backbone and the logits cropped back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapterctl.models.heads.common import SemanticHead, resize, seg_accuracy


class EncoderDecoder(nn.Module):
    """A backbone returning a list of maps, a decode head and an optional auxiliary head.

    Args:
        backbone: returns ``[f1, f2, f3, f4]``; must declare ``feature_info``.
        decode_head, auxiliary_head: :class:`SemanticHead` s: each owns its loss (``head.loss``) and says how its
            outputs become class scores (``head.semantic_scores``); inference here works on those scores only.
        mean, std: RGB normalisation on the 0-255 scale; images enter the model unnormalised.
        test_mode: ``whole``, ``slide`` or ``aug``; ``crop_size``/``stride`` for slide, ``aug_ratios``/``aug_flip``
            and ``aug_mode`` (whole or slide per scale) for aug.
        pad_short_side: in ``aug``, pad each scaled (and flipped) image at the bottom/right with black pixels
            until both sides reach this size, and crop the padding off its logits again (the official 896
            multi-scale protocol: ``PadShortSide`` + ``EncoderDecoderMask2FormerAug``, so a fixed-window
            backbone sees full crops at the smaller scales).
        size_divisor: the backbone's input multiple.
    """

    def __init__(
        self,
        backbone: nn.Module,
        decode_head: SemanticHead,
        auxiliary_head: SemanticHead | None = None,
        *,
        mean: Sequence[float] = (123.675, 116.28, 103.53),
        std: Sequence[float] = (58.395, 57.12, 57.375),
        test_mode: str = "whole",
        crop_size: Sequence[int] = (512, 512),
        stride: Sequence[int] = (341, 341),
        aug_ratios: Sequence[float] = (1.0,),
        aug_flip: bool = False,
        aug_mode: str = "whole",
        pad_short_side: int | None = None,
        size_divisor: int = 32,
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        if test_mode not in ("whole", "slide", "aug"):
            raise ValueError(f"test_mode must be whole, slide or aug, got {test_mode!r}")
        if aug_mode not in ("whole", "slide"):
            raise ValueError(f"aug_mode must be whole or slide, got {aug_mode!r}")
        self.backbone = backbone
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.test_mode = test_mode
        self.crop_size = tuple(int(c) for c in crop_size)
        self.stride = tuple(int(s) for s in stride)
        self.aug_ratios = tuple(float(r) for r in aug_ratios)
        self.aug_flip = aug_flip
        self.aug_mode = aug_mode
        self.pad_short_side = int(pad_short_side) if pad_short_side else None
        self.size_divisor = size_divisor
        self.align_corners = align_corners
        self.num_classes = decode_head.num_classes

    # ------------------------------------------------------------------ training
    def forward(self, images: Tensor, targets: Tensor | None = None) -> dict[str, Tensor] | Tensor:
        """Training (``targets``: (B, H, W) labels): the heads' ``loss_*`` tensors (+ ``acc_seg``, not a loss).
        Otherwise the scores of :meth:`predict` at the input size."""
        if targets is None:
            return self.predict(images)
        feats = self.backbone(self.normalize(images))
        decode = self.decode_head(feats)
        out = dict(self.decode_head.loss(decode, targets))
        if self.auxiliary_head is not None:
            out.update(self.auxiliary_head.loss(self.auxiliary_head(feats), targets))
        with torch.no_grad():
            scores = self.decode_head.semantic_scores(decode).detach()
            out["acc_seg"] = seg_accuracy(scores, targets, self.align_corners)
        return out

    def normalize(self, images: Tensor) -> Tensor:
        return (images.float() - self.mean) / self.std

    # ------------------------------------------------------------------ inference
    def encode_decode(self, images: Tensor) -> Tensor:
        """Unnormalised images of any size -> decode logits at the image size (padding to the size divisor)."""
        h, w = images.shape[-2:]
        x = self.normalize(images)
        d = self.size_divisor
        pad_h, pad_w = (-h) % d, (-w) % d
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))  # zeros in normalised space, as mmseg's Pad after Normalize
        logits = self.decode_head.semantic_scores(self.decode_head(self.backbone(x)))
        logits = resize(logits, (h + pad_h, w + pad_w), self.align_corners)
        return logits[..., :h, :w]

    def slide_logits(self, images: Tensor) -> Tensor:
        """Sliding-window logits: crops of ``crop_size`` every ``stride``, logits averaged where they overlap."""
        h_crop, w_crop = self.crop_size
        h_stride, w_stride = self.stride
        b, _, h, w = images.shape
        h_grids = max(h - h_crop + h_stride - 1, 0) // h_stride + 1
        w_grids = max(w - w_crop + w_stride - 1, 0) // w_stride + 1
        logits = images.new_zeros((b, self.num_classes, h, w), dtype=torch.float32)
        count = images.new_zeros((1, 1, h, w), dtype=torch.float32)
        for hi in range(h_grids):
            for wi in range(w_grids):
                y1, x1 = hi * h_stride, wi * w_stride
                y2, x2 = min(y1 + h_crop, h), min(x1 + w_crop, w)
                y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
                crop = images[:, :, y1:y2, x1:x2]
                logits[:, :, y1:y2, x1:x2] += self.encode_decode(crop).float()
                count[:, :, y1:y2, x1:x2] += 1
        return logits / count

    def _logits(self, images: Tensor, mode: str) -> Tensor:
        return self.slide_logits(images) if mode == "slide" else self.encode_decode(images).float()

    @torch.no_grad()
    def predict(self, images: Tensor, out_size: Sequence[int] | None = None, mode: str | None = None) -> Tensor:
        """Logits (``whole``/``slide``) or probabilities (``aug``), resized to ``out_size`` (default: input size).

        Either way ``argmax(1)`` is the prediction; ``aug`` averages the softmax over scales and flips.
        """
        mode = mode or self.test_mode
        out_size = tuple(out_size) if out_size is not None else tuple(images.shape[-2:])
        if mode != "aug":
            return resize(self._logits(images, mode), out_size, self.align_corners)
        h, w = images.shape[-2:]
        probs = None
        for ratio in self.aug_ratios:
            size = (int(math.ceil(h * ratio / 32) * 32), int(math.ceil(w * ratio / 32) * 32))
            scaled = resize(images.float(), size, self.align_corners) if size != (h, w) else images.float()
            flips = (False, True) if self.aug_flip else (False,)
            for flip in flips:
                inp = scaled.flip(-1) if flip else scaled
                sh, sw = inp.shape[-2:]
                if self.pad_short_side and min(sh, sw) < self.pad_short_side:
                    side = self.pad_short_side  # black in pixel space: padded before normalisation, as the official
                    inp = F.pad(inp, (0, max(side - sw, 0), 0, max(side - sh, 0)))
                logits = self._logits(inp, self.aug_mode)[..., :sh, :sw]
                if flip:
                    logits = logits.flip(-1)
                p = resize(logits, out_size, self.align_corners).softmax(1)
                probs = p if probs is None else probs + p
        assert probs is not None
        return probs / (len(self.aug_ratios) * (2 if self.aug_flip else 1))
