"""Training stages. Pretraining: ``train(TrainConfig.from_toml(recipe, overrides))``.

Names are imported lazily, so ``python -m phiforge.train.pretrain`` (torchrun) does not import the
module twice.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrainConfig", "TrainConfigError", "extend_context", "train"]


def __getattr__(name: str) -> Any:
    if name in ("TrainConfig", "TrainConfigError"):
        from phiforge.train import config

        return getattr(config, name)
    if name in ("extend_context", "train"):
        from phiforge.train import pretrain

        return getattr(pretrain, name)
    raise AttributeError(f"module 'phiforge.train' has no attribute {name!r}")
