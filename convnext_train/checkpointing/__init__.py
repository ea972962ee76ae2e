"""A run's checkpoints, from one owner: the `Checkpointer` (torchtitan's CheckpointManager is the model).

It is built before any compute, from the run directory and the config, and then tracks the run's
stateful parts as one mapping of names to objects with `state_dict()` / `load_state_dict()`
(`state.py`: the model, its EMA and the optimizer, sharded under FSDP; the grad scaler, the train
state, every rank's RNG streams and, for a source whose order depends on it, the data's reading
layout; the data position follows from the step). The training loop
makes two calls: `poll` after every optimizer step (save now? stop?) and `save`. The Checkpointer
owns everything else:

- the run directory's lock (`lock.py`): a second job in the same directory stops at once, naming
  the first;
- the recipe check on resume (`recipe.py`): a changed `optimizer.lr` or `trainer.epochs` stops the
  run before compute, naming each key, unless `checkpoint.allow_changes` lists it;
- the save clock (`checkpoint.every_minutes`), stop requests (SIGUSR1/SIGTERM, `preemption.py`),
  agreed by every rank at the same step without a host sync per step;
- the files (`layout.py`): full `.pt` files or sharded `torch.distributed.checkpoint` directories
  (`checkpoint.format`; async saves with `checkpoint.async_save`), each published whole or not at
  all, retention (`checkpoint.keep_last`), `last`/`best`/`best_ema` links, stale temporaries swept,
  a full disk as one message naming the last whole checkpoint, weights that became non-finite never
  saved; `report.py`: what each save cost (a metrics.jsonl row);
- a save that hangs on one rank named within `dist_timeout` (`background.py`: the save thread and
  its heartbeats);
- FSDP's gather and scatter of whole tensors for full files (`state.py`).

    python -m convnext_train.checkpointing consolidate <run>/checkpoints/step_000001234 model.pt

turns a sharded checkpoint into the one file that eval.py and the release formats use (eval.py and
`finetune.checkpoint` also read the directory directly).
"""

from convnext_train.checkpointing.checkpointer import Checkpointer, Decision, NonFiniteWeights, consolidate
from convnext_train.checkpointing.layout import FORMATS, resolve_format
from convnext_train.checkpointing.report import SaveReport

__all__ = ["FORMATS", "Checkpointer", "Decision", "NonFiniteWeights", "SaveReport", "consolidate", "resolve_format"]
