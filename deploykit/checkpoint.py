"""Read a classifier checkpoint (timm train.py, state_dict, safetensors) into a ready float model.

Everything the file already says (architecture, classes, channels, preprocessing) is taken from it;
the caller's arguments fill the gaps or override. Every failure is a one-line ``CheckpointError``.

Example:
    >>> loaded = load_checkpoint("models/resnet10t_fmnist.pth")
    >>> loaded.arch, loaded.weights, loaded.num_classes
    ('resnet10t', 'state_dict_ema', 10)
    >>> loaded.num_classes
    (1, 28, 28)
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError

if TYPE_CHECKING:
    import torch

    from .recipe import ModelConfig

# torch.compile wraps the model in `_orig_mod`, DDP/DataParallel (and timm's ModelEma) in `module`.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Hub ids ("timm/resnet50.a1_in1k") name the same architecture; "hf-hub:" would make timm fetch a config.
_HUB_PREFIXES = ("hf-hub:timm/", "hf-hub:", "timm/")
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")  # what Preprocessing implements
_FIX_SHAPES = "pass the right --arch/--num-classes/--in-chans (or model_kwargs) for this checkpoint"
_FIX_RESAVE = "re-download or re-save the checkpoint (torch.save(model.state_dict(), path))"


@dataclass
class LoadedModel:
    """A float32 CPU model in eval mode plus what the checkpoint said about it."""

    model: "torch.nn.Module"
    arch: str
    num_classes: int
    in_chans: int
    weights: str
    hints: dict = field(default_factory=dict)
    class_names: list[str] | None = None
    model_kwargs: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    sha256: str = ""
    # the file's other weight set when it holds two (EMA chosen, model weights beside it): (kind, state_dict)
    alternative: tuple[str, dict] | None = None


def load_checkpoint(path: str | Path | None, *, arch: str | None = None, num_classes: int | None = None,
                    in_chans: int | None = None, model_kwargs: dict | None = None,
                    trust_pickle: bool = False, weights: str | None = None,
                    input_size: tuple[int, int] | None = None, model: "torch.nn.Module | None" = None,
                    model_name: str | None = None) -> LoadedModel:
    """Load a checkpoint file into a timm model; the arguments only fill in what the file lacks.

    Args:
        arch: timm architecture; needed only when the file does not name one (wins if both do).
        num_classes, in_chans: override the file's args; otherwise inferred from the weight shapes.
        model_kwargs: extra ``timm.create_model`` kwargs; default is the file's ``args.model_kwargs``.
        trust_pickle: allow arbitrary unpickling (``weights_only=False``): only for files you trust.
        weights: which weights of a file holding several: "ema", "model" or "swa"; None = EMA when present.
        input_size: (height, width) the model runs at, when the file does not say; models whose shape depends on
            it (ViT position embeddings, Swin windows) are built for it.
        model: a module built by the caller (a user's own class, see deploykit.factory): the file's weights are
            loaded into it instead of into a timm model; with ``path`` None it is used as it is.
        model_name: what to call ``model`` in messages and the manifest (its class name by default).

    Example:
        >>> load_checkpoint("weights.safetensors", arch="resnet10t").num_classes
        10
    """
    if path is None:
        if model is None:
            raise CheckpointError("no checkpoint and no model given", fix="pass a checkpoint file, or --model")
        return _from_module(model, {}, model_name or type(model).__name__, "", [], arch=None, num_classes=num_classes,
                            in_chans=in_chans, weights="the model's own weights (no checkpoint)")
    path = Path(path)
    name = f"checkpoint '{path}'"
    _check_file(path, name)
    sha256 = _sha256(path)
    notes: list[str] = []

    if _sniff(path, name) == "safetensors":
        state, meta = _load_safetensors(path, name)
        if weights not in (None, "model"):
            raise CheckpointError(f"{name} is a safetensors file: it holds one set of weights, not {weights!r} ones",
                                  fix="drop --weights, or give the checkpoint that holds those weights")
        chosen, args = "safetensors", None
    else:
        obj = _torch_load(path, name, trust_pickle)
        if trust_pickle:
            notes.append("loaded with weights_only=False (--trust-pickle)")
        module = _find_module(obj)
        if module is not None and model is None:
            meta = obj if isinstance(obj, Mapping) else {}
            return _from_module(module, meta, name, sha256, notes, arch=arch, num_classes=num_classes,
                                in_chans=in_chans)
        state, chosen = _pick_state_dict(obj, name, notes, weights)
        # timm train.py stores `args`; PyTorch Lightning stores `hyper_parameters` (a dict of the same kind)
        meta, args = obj, obj.get("args") or obj.get("hyper_parameters")

    state = _strip_wrapper_prefixes(state, notes)
    _check_finite(state, name)
    if model is not None:  # the user's own module: the file only brings weights (and preprocessing hints)
        label = model_name or type(model).__name__
        state = _strip_owner_prefix(state, model.state_dict(), notes)
        _load_weights(model, state, name, label, None, None, {}, notes)
        loaded = _from_module(model, meta, name, sha256, notes, arch=None, num_classes=num_classes,
                              in_chans=in_chans, weights=chosen, found_arch=label)
        loaded.hints = _hints(args, loaded.in_chans, notes)
        return loaded

    arch = _resolve_arch(arch, meta, args, name, notes)
    kwargs = dict(model_kwargs if model_kwargs is not None else (_arg(args, "model_kwargs") or {}))
    # create_model takes these two as its own arguments; a copy inside model_kwargs would clash.
    kw_classes, kw_chans = kwargs.pop("num_classes", None), kwargs.pop("in_chans", None)
    num_classes = num_classes or kw_classes or _arg(args, "num_classes")
    in_chans = in_chans or kw_chans or _arg(args, "in_chans") or (_arg(args, "input_size") or [None])[0]
    if num_classes is None or in_chans is None:
        num_classes, in_chans = _infer_shapes(arch, kwargs, state, num_classes, in_chans, notes)
    size = tuple(input_size) if input_size else _hint_size(args)
    if size and "img_size" not in kwargs and _builds_for_size(arch, kwargs, size):
        kwargs["img_size"] = size
        notes.append(f"{arch} built for input {size[0]}x{size[1]} (img_size)")

    model = _build(arch, num_classes, in_chans, kwargs, name)
    state = _strip_owner_prefix(state, model.state_dict(), notes)
    _load_weights(model, state, name, arch, num_classes, in_chans, kwargs, notes)
    alternative = _alternative_weights(obj if chosen != "safetensors" else {}, chosen, model.state_dict())
    num_classes = getattr(model, "num_classes", None) or num_classes
    in_chans = in_chans or _first_conv_channels(model) or 3
    return LoadedModel(model=model.float().eval(), arch=arch, num_classes=int(num_classes), in_chans=int(in_chans),
                       weights=chosen, hints=_hints(args, int(in_chans), notes),
                       class_names=_class_names(meta), model_kwargs=kwargs, notes=notes, sha256=sha256,
                       alternative=alternative)


def _alternative_weights(obj: Any, chosen: str, expected: Mapping) -> tuple[str, dict] | None:
    """The model weights beside chosen EMA weights, when they fit the same model (for a sanity check)."""
    if not isinstance(obj, Mapping) or chosen not in _WEIGHT_KEYS["ema"]:
        return None
    key = next((k for k in _WEIGHT_KEYS["model"] if _is_state_dict(obj.get(k))), None)
    if key is None:
        return None
    state = _strip_wrapper_prefixes(dict(obj[key]), [])
    fits = set(state) <= set(expected) and all(state[k].shape == expected[k].shape for k in state)
    return ("model", state) if fits else None


def load_model(checkpoint: str | Path | None, mc: "ModelConfig", model: "torch.nn.Module | None" = None) -> LoadedModel:
    """What a recipe's ``model`` section says to load: a timm architecture, the user's factory (``mc.factory``) or
    the given module, with the checkpoint's weights. compress and bench both load through here."""
    label = None
    if model is None and mc.factory:
        from .factory import build_from_factory

        model, label = build_from_factory(mc.factory, mc.kwargs), mc.factory
    return load_checkpoint(checkpoint, arch=mc.arch, num_classes=mc.num_classes, in_chans=mc.in_chans,
                           trust_pickle=mc.trust_pickle, weights=mc.weights, input_size=mc.input_size,
                           model=model, model_name=label)


def save_timm_checkpoint(path: str | Path, *, arch: str, state_dict: Any, args: dict,
                         state_dict_ema: Any = None, class_names: list[str] | None = None,
                         extra: dict | None = None) -> None:
    """Write a checkpoint in timm ``train.py``'s format, atomically (temp file + rename).

    ``args`` becomes the ``argparse.Namespace`` train.py stores; state dicts may be given as modules.

    Example:
        >>> save_timm_checkpoint("m.pth", arch="resnet10t", state_dict=model.state_dict(),
        ...                      args={"num_classes": 10, "in_chans": 1, "input_size": (1, 28, 28)})
    """
    path = Path(path)
    for key, value in args.items():
        _check_plain(value, f"args[{key!r}]")
    if args.get("model", arch) != arch:
        raise CheckpointError(f"args['model']={args['model']!r} disagrees with arch={arch!r}",
                              fix="drop 'model' from args or make it equal to arch")
    defaults = dict.fromkeys(("num_classes", "in_chans", "input_size", "img_size", "mean", "std", "interpolation",
                              "crop_pct"), None)
    namespace = argparse.Namespace(**{**defaults, "model_kwargs": {}, **args, "model": arch})
    state: dict[str, Any] = {"arch": arch, "args": namespace, "state_dict": _tensors_only(state_dict), "version": 2}
    if state_dict_ema is not None:
        state["state_dict_ema"] = _tensors_only(state_dict_ema)
    if class_names is not None:
        state["class_names"] = [str(c) for c in class_names]
    clash = set(extra or {}) & set(state)
    if clash:
        raise CheckpointError(f"extra keys {sorted(clash)} would overwrite the checkpoint's own",
                              fix="rename those keys in extra")
    state.update(extra or {})

    atomic_torch_save(state, path)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temp file in the same directory, fsync, then rename over ``path``.

    Same directory, so os.replace is an atomic rename: readers see the old file or the whole new one, and a
    crash mid-write leaves no half file. Files are 0644 (mkstemp's 0600 would hide them from a serving user).

    Example:
        >>> atomic_torch_save({"state_dict": model.state_dict()}, "ckpt.pth")
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --- reading the file ------------------------------------------------------------------------------------------


def _check_file(path: Path, name: str) -> None:
    if not path.exists():
        raise CheckpointError(f"{name} not found", fix="check the path (relative paths start at the current directory)")
    if path.is_dir():
        raise CheckpointError(f"{name} is a directory, not a file", fix="give the .pth/.pt/.safetensors file inside it")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{name} is empty (0 bytes)", fix="the save or download was interrupted: "
                              + _FIX_RESAVE)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# Leading bytes of files that get renamed or downloaded into a .pth by mistake.
_NOT_CHECKPOINTS = (
    (b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"), (b"\x1f\x8b", "gzip data (extract it first)"),
    (b"version https://git-lfs", "a Git LFS pointer, not the weights (run `git lfs pull`)"),
)


def _sniff(path: Path, name: str) -> str:
    """'torch' (zip or legacy pickle) or 'safetensors', judged by content since names lie."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch.save zip / pickle protocol >= 2
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":
        header_len = int.from_bytes(head[:8], "little")
        if 8 + header_len > size:
            raise CheckpointError(f"{name} is truncated or corrupt (safetensors header says {header_len} bytes, "
                                  f"file has {size})", fix=_FIX_RESAVE)
        return "safetensors"
    if path.suffix == ".safetensors" and size < 9:
        raise CheckpointError(f"{name} is truncated or corrupt ({size} bytes)", fix=_FIX_RESAVE)
    what = next((desc for magic, desc in _NOT_CHECKPOINTS if head.startswith(magic)), None)
    if what is None:
        text = head.lstrip().lower()
        if text.startswith((b"<!doctype html", b"<html")):
            what = "an HTML page (a failed download?)"
        elif _looks_like_text(head):
            what = "a text file"
        else:
            what = f"unrecognised data (starts with {head[:8].hex(' ')})"
    raise CheckpointError(f"{name} is not a PyTorch checkpoint: it looks like {what}",
                          fix="give a file written by torch.save (.pth/.pt/.bin) or a .safetensors file")


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:  # not just a multi-byte character cut by our 64-byte read
            return False
        text = head[:err.start].decode("utf-8")
    return all(c.isprintable() or c in "\t\r\n" for c in text)


def _load_safetensors(path: Path, name: str) -> tuple[dict, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as err:  # SafetensorError is not importable under a stable name across versions
        raise CheckpointError(f"{name} is truncated or corrupt ({_one_line(err)})", fix=_FIX_RESAVE) from None
    if not state:
        raise CheckpointError(f"{name} holds no state dict (the safetensors file has no tensors)", fix=_FIX_RESAVE)
    return state, meta


def _torch_load(path: Path, name: str, trust_pickle: bool) -> Any:
    import pickle

    import torch

    try:
        if trust_pickle:
            return torch.load(path, map_location="cpu", weights_only=False)
        # timm train.py stores its args as a Namespace; nothing else beyond tensors/containers is allowed.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        culprit = _unsafe_global(err, path)
        if culprit:
            raise CheckpointError(
                f"{name} pickles Python objects ({culprit}), and unpickling them can execute arbitrary code",
                fix="pass --trust-pickle only for a file you trust, or re-save it as a state_dict "
                    "(torch.save(model.state_dict(), path))") from None
        raise CheckpointError(f"{name} is truncated or corrupt (torch: {_torch_reason(err)})",
                              fix=_FIX_RESAVE) from None
    except (ImportError, AttributeError) as err:  # only reachable with trust_pickle
        raise CheckpointError(f"{name} needs Python code that is not importable here ({_one_line(err)})",
                              fix="install/import the package that defines the model, or re-save the checkpoint "
                                  "as a state_dict") from None
    except (RuntimeError, EOFError, ValueError, OSError, MemoryError, OverflowError) as err:
        reason = _torch_reason(err)
        # Seen on cut files: "PytorchStreamReader failed reading zip archive: failed finding central
        # directory" (zip), "unexpected EOF, expected N more bytes" / "Ran out of input" (legacy pickle).
        if re.search(r"PytorchStreamReader|central directory|EOF|Ran out of input|corrupt", reason) \
                or isinstance(err, EOFError):
            raise CheckpointError(f"{name} is truncated or corrupt (torch: {reason})", fix=_FIX_RESAVE) from None
        raise CheckpointError(f"{name} is not a PyTorch checkpoint (torch: {reason})",
                              fix="give a file written by torch.save (.pth/.pt/.bin) or a .safetensors file") from None


def _unsafe_global(err: Exception, path: Path) -> str | None:
    """The class the weights-only unpickler refused, e.g. 'timm.models.resnet.ResNet'."""
    import torch

    found = re.search(r"GLOBAL ([\w.]+) was not an allowed global", str(err))
    if found:
        return found.group(1)
    if "Unsupported global" not in str(err):
        return None
    try:
        names = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
                 if g != "argparse.Namespace"]
    except Exception:  # legacy (non-zip) files cannot be scanned
        names = []
    return ", ".join(names[:3]) if names else "a non-tensor object"


def _torch_reason(err: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # torch colours part of its message
    text = re.sub(r"\s*This is an internal miniz error.*", "", text, flags=re.S)
    return _one_line(text)[:200] or type(err).__name__


def _one_line(err: Any) -> str:
    return " ".join(str(err).split()).rstrip(".")


# --- choosing the weights ------------------------------------------------------------------------------------------


def _is_state_dict(value: Any) -> bool:
    import torch

    return isinstance(value, Mapping) and len(value) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _find_module(obj: Any):
    import torch

    if isinstance(obj, torch.nn.Module):
        return obj
    if isinstance(obj, Mapping):  # e.g. {"model": <nn.Module>, "epoch": 3} from a trusted file
        for key in ("model_ema", "model"):
            if isinstance(obj.get(key), torch.nn.Module):
                return obj[key]
    return None


# Where each kind of weights lives: timm train.py / CheckpointSaver, plain torch.save dicts, SWA scripts.
_WEIGHT_KEYS = {
    "ema": ("state_dict_ema", "model_ema", "ema_state_dict", "state_dict_ema_fp32"),
    "model": ("state_dict", "model", "model_state_dict", "net"),
    "swa": ("state_dict_swa", "swa_state_dict", "swa_model"),
}


def _pick_state_dict(obj: Any, name: str, notes: list[str], weights: str | None = None) -> tuple[dict, str]:
    """The state dict to load: ``weights`` ("ema", "model", "swa") if given, else EMA, then model, then the root."""
    fix = "save model.state_dict() (or a dict with a 'state_dict' key) with torch.save"
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{name} holds no state dict: it holds a {type(obj).__name__}", fix=fix)
    found = {kind: next((k for k in keys if _is_state_dict(obj.get(k))), None) for kind, keys in _WEIGHT_KEYS.items()}
    if weights is not None:
        if weights not in _WEIGHT_KEYS:
            raise CheckpointError(f"--weights {weights!r} is not one of {', '.join(_WEIGHT_KEYS)}",
                                  fix=f"pass --weights {' or '.join(_WEIGHT_KEYS)}")
        if found[weights] is None and not (weights == "model" and _is_state_dict(obj)):
            have = [k for k, v in found.items() if v] or (["model (the file's root)"] if _is_state_dict(obj) else [])
            raise CheckpointError(f"{name} has no {weights} weights (it has: {', '.join(have) or 'none'})",
                                  fix=f"pass --weights {have[0].split()[0]}" if have else fix)
        key = found[weights]
        notes.append(f"using {weights} weights ({key or 'the file root'}) as asked")
        return (dict(obj[key]), key) if key else (dict(obj), "state_dict (root)")
    if found["ema"]:
        others = [k for k in ("model", "swa") if found[k]]
        notes.append(f"using EMA weights ({found['ema']})"
                     + (f"; --weights {others[0]} uses the {others[0]} weights" if others else ""))
        return dict(obj[found["ema"]]), found["ema"]
    for kind in ("model", "swa"):
        if found[kind]:
            return dict(obj[found[kind]]), found[kind]
    if _is_state_dict(obj):
        return dict(obj), "state_dict (root)"
    keys = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
    raise CheckpointError(f"{name} holds no state dict (top-level keys: {keys}; no dict of tensors among them)",
                          fix=fix)


def _strip_wrapper_prefixes(state: dict, notes: list[str]) -> dict:
    if "n_averaged" in state and getattr(state["n_averaged"], "numel", lambda: 0)() == 1:
        # torch.optim.swa_utils.AveragedModel: the averaged module under `module.`, plus its counter
        n = int(state.pop("n_averaged"))
        notes.append(f"SWA AveragedModel weights ({n} models averaged); BatchNorm statistics are used as saved "
                     "(run torch.optim.swa_utils.update_bn before saving if you have not)")
    stripped = True
    while stripped:  # compile + DDP can nest: "module._orig_mod.conv1.weight"
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                notes.append(f"stripped '{prefix}' prefix from {len(state)} keys")
                stripped = True
    return state


def _strip_owner_prefix(state: dict, expected: Mapping, notes: list[str]) -> dict:
    """Weights saved from a module that *holds* the model (a Lightning module's ``self.model``, a wrapper's
    ``self.net``) carry that attribute's name in every key: when one such prefix makes the keys fit, use it."""
    if not state or any(k in expected for k in state):
        return state
    wanted = {k for k in expected if not k.endswith(".num_batches_tracked")}
    for prefix in sorted({k.split(".", 1)[0] + "." for k in state if "." in k}):
        inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if wanted <= set(inner) <= set(expected):
            dropped = len(state) - len(inner)
            notes.append(f"using the weights under '{prefix}' ({len(inner)} keys)"
                         + (f"; dropped {dropped} other keys (losses, teachers, metrics)" if dropped else ""))
            return inner
    return state


def _check_finite(state: Mapping, name: str) -> None:
    import torch

    bad = []
    for key, tensor in state.items():
        if tensor.is_floating_point() or tensor.is_complex():
            count = int((~torch.isfinite(tensor)).sum())
            if count:
                bad.append((key, count))
    if bad:
        key, count = bad[0]
        more = f" (and {len(bad) - 1} more tensor{'s' if len(bad) > 2 else ''})" if len(bad) > 1 else ""
        raise CheckpointError(f"{name} has non-finite weights: {count} NaN/Inf values in '{key}'{more}",
                              fix="training diverged or the file is damaged: use an earlier checkpoint")


# --- architecture and model ----------------------------------------------------------------------------------------


def _arg(args: Any, key: str) -> Any:
    """A field of train.py's args, stored as an argparse.Namespace (or a plain dict by other scripts)."""
    if isinstance(args, Mapping):
        return args.get(key)
    return getattr(args, key, None)


def _resolve_arch(arch: str | None, meta: Mapping, args: Any, name: str, notes: list[str]) -> str:
    import timm

    # timm: meta["arch"] / args.model; Lightning hyper_parameters often say arch or model_name
    file_arch = meta.get("arch") or _arg(args, "model") or _arg(args, "arch") or _arg(args, "model_name")
    file_arch = file_arch if isinstance(file_arch, str) and file_arch else None
    if arch and file_arch and arch != file_arch:
        notes.append(f"--arch {arch} overrides the file's arch '{file_arch}'")
    chosen = arch or file_arch
    if not chosen:
        raise CheckpointError(f"{name} does not name its architecture",
                              fix="pass --arch with the timm model name, e.g. --arch resnet50")
    for prefix in _HUB_PREFIXES:
        if chosen.startswith(prefix):
            notes.append(f"arch '{chosen}' read as '{chosen[len(prefix):]}'")
            chosen = chosen[len(prefix):]
            break
    if not timm.is_model(chosen):
        source = "--arch" if arch else "the file"
        close = difflib.get_close_matches(chosen.split(".")[0], timm.list_models(), n=5, cutoff=0.6)
        hint = f"close matches: {', '.join(close)}" if close else "list them with timm.list_models('*name*')"
        raise CheckpointError(f"unknown architecture '{chosen}' (from {source}) in timm {timm.__version__}",
                              fix=f"pass --arch with a timm model name ({hint})")
    return chosen


def _infer_shapes(arch: str, kwargs: dict, state: Mapping, num_classes: int | None, in_chans: int | None,
                  notes: list[str]) -> tuple[int | None, int | None]:
    """Read num_classes / in_chans off the classifier and first conv that timm's pretrained_cfg names."""
    cfg = _pretrained_cfg(arch, kwargs)
    classifier, first_conv = cfg.get("classifier"), cfg.get("first_conv")
    # Distilled models list two heads ("head", "head_dist"); both have num_classes outputs.
    classifier = classifier[0] if isinstance(classifier, (list, tuple)) else classifier
    first_conv = first_conv[0] if isinstance(first_conv, (list, tuple)) else first_conv
    weight = _find_weight(state, classifier)
    if num_classes is None and weight is not None and weight.ndim >= 2:
        num_classes = int(weight.shape[0])
        notes.append(f"num_classes={num_classes} inferred from {classifier}.weight")
    weight = _find_weight(state, first_conv)
    if in_chans is None and weight is not None and weight.ndim >= 2:
        in_chans = int(weight.shape[1])
        notes.append(f"in_chans={in_chans} inferred from {first_conv}.weight")
    return num_classes, in_chans


def _find_weight(state: Mapping, layer: str | None):
    """``layer.weight``, also under one owner prefix (``model.layer.weight`` in a Lightning file)."""
    if not layer:
        return None
    if f"{layer}.weight" in state:
        return state[f"{layer}.weight"]
    found = [k for k in state if k.endswith(f".{layer}.weight") and k.count(".") == layer.count(".") + 2]
    return state[found[0]] if len(found) == 1 else None


def _pretrained_cfg(arch: str, kwargs: dict) -> dict:
    import timm
    import torch

    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is not None:
        return cfg.to_dict()
    try:
        # No registered cfg: build once with defaults to read it; on "meta" so no weights are allocated.
        with torch.device("meta"):
            return dict(timm.create_model(arch, pretrained=False, **kwargs).pretrained_cfg or {})
    except Exception:
        return {}


def _hint_size(args: Any) -> tuple[int, int] | None:
    """(H, W) from train.py's args.input_size (C, H, W) or args.img_size."""
    input_size, img_size = _arg(args, "input_size"), _arg(args, "img_size")
    if input_size and len(input_size) == 3:
        return int(input_size[1]), int(input_size[2])
    if img_size:
        return (int(img_size),) * 2 if isinstance(img_size, int) else tuple(int(v) for v in img_size)[-2:]
    return None


def _builds_for_size(arch: str, kwargs: dict, size: tuple[int, int]) -> bool:
    """Whether ``arch`` takes ``img_size`` (its weights' shapes depend on the input: ViT, DeiT, Swin, ...) and
    ``size`` differs from its default. CNNs refuse the keyword (TypeError) and run at any size as they are."""
    import timm
    import torch

    default = tuple((_pretrained_cfg(arch, kwargs).get("input_size") or (3, 224, 224))[-2:])
    if tuple(size) == default:
        return False
    try:
        with torch.device("meta"):
            timm.create_model(arch, pretrained=False, img_size=tuple(size), **kwargs)
    except TypeError:
        return False
    except Exception:  # e.g. a window size that does not divide: the build below reports it with the file's name
        return True
    return True


def _build(arch: str, num_classes: int | None, in_chans: int | None, kwargs: dict, name: str):
    import timm

    shape_kwargs = {k: v for k, v in (("num_classes", num_classes), ("in_chans", in_chans)) if v is not None}
    try:
        return timm.create_model(arch, pretrained=False, **shape_kwargs, **kwargs)
    except Exception as err:
        raise CheckpointError(f"could not build {_describe(arch, num_classes, in_chans, kwargs)} for {name}: "
                              f"{type(err).__name__}: {_one_line(err)}",
                              fix="check --arch and the model_kwargs (args.model_kwargs in the file)") from None


def _describe(arch: str, num_classes: int | None, in_chans: int | None, kwargs: dict) -> str:
    shape = {"num_classes": num_classes, "in_chans": in_chans}
    parts = [f"{k}={v!r}" for k, v in {**shape, **kwargs}.items() if v is not None]
    return f"{arch}({', '.join(parts)})"


def _shape(tensor) -> str:
    return "[" + ", ".join(str(d) for d in tensor.shape) + "]"


def _load_weights(model, state: dict, name: str, arch: str, num_classes, in_chans, kwargs: dict,
                  notes: list[str]) -> None:
    """load_state_dict, after our own comparison so the error lists every kind of misfit at once."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    # Checkpoints from before torch 0.4.1 lack BatchNorm's step counter; it does not affect eval.
    counters = [k for k in missing if k.endswith(".num_batches_tracked")]
    missing = [k for k in missing if k not in counters]
    if missing or unexpected or mismatched:
        def listing(keys, fmt):
            shown = "; ".join(fmt(k) for k in keys[:3])
            return f"{shown}; ..." if len(keys) > 3 else shown

        problems = []
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatch{'es' if len(mismatched) > 1 else ''} (" + listing(
                mismatched, lambda k: f"{k}: ckpt {_shape(state[k])} vs model {_shape(expected[k])}") + ")")
        if missing:
            problems.append(f"{len(missing)} missing key{'s' if len(missing) > 1 else ''} (" + listing(
                missing, lambda k: f"{k} {_shape(expected[k])}") + ")")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key{'s' if len(unexpected) > 1 else ''} (" + listing(
                unexpected, lambda k: f"{k} {_shape(state[k])}") + ")")
        cause, fix = _likely_cause(model, state, expected, mismatched, unexpected, arch)
        if cause:
            problems.append(cause)
        raise CheckpointError(f"{name} does not fit {_describe(arch, num_classes, in_chans, kwargs)}: "
                              + ", ".join(problems), fix=fix)
    if counters:
        notes.append(f"{len(counters)} BatchNorm num_batches_tracked buffers missing (old checkpoint); kept at 0")
    model.load_state_dict(state, strict=not counters)


def _likely_cause(model, state: Mapping, expected: Mapping, mismatched: list[str], unexpected: list[str],
                  arch: str) -> tuple[str, str]:
    """The most likely reason a checkpoint does not fit, and its fix: a wrong class count or channel count
    explains a misfit confined to the head or the stem; a shared key prefix explains unknown names."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    heads = cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    stem = cfg.get("first_conv") or ()
    stem = (stem,) if isinstance(stem, str) else tuple(stem)
    if mismatched and not unexpected and all(k.rsplit(".", 1)[0] in heads for k in mismatched):
        k = next(k for k in mismatched if k.endswith("weight")) if any(k.endswith("weight") for k in mismatched) \
            else mismatched[0]
        n = int(state[k].shape[0])
        return (f"its classifier ({k}) has {n} outputs, not {int(expected[k].shape[0])}",
                f"pass --num-classes {n} (or drop --num-classes: the file's own head size is then used)")
    if mismatched and not unexpected and all(k.rsplit(".", 1)[0] in stem for k in mismatched):
        k = mismatched[0]
        n = int(state[k].shape[1]) if state[k].ndim > 1 else None
        return (f"its first layer ({k}) takes {n} input channels", f"pass --in-chans {n}")
    if len(unexpected) > len(state) / 2:
        prefixes = sorted({k.split(".", 1)[0] for k in unexpected})
        if len(prefixes) <= 2:
            return (f"its keys all start with {' or '.join(repr(p + '.') for p in prefixes)}, which {arch} "
                    "does not have", "re-save the inner model's state_dict, or check --arch: the weights under "
                    "that name did not fit it either")
        return (f"most of its weights are unknown to {arch}, so it is probably another architecture",
                "pass the --arch the checkpoint was trained with")
    return "", _FIX_SHAPES


def _first_conv_channels(model) -> int | None:
    import torch

    conv = next((m for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), None)
    return conv.in_channels if conv is not None else None


def _from_module(module, meta: Mapping, name: str, sha256: str, notes: list[str], *, arch, num_classes,
                 in_chans, weights: str = "pickled nn.Module", found_arch: str | None = None) -> LoadedModel:
    """A whole nn.Module (a trusted pickle, or the caller's own): use it as is; arguments are checked against it."""
    import torch

    model = module.float().cpu().eval()
    _check_finite(model.state_dict(), name)
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
    found_arch = found_arch or pretrained_cfg.get("architecture") or type(model).__name__
    if arch and arch != found_arch:
        notes.append(f"--arch {arch} ignored: the file holds a whole {found_arch} module")
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    found_classes = getattr(model, "num_classes", None) or (linear[-1].out_features if linear else None)
    found_chans = _first_conv_channels(model)
    for flag, given, found in (("--num-classes", num_classes, found_classes), ("--in-chans", in_chans, found_chans)):
        if given and found and given != found:
            raise CheckpointError(f"{name} holds a module with {flag[2:]}={found}, not {given}",
                                  fix=f"drop {flag} or use a checkpoint made for {given}")
    found_classes = found_classes or num_classes
    if not found_classes:
        raise CheckpointError(f"cannot tell how many classes {found_arch} ({name}) has",
                              fix="pass --num-classes")
    if weights == "pickled nn.Module":
        notes.append(f"using the pickled {found_arch} module as is")
    return LoadedModel(model=model, arch=found_arch, num_classes=int(found_classes),
                       in_chans=int(found_chans or in_chans or 3), weights=weights, hints={},
                       class_names=_class_names(meta), model_kwargs={}, notes=notes, sha256=sha256)


# --- what the file says about inputs and labels -------------------------------------------------------------------


def _hints(args: Any, in_chans: int, notes: list[str]) -> dict:
    """Preprocessing recorded in train.py's args; missing or unusable fields are simply left out."""
    hints: dict[str, Any] = {}
    size = _hint_size(args)
    if size:
        recorded = _arg(args, "input_size")  # train.py's (C, H, W): its channel count wins over the model's
        hints["input_size"] = (int(recorded[0]) if recorded and len(recorded) == 3 else in_chans, *size)
    for key in ("mean", "std"):
        if _arg(args, key):
            hints[key] = tuple(float(v) for v in _arg(args, key))
    interpolation = _arg(args, "interpolation")
    if interpolation in _INTERPOLATIONS:
        hints["interpolation"] = interpolation
    elif interpolation:
        notes.append(f"interpolation '{interpolation}' from the file is not supported; using the default")
    if _arg(args, "crop_pct"):
        hints["crop_pct"] = float(_arg(args, "crop_pct"))
    if _arg(args, "dataset"):  # train.py's --dataset; a built-in name lets compress evaluate without --data
        hints["dataset"] = str(_arg(args, "dataset"))
    return hints


def _class_names(meta: Mapping) -> list[str] | None:
    names = meta.get("class_names") or meta.get("classes")
    if isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names):
        return list(names)
    return None


# --- writing -------------------------------------------------------------------------------------------------------


def _tensors_only(state: Any) -> dict:
    import torch

    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    # detach + cpu: a CUDA or grad-tracking tensor would tie the file to this machine / pickle autograd state.
    return {k: v.detach().cpu() for k, v in state.items()}


def _check_plain(value: Any, where: str) -> None:
    # The reader loads with weights_only=True, which refuses anything beyond plain Python values.
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise CheckpointError(f"{where} is a {type(value).__name__}, which weights-only loading cannot read",
                          fix="store it as a plain value (str, number, list, dict)")
