"""``adapterctl export``: a checkpoint to ONNX, torch.export (.pt2) or TorchScript, checked against eager.

The exported graph takes one unnormalised RGB image batch (0-255 floats) of the fixed ``input_size``.
Segmentation returns the decode logits at that size (``whole`` inference). Detection (Mask R-CNN, Cascade,
HTC++; ONNX and torch.export) returns ``boxes`` (D, 4) xyxy in input pixels, ``scores`` (D,), ``labels`` (D,)
1..K (the config's ``data.category_ids`` name them) and ``masks`` (D, H, W) uint8, D data-dependent (at most the
head's ``max_per_img``); the masks are pasted over the whole canvas (mmdet's GPU rule). Spatial shapes are Python
ints, so the graph is static in H and W: resize or pad inputs to ``input_size``. Deformable sampling is
exported in its ``grid_sample`` form (ONNX GridSample, opset >= 16); the fused-gather form has no ONNX
counterpart.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

FORMATS = {"onnx": ".onnx", "torch_export": ".pt2", "torchscript": ".ts"}


class _Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model.encode_decode(images)


class _Detections(nn.Module):
    """One image through a detector's parts, without the resize-back: the export contract of the module
    docstring."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from adapterctl.models.detector import paste_masks_dense

        m = self.model
        batch, _ = m.transform([images[0]])
        features = m.backbone(batch.tensors)
        proposals, _ = m.rpn(batch, features)
        det = m.roi_heads(features, proposals, batch.image_sizes)[0][0]
        h, w = images.shape[-2:]
        masks = paste_masks_dense(det["masks"][:, 0], det["boxes"], h, w, m.transform.mask_threshold)
        return det["boxes"], det["scores"], det["labels"], masks.to(torch.uint8)


def _exportable(model: nn.Module, task: str = "segmentation") -> nn.Module:
    from adapterctl.layers.ms_deform_attn import MSDeformAttn

    for m in model.modules():
        if isinstance(m, MSDeformAttn):
            m.impl = "grid_sample"
    return (_Detections(model) if task == "detection" else _Logits(model)).eval()


OUTPUTS = {"segmentation": ["logits"], "detection": ["boxes", "scores", "labels", "masks"]}


def export_model(
    model: nn.Module, fmt: str, path: Path, input_size: Sequence[int], opset: int = 18, task: str = "segmentation"
) -> Path:
    """Export ``model`` (an EncoderDecoder, or a detector with ``task="detection"``) to ``path``; returns it."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    if task == "detection" and fmt == "torchscript":
        raise ValueError(
            "format=torchscript: a traced detector would fix its data-dependent sizes (the number of proposals and "
            "detections) to the example's; export detection to onnx or torch_export"
        )
    if any(int(s) % 32 for s in input_size):
        raise ValueError(f"input_size must be multiples of 32, got {list(input_size)}")
    if fmt == "onnx" and opset < 16:
        raise ValueError(f"ONNX export needs opset >= 16 (GridSample), got {opset}")
    import warnings

    from adapterctl.files import atomic_path

    wrapped = _exportable(model, task)
    example = torch.rand(1, 3, *map(int, input_size)) * 255
    warnings.filterwarnings("ignore", message=".*create_unbacked_symint.*")  # torchvision's nms meta, not ours
    with torch.no_grad(), atomic_path(path) as tmp:
        if fmt == "onnx":
            program = torch.onnx.export(
                wrapped, (example,), dynamo=True, opset_version=opset, input_names=["images"],
                output_names=OUTPUTS[task],
            )  # fmt: skip
            program.save(str(tmp))
        elif fmt == "torch_export":
            torch.export.save(torch.export.export(wrapped, (example,)), str(tmp))
        else:
            torch.jit.save(torch.jit.trace(wrapped, (example,)), str(tmp))
    return path


def run_exported(fmt: str, path: Path, images: Tensor):
    """The exported model's outputs on ``images``: the logits, or the detection tuple."""
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outs = [torch.from_numpy(o) for o in sess.run(None, {sess.get_inputs()[0].name: images.numpy()})]
        return outs[0] if len(outs) == 1 else tuple(outs)
    if fmt == "torch_export":
        return torch.export.load(str(path)).module()(images)
    return torch.jit.load(str(path))(images)


def run_export(overrides: Sequence[str]) -> str:
    """``adapterctl export ckpt=PATH [format=onnx|torch_export|torchscript] [input_size=[H,W]]``."""
    from adapterctl.engine.evaluate import eval_config

    ecfg, model, mcfg, _ = eval_config(
        overrides,
        config_name="export",
        own_keys=("ckpt", "format", "opset", "input_size", "check_parity", "paths", "atol", "box_atol", "image"),
    )
    model.eval()
    fmt = str(ecfg.format)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    ckpt = Path(str(ecfg.ckpt))
    out_dir = Path(ecfg.paths.output_dir) if ecfg.paths.output_dir else ckpt.resolve().parent
    size = [int(s) for s in ecfg.input_size]
    task = str(mcfg.task)
    path = out_dir / f"{ckpt.stem}_{size[0]}x{size[1]}{FORMATS[fmt]}"
    export_model(model, fmt, path, size, int(ecfg.opset), task)
    what = "output logits" if task == "segmentation" else "outputs boxes, scores, labels, masks"
    lines = [f"wrote {path} ({fmt}, input 1x3x{size[0]}x{size[1]} RGB 0-255, {what})"]
    if ecfg.check_parity:
        images = _parity_images(ecfg.get("image"), size)
        with torch.no_grad():
            eager = _exportable(model, task)(images)
            exported = run_exported(fmt, path, images)
        check = _segmentation_parity if task == "segmentation" else _detection_parity
        lines.append(check(eager, exported, ecfg, path))
    return "\n".join(lines)


def _parity_images(image, size: Sequence[int]) -> Tensor:
    """``image=PATH`` resized to ``size`` (bilinear), or a seeded random image: (1, 3, H, W) 0-255."""
    if not image:
        return torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0)) * 255
    from adapterctl.data.images import load_image
    from adapterctl.data.transforms import resize_image

    return resize_image(load_image(Path(str(image))), tuple(size))[None]


def _segmentation_parity(eager: Tensor, exported: Tensor, ecfg, path: Path) -> str:
    diff = float((eager - exported).abs().max())
    agree = float((eager.argmax(1) == exported.argmax(1)).float().mean())
    if diff > float(ecfg.atol):
        raise ValueError(f"exported model differs from eager by {diff:.3e} > atol {ecfg.atol}: {path}")
    return f"parity with eager: max |diff| {diff:.2e}, argmax agreement {100 * agree:.2f}%"


def _detection_parity(eager, exported, ecfg, path: Path) -> str:
    """Same detections (count, labels, order), box and score differences within tolerance, mask pixels stated."""
    (eb, es, el, em), (xb, xs, xl, xm) = eager, exported
    if eb.shape[0] != xb.shape[0] or not torch.equal(el.long(), xl.long()):
        raise ValueError(
            f"exported model finds {xb.shape[0]} detections, eager {eb.shape[0]} (or other labels): {path}"
        )
    n = int(eb.shape[0])
    box = float((eb - xb).abs().max()) if n else 0.0
    score = float((es - xs).abs().max()) if n else 0.0
    pixels = int((em != xm).sum())
    if score > float(ecfg.atol) or box > float(ecfg.box_atol):
        raise ValueError(
            f"exported detections differ from eager: boxes by {box:.3e} px (box_atol {ecfg.box_atol}), scores by "
            f"{score:.3e} (atol {ecfg.atol}): {path}"
        )
    return (
        f"parity with eager: {n} detections, labels identical, max |box diff| {box:.2e} px, max |score diff| "
        f"{score:.2e}, {pixels} of {em.numel()} mask pixels differ"
    )
