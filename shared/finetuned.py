"""The fine-tuned embedder's architecture, as serving loads it (training: lookalike/finetune.py).

A model directory holds ``model.json`` (the manifest: id, base, dim, train_blocks,
preprocessing) and ``model.pt`` (the state dict); ``lookalike.shared.embedders`` registers such a
directory and builds the network through :func:`build_finetuned`.
"""

from __future__ import annotations

from pathlib import Path

import torch

MANIFEST = "model.json"
WEIGHTS = "model.pt"
FORMAT = "lookalike-finetuned-v1"


class FinetunedLite0(torch.nn.Module):
    """EfficientNet-Lite0 trunk split at ``len(blocks) - train_blocks``, plus a projection."""

    def __init__(self, net: torch.nn.Module, dim: int, train_blocks: int):
        super().__init__()
        self.net = net
        n = len(net._blocks)
        if not 0 <= train_blocks <= n:
            raise ValueError(f"train_blocks must be in 0..{n}")
        self.split = n - train_blocks
        self.proj = torch.nn.Linear(net._conv_head.out_channels, dim)

    def _block(self, idx: int, x: torch.Tensor) -> torch.Tensor:
        rate = self.net._global_params.drop_connect_rate
        if rate:
            rate *= float(idx) / len(self.net._blocks)
        return self.net._blocks[idx](x, drop_connect_rate=rate)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        for idx in range(self.split):
            x = self._block(idx, x)
        return x

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Trunk output -> the backbone's pooled 1280-d features (before the projection)."""
        net = self.net
        for idx in range(self.split, len(net._blocks)):
            x = self._block(idx, x)
        x = net._swish(net._bn1(net._conv_head(x)))
        return net._avg_pooling(x).flatten(1)

    def top(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pooled(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.top(self.trunk(x))

    def trainable_parameters(self) -> tuple[list, list]:
        """(backbone params to train, head params)."""
        net = self.net
        back = [p for b in net._blocks[self.split :] for p in b.parameters()]
        back += list(net._conv_head.parameters()) + list(net._bn1.parameters())
        return back, list(self.proj.parameters())

    def set_train_mode(self) -> None:
        """Dropout/drop-connect on in the trained blocks; BatchNorm statistics frozen everywhere."""
        self.train()
        for mod in self.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.eval()


def build_finetuned(manifest: dict, base: torch.nn.Module, weights: Path | None) -> FinetunedLite0:
    """The network a manifest describes on ``base`` (its backbone architecture), with ``weights``
    loaded (strictly) when given."""
    if manifest.get("base", "efficientnet_lite0") != "efficientnet_lite0":
        raise ValueError(f"fine-tuning supports base efficientnet_lite0 only, not {manifest.get('base')!r}")
    model = FinetunedLite0(base, int(manifest["dim"]), int(manifest["train_blocks"]))
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model
