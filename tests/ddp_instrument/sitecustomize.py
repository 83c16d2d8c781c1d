"""Observer for ``tests/test_ddp.py``: on ``PYTHONPATH`` of the stock ``asr_train`` ranks only.

Python imports ``sitecustomize`` at start-up, so this is how the test watches an unmodified
``python -m espnet2.bin.asr_train`` from inside each rank. It changes nothing the training does:

* after every *training* forward of the model it appends one JSON line ``{"step": <the model's
  step counter for this forward>, "systems": [<systems whose loss the forward reported>]}`` to
  ``<dir>/draws.rank<R>.jsonl``; the forward's own per-system ``loss_<name>`` output (``None`` for
  a system not drawn) is the record, taken before ESPnet averages the stats over the ranks;
* when ``Trainer.run`` returns it saves this rank's final ``state_dict`` to
  ``<dir>/final.rank<R>.pth`` (ESPnet itself saves on rank 0 only).

Active only when ``ESPNET_COMPRESS_DDP_RECORD`` names the directory and ``RANK`` is set (a rank
started by ``torch.distributed.run``, not the launcher).
"""
import os

_RECORD_DIR = os.environ.get("ESPNET_COMPRESS_DDP_RECORD")
_RANK = os.environ.get("RANK")


def _install(record_dir: str, rank: str) -> None:
    import json

    import torch
    from espnet2.train.trainer import Trainer

    draws_file = os.path.join(record_dir, f"draws.rank{rank}.jsonl")
    run = Trainer.run.__func__

    def record(model: torch.nn.Module, inputs: tuple, output: tuple) -> None:
        if not model.training:
            return
        stats = output[1]
        drawn = [name for name in model.systems if stats.get(f"loss_{name}") is not None]
        with open(draws_file, "a") as handle:
            handle.write(json.dumps({"step": int(model.num_steps) - 1, "systems": drawn}) + "\n")

    def observed_run(cls, model: torch.nn.Module, **kwargs) -> None:
        handle = model.register_forward_hook(record)
        try:
            run(cls, model=model, **kwargs)
        finally:
            handle.remove()
        torch.save(model.state_dict(), os.path.join(record_dir, f"final.rank{rank}.pth"))

    Trainer.run = classmethod(observed_run)


if _RECORD_DIR and _RANK is not None:
    _install(_RECORD_DIR, _RANK)
