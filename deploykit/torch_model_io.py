"""Save and rebuild the compressed float torch model (fused, pruned, distilled): what the torch-cuda runtime runs.

A fused model no longer matches its class: each folded BatchNorm became an ``Identity`` (or its activation, for
timm's BatchNormAct2d) and its conv gained a bias; a pruned one has fewer channels too. So beside the weights we
store what ``deploykit.pruned_io`` stores for pruned models (the timm architecture, its kwargs, every module's
channel attributes and tensor shapes) plus the type of every module. Rebuilding = create the architecture, shrink
it to the recorded shapes, replace each BatchNorm the file says was folded, give convs the biases the file holds,
then a strict ``load_state_dict``. The file holds tensors, strings and numbers only: it loads with
``torch.load(weights_only=True)``, and a state dict outlives torch versions better than a ``torch.export`` program
(docs/decisions.md).

Example:
    >>> save_torch_model(fused_model, "model.torch.pth", in_chans=1, input_size=(1, 28, 28))
    >>> model = load_torch_model("model.torch.pth")   # fp32, eval mode, on the CPU
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import CheckpointError

FORMAT = "deploykit.torch-model/1"
TORCH_MODEL = "model.torch.pth"  # its name inside an artifact


def save_torch_model(model, path: str | Path, *, in_chans: int, input_size: tuple[int, ...],
                     arch: str | None = None, num_classes: int | None = None, model_kwargs: dict | None = None,
                     extra: dict | None = None) -> Path:
    """Write ``model``'s weights and rebuild facts atomically; ``arch`` defaults to the model's timm architecture."""
    from .checkpoint import atomic_torch_save
    from .pruned_io import module_shapes, timm_arch

    arch = arch or timm_arch(model)
    if arch is None:
        raise CheckpointError(f"cannot tell which timm architecture this {type(model).__name__} was built from, so "
                              "the torch runtime could not rebuild it",
                              fix="use a timm model, or ship the ONNX model (recipe fp16) with onnxruntime-cuda")
    payload: dict[str, Any] = {
        "format": FORMAT, "arch": arch,
        "num_classes": int(num_classes if num_classes is not None else getattr(model, "num_classes", 0) or 0),
        "in_chans": int(in_chans), "input_size": [int(v) for v in input_size],
        "model_kwargs": dict(model_kwargs or {}),
        "shapes": module_shapes(model),
        "module_types": {name: type(m).__name__ for name, m in model.named_modules() if name},
        "state_dict": {k: v.detach().cpu().clone().float() if v.is_floating_point() else v.detach().cpu().clone()
                       for k, v in model.state_dict().items()},
        "extra": dict(extra or {}),
    }
    return atomic_torch_save(payload, Path(path))


def read_header(path: str | Path) -> dict:
    """The file's rebuild facts without its weights (arch, classes, input size, extra)."""
    payload = _load_payload(Path(path))
    return {k: v for k, v in payload.items() if k not in ("state_dict", "shapes", "module_types")}


def _load_payload(path: Path) -> dict:
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"torch model {path} not found", fix="check the path, or re-run `deploykit compress "
                                                                   "--target gpu`") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a deploykit torch-model file (format {FORMAT})",
                              fix="write it with deploykit.torch_model_io.save_torch_model (the export_torch stage)")
    return payload


def _folded_batchnorm_replacement(bn):
    """What fuse_bn leaves where it folded ``bn``: its activation (timm BatchNormAct2d) or an Identity."""
    import torch

    tail = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None))
            if m is not None and not isinstance(m, torch.nn.Identity)]
    return torch.nn.Sequential(*tail) if tail else torch.nn.Identity()


def load_torch_model(path: str | Path):
    """Rebuild a model written by ``save_torch_model``: fp32, eval mode, on the CPU."""
    import timm
    import torch

    from .pruned_io import apply_shapes

    path = Path(path)
    payload = _load_payload(path)
    model = timm.create_model(payload["arch"], pretrained=False, num_classes=payload["num_classes"],
                              in_chans=payload["in_chans"], **payload["model_kwargs"])
    types = payload["module_types"]
    modules = dict(model.named_modules())
    for name, mod in modules.items():  # BatchNorms that fuse_bn folded into their conv
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and types.get(name) in ("Identity", "Sequential"):
            new = _folded_batchnorm_replacement(mod)
            if type(new).__name__ != types[name]:
                raise CheckpointError(f"{path}: module {name} was a {types[name]} when saved, the rebuilt "
                                      f"{payload['arch']} gives a {type(new).__name__}",
                                      fix="rebuild with the timm version the artifact was written with")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
    modules = dict(model.named_modules())
    missing = [n for n in payload["shapes"] if n not in modules]
    if missing:
        raise CheckpointError(f"{path} names modules a rebuilt {payload['arch']} lacks: {missing[:3]}",
                              fix="rebuild with the arch, model_kwargs and timm version the file was written with")
    apply_shapes(model, payload["shapes"])
    for name, spec in payload["shapes"].items():  # a folded conv gained a bias its constructor did not make
        mod = model.get_submodule(name)
        for key, shape in spec["tensors"].items():
            if key in mod._parameters and mod._parameters[key] is None:
                mod._parameters[key] = torch.nn.Parameter(torch.zeros(shape), requires_grad=False)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not fit a rebuilt {payload['arch']}: {' '.join(str(err).split())[:300]}",
                              fix="rebuild with the timm version the artifact was written with") from None
    return model.eval()
