"""Layer 4 of the package (see ``docs/architecture.md``): training and scale-out.

* ``finetune.py``: the fine-tuning command (``adamoe-finetune`` /
  ``python -m adamoe_kernels.training.finetune``);
* ``distributed.py``: ``ExpertParallelMoE``, expert parallelism that sends only true assignments
  (``ak.distributed``), and ``shard_experts`` for converted transformers models;
* ``parallel.py``: the command under ``torchrun`` (DDP, FSDP2, expert parallel; what the ranks
  reduce);
* ``callbacks.py``: ``AdaMoECallback`` (``ak.AdaMoECallback``), a ``transformers.TrainerCallback``:
  the α schedule, per-layer load and FLOPs saved in the Trainer's logs, the load controller;
* ``checkpoint.py``: checkpoints that survive a kill (``torch.distributed.checkpoint`` shards,
  written atomically, verified against a manifest, the last K kept).

Nothing is imported here, so ``import adamoe_kernels`` never pays for the fine-tuning command.
"""
