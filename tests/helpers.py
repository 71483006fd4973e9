"""Shared test helpers (plain functions; pytest puts tests/ on sys.path)."""

import struct
import zlib


def randomize_bn(model):
    """Spread-out, seeded BN statistics: a wrong fold or kernel then shows as a large logit difference."""
    import torch

    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
    return model.eval()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (a decompression bomb's header) with a tiny IDAT."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def save_tiny_checkpoint(path, num_classes: int = 10):
    """A seeded random-weight timm resnet10t (8-64 channels, 1x28x28) saved in timm train.py format."""
    import timm
    import torch

    from deploykit.checkpoint import save_timm_checkpoint

    torch.manual_seed(0)
    kwargs = {"channels": (8, 16, 32, 64)}
    model = timm.create_model("resnet10t", num_classes=num_classes, in_chans=1, **kwargs)
    save_timm_checkpoint(path, arch="resnet10t", state_dict=model.state_dict(),
                         args={"model": "resnet10t", "num_classes": num_classes, "in_chans": 1,
                               "input_size": (1, 28, 28), "mean": (0.286,), "std": (0.353,), "model_kwargs": kwargs})
    return path
