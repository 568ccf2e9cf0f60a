"""Layer 4 of the package (see ``docs/architecture.md``): training and scale-out.

* ``finetune.py``: the fine-tuning command (``adamoe-finetune`` /
  ``python -m adamoe_kernels.training.finetune``);
* ``distributed.py``: ``ExpertParallelMoE``, expert parallelism that sends only true assignments
  (``ak.distributed``).

Nothing is imported here, so ``import adamoe_kernels`` never pays for the fine-tuning command.
"""
