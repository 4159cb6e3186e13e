"""Training: one loop (`fit`) for pre-training and fine-tuning, its config, optimizer and distributed helpers.

`fit(model, tokenizer, task, cfg, out_dir)` trains any `yuyan.data.tasks.Task` (`LMTask` for next-token
prediction over token shards; the fine-tuning tasks implement the same methods); `TrainConfig` and its
sections live in yuyan.train.config. `train(config)` is the pre-training recipe:
tokenizer → shards → model from a preset → fit. The package itself is callable, so `yuyan.train(config)`
runs that recipe while `yuyan.train.fit` etc. stay reachable under the same name.
"""

import sys
import types

from yuyan.train.config import (
    CheckpointSection,
    DataSection,
    EvalSection,
    ModelSection,
    TrainConfig,
    TrainSection,
)
from yuyan.train.loop import fit

__all__ = [
    "fit",
    "TrainConfig",
    "ModelSection",
    "DataSection",
    "TrainSection",
    "EvalSection",
    "CheckpointSection",
    "train",
    "load_train_config",
]


def __getattr__(name):
    if name in ("train", "load_train_config"):
        from yuyan.train import pretrain

        return getattr(pretrain, name)
    raise AttributeError(name)


class _CallableModule(types.ModuleType):
    def __call__(self, config=None, overrides: dict | None = None, resume: bool = False) -> dict:
        """yuyan.train(config): pre-train as a TrainConfig or TOML file says (see pretrain.train)."""
        from yuyan.train.pretrain import train as _train

        return _train(config, overrides, resume)


sys.modules[__name__].__class__ = _CallableModule
