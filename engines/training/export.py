"""ONNX export: one self-contained file (opset 17, no external data) with its card."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from ..model_file import ModelCard, write_card_metadata


def export_onnx(net: nn.Module, card: ModelCard, path: Path) -> Path:
    """Export `net` for inputs of any height/width that are multiples of `card.multiple`.

    Uses the TorchScript exporter: its initializer names are the state-dict
    keys, which is what lets the torch runtimes rebuild the network from the
    file alone (`model_file.onnx_weights`).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    net = net.eval().cpu()
    side = 4 * card.multiple
    example: tuple[torch.Tensor, ...] = tuple(torch.rand(1, card.channels, side, side)
                                              for _ in range(card.inputs))
    names = [f"frame{i}" for i in range(card.inputs)] if card.inputs > 1 else ["frame"]
    dynamic = {n: {2: "height", 3: "width"} for n in names}
    if card.task == "interp":  # plus the fractional time of the wanted frame, shape (1,1,1,1)
        example += (torch.full((1, 1, 1, 1), 0.5),)
        names.append("t")
    dynamic["restored"] = {2: "out_height", 3: "out_width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, example, str(path), opset_version=card.opset, input_names=names,
                          output_names=["restored"], dynamic_axes=dynamic,
                          do_constant_folding=False, dynamo=False, external_data=False)
    write_card_metadata(path, card)
    return path
