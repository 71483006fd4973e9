"""Save and rebuild a structurally pruned model (Torch-Pruning issue #436: plain load_state_dict fails).

After pruning, every Conv/BN/Linear/LayerNorm has fewer channels than the class's constructor makes,
so ``timm.create_model(arch).load_state_dict(sd)`` fails on shape mismatches. We store, beside the
weights, the *shape facts* of every module (``in_channels``, ``num_features``, ``normalized_shape``...)
and the shape of every parameter/buffer; rebuilding = create the original architecture, shrink each
tensor and attribute to the stored values, then a strict ``load_state_dict``.

Unlike ``torch_pruning.state_dict`` (which pickles every module's ``__dict__`` and so needs
``weights_only=False``), the file holds only tensors, strings and numbers: it loads with
``torch.load(weights_only=True)``.

Example:
    >>> save_pruned(model, "pruned.pth", arch="resnet18", num_classes=10)
    >>> model2 = load_pruned("pruned.pth")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .errors import CheckpointError

FORMAT = "deploykit.pruned/1"
# Module attributes that describe channel counts; anything else about a module is set by its constructor.
SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "num_features", "in_features", "out_features",
               "normalized_shape", "num_channels", "num_groups", "embed_dim", "head_hidden_size",
               "num_heads", "head_dim", "attn_dim", "kdim", "vdim")
FLOAT_ATTRS = ("scale",)  # attention scale: 1/sqrt(head_dim) of the pruned heads


def module_shapes(model) -> dict[str, dict]:
    """Per module: its channel-count attributes and the shape of each of its own parameters/buffers."""
    out: dict[str, dict] = {}
    for name, mod in model.named_modules():
        attrs = {}
        for a in SHAPE_ATTRS:
            v = mod.__dict__.get(a)
            if isinstance(v, bool) or v is None:
                continue
            if isinstance(v, int) or (isinstance(v, (tuple, list)) and all(isinstance(i, int) for i in v)):
                attrs[a] = list(v) if isinstance(v, (tuple, list)) else v
        for a in FLOAT_ATTRS:
            v = mod.__dict__.get(a)
            if isinstance(v, float) and attrs:
                attrs[a] = v
        tensors = {k: list(t.shape) for k, t in list(mod._parameters.items()) + list(mod._buffers.items())
                   if t is not None}
        if attrs or tensors:
            out[name] = {"attrs": attrs, "tensors": tensors}
    return out


def timm_arch(model) -> str | None:
    """The timm architecture name a model was created as, if timm says so."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return cfg.get("architecture")


def save_pruned(model, path: str | Path, *, arch: str | None = None, num_classes: int | None = None,
                in_chans: int | None = None, model_kwargs: dict | None = None, extra: dict | None = None) -> Path:
    """Write weights + shape facts atomically; ``arch`` defaults to the model's timm architecture."""
    arch = arch or timm_arch(model)
    if arch is None:
        raise CheckpointError("cannot tell which architecture this pruned model was built from",
                              fix="pass arch= (a timm model name) or a builder to load_pruned")
    path = Path(path)
    payload: dict[str, Any] = {
        "format": FORMAT, "arch": arch,
        "num_classes": int(num_classes if num_classes is not None else getattr(model, "num_classes", 0) or 0),
        "in_chans": int(in_chans if in_chans is not None else _first_conv_in(model)),
        "model_kwargs": dict(model_kwargs or {}),
        "shapes": module_shapes(model),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "extra": dict(extra or {}),
    }
    from .checkpoint import atomic_torch_save

    return atomic_torch_save(payload, path)


def _first_conv_in(model) -> int:
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            return m.in_channels
    return 3


def apply_shapes(model, shapes: dict[str, dict]):
    """Shrink ``model``'s tensors and channel attributes in place to the recorded pruned shapes."""
    import torch

    modules = dict(model.named_modules())
    missing = [n for n in shapes if n not in modules]
    if missing:
        raise CheckpointError(f"pruned file names modules the architecture lacks: {missing[:3]}",
                              fix="rebuild with the same arch and model_kwargs the model was pruned from")
    for name, spec in shapes.items():
        mod = modules[name]
        for a, v in spec["attrs"].items():
            setattr(mod, a, tuple(v) if isinstance(v, list) else v)
        for key, shape in spec["tensors"].items():
            old = mod._parameters.get(key) if key in mod._parameters else mod._buffers.get(key)
            if old is None or list(old.shape) == shape:
                continue
            new = torch.zeros(shape, dtype=old.dtype)
            if key in mod._parameters:
                mod._parameters[key] = torch.nn.Parameter(new, requires_grad=old.requires_grad)
            else:
                mod._buffers[key] = new
    return model


def load_pruned(path: str | Path, builder: Callable[..., Any] | None = None):
    """Rebuild a model saved by ``save_pruned``; ``builder(num_classes=, in_chans=, **kwargs)`` for non-timm."""
    import torch

    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"pruned model {path} not found", fix="check the path") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a deploykit pruned-model file",
                              fix="save it with deploykit.pruned_io.save_pruned")
    kw = dict(payload["model_kwargs"])
    if builder is None:
        import timm

        model = timm.create_model(payload["arch"], pretrained=False, num_classes=payload["num_classes"],
                                  in_chans=payload["in_chans"], **kw)
    else:
        model = builder(num_classes=payload["num_classes"], in_chans=payload["in_chans"], **kw)
    apply_shapes(model, payload["shapes"])
    model.load_state_dict(payload["state_dict"], strict=True)
    return model.eval()
