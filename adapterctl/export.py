"""``adapterctl export``: a checkpoint to ONNX, torch.export (.pt2) or TorchScript, checked against eager.

The exported graph takes one unnormalised RGB image batch (0-255 floats) of the fixed ``input_size`` and
returns the decode logits at that size (``whole`` inference). Spatial shapes are Python ints, so the graph is
static in H and W: resize or pad inputs to ``input_size``. Deformable sampling is exported in its
``grid_sample`` form (ONNX GridSample, opset >= 16); the fused-gather form has no ONNX counterpart.
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


def _exportable(model: nn.Module) -> nn.Module:
    from adapterctl.layers.ms_deform_attn import MSDeformAttn

    for m in model.modules():
        if isinstance(m, MSDeformAttn):
            m.impl = "grid_sample"
    return _Logits(model).eval()


def export_model(model: nn.Module, fmt: str, path: Path, input_size: Sequence[int], opset: int = 17) -> Path:
    """Export ``model`` (an EncoderDecoder) to ``path``; returns the file written."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    if any(int(s) % 32 for s in input_size):
        raise ValueError(f"input_size must be multiples of 32, got {list(input_size)}")
    if fmt == "onnx" and opset < 16:
        raise ValueError(f"ONNX export needs opset >= 16 (GridSample), got {opset}")
    from adapterctl.files import atomic_path

    wrapped = _exportable(model)
    example = torch.rand(1, 3, *map(int, input_size)) * 255
    with torch.no_grad(), atomic_path(path) as tmp:
        if fmt == "onnx":
            program = torch.onnx.export(
                wrapped, (example,), dynamo=True, opset_version=opset, input_names=["images"], output_names=["logits"]
            )
            program.save(str(tmp))
        elif fmt == "torch_export":
            torch.export.save(torch.export.export(wrapped, (example,)), str(tmp))
        else:
            torch.jit.save(torch.jit.trace(wrapped, (example,)), str(tmp))
    return path


def run_exported(fmt: str, path: Path, images: Tensor) -> Tensor:
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: images.numpy()})[0])
    if fmt == "torch_export":
        return torch.export.load(str(path)).module()(images)
    return torch.jit.load(str(path))(images)


def run_export(overrides: Sequence[str]) -> str:
    """``adapterctl export ckpt=PATH [format=onnx|torch_export|torchscript] [input_size=[H,W]]``."""
    from adapterctl.engine.evaluate import eval_config

    ecfg, model, mcfg, _ = eval_config(
        overrides,
        config_name="export",
        own_keys=("ckpt", "format", "opset", "input_size", "check_parity", "paths", "atol"),
    )
    if mcfg.task != "segmentation":
        raise ValueError(f"{ecfg.ckpt}: export handles segmentation checkpoints; this one is {mcfg.task}")
    model.eval()
    fmt = str(ecfg.format)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    ckpt = Path(str(ecfg.ckpt))
    out_dir = Path(ecfg.paths.output_dir) if ecfg.paths.output_dir else ckpt.resolve().parent
    size = [int(s) for s in ecfg.input_size]
    path = out_dir / f"{ckpt.stem}_{size[0]}x{size[1]}{FORMATS[fmt]}"
    export_model(model, fmt, path, size, int(ecfg.opset))
    lines = [f"wrote {path} ({fmt}, input 1x3x{size[0]}x{size[1]} RGB 0-255, output logits)"]
    if ecfg.check_parity:
        images = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0)) * 255
        with torch.no_grad():
            eager = _exportable(model)(images)
            exported = run_exported(fmt, path, images)
        diff = float((eager - exported).abs().max())
        agree = float((eager.argmax(1) == exported.argmax(1)).float().mean())
        lines.append(f"parity with eager: max |diff| {diff:.2e}, argmax agreement {100 * agree:.2f}%")
        if diff > float(ecfg.atol):
            raise ValueError(f"exported model differs from eager by {diff:.3e} > atol {ecfg.atol}: {path}")
    return "\n".join(lines)
