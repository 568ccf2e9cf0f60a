"""AdaMoE in transformers' ``Trainer`` (and TRL's trainers, which are ``Trainer`` subclasses).

``AdaMoECallback`` is a ``transformers.TrainerCallback`` for a model converted with
``ak.convert_model`` or ``ak.add_mo_lora`` (bare, or wrapped by PEFT)::

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[ak.AdaMoECallback(ak.AlphaSchedule())])

What it does:

* **the null-aware loss in the Trainer's loss**: at ``on_train_begin`` it sets
  ``config.output_router_logits = True`` on the converted model (restored at ``on_train_end``),
  so every ``model(**batch)`` of the Trainer returns ``loss = LM loss + α · aux_loss`` (the
  converted model adds ``router_aux_loss_coef · aux_loss`` when labels are given);
* **the α schedule**: ``router_aux_loss_coef`` (the attribute the converted model's forward
  reads) is set from ``schedule`` at every epoch start (``unit="epoch"``, the paper's 0.02 then
  0.0001), or before every step for ``unit="step"`` and for ``linear=True`` schedules;
* **logs**: into every training log of the Trainer (so its console, TensorBoard, W&B, ... and
  ``trainer.state.log_history`` show them) ``adamoe/load_layer{i}`` (the mean load of each AdaMoE
  layer over the optimizer steps since the last log, every micro-batch counted),
  ``adamoe/load`` (their mean), ``adamoe/expert_flops_saved`` (``1 - load / k_ref``, the
  fraction of routed-expert FLOPs saved against the model's own top-k before conversion, top-2
  for Mixtral), ``adamoe/alpha`` and, with a controller, ``adamoe/null_bias`` (mean over layers);
* **the load controller** (optional, ``target_load=L``): ``ak.LoadController(L, load_rate)``
  steps every layer's null-logit bias after each optimizer step.

The Trainer calls its reporting callbacks (TensorBoard, W&B, ...) before the ones passed in
``callbacks=``, all with the same ``logs`` dict, so keys added there would reach no reporter.
This callback therefore moves itself to the front of the Trainer's callback list (right after
``DefaultFlowCallback``) the first time the Trainer calls it (``on_init_end``, or
``on_train_begin`` when it was added with ``trainer.add_callback``).

Loads are read on the device and summed there; they are copied to the host only when the Trainer
logs (no host sync per step). Under several processes (``torch.distributed`` initialised) the
logged loads are the mean over the ranks.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

from ..integrations.hf_models import adamoe_layers
from ..integrations.load_control import LoadController
from ..losses import AlphaSchedule

LOG_PREFIX = "adamoe/"


def adamoe_models(model: nn.Module) -> list[nn.Module]:
    """The converted models inside ``model`` (itself, or the one a PEFT wrapper holds)."""
    return [mod for mod in model.modules()
            if getattr(type(mod), "_adamoe_base_class", None) is not None
            and getattr(getattr(mod, "config", None), "adamoe", None)]


class AdaMoECallback(TrainerCallback):
    """α schedule, load/FLOPs logging and the load controller for ``transformers.Trainer``.

    Args:
        schedule: the α of the null-aware loss over training (default: the paper's
            ``ak.AlphaSchedule()``, 0.02 in epoch 0, 0.0001 after); ``None`` keeps the model's
            ``router_aux_loss_coef`` as it is.
        target_load: hold every layer's load near this ``L`` with ``ak.LoadController``
            (``None``: no controller).
        load_rate: the controller's bias step per optimizer step.
        aux_loss: add the null-aware loss to the Trainer's loss (``config.output_router_logits``
            on during training). ``False`` trains on the LM loss alone (the schedule is then
            only logged).
        reference_top_k: the ``k`` the saved expert FLOPs are counted against (default: the
            model's own top-k before conversion, ``config.adamoe["original_top_k"]``, else 2).
        per_layer: log ``adamoe/load_layer{i}`` for every layer (else only the mean).
    """

    def __init__(self, schedule: AlphaSchedule | None = AlphaSchedule(), *,
                 target_load: float | None = None, load_rate: float = 0.01,
                 aux_loss: bool = True, reference_top_k: int | None = None,
                 per_layer: bool = True):
        if schedule is not None and not isinstance(schedule, AlphaSchedule):
            raise TypeError(f"schedule must be an ak.AlphaSchedule or None, got "
                            f"{type(schedule).__name__}")
        if reference_top_k is not None and (isinstance(reference_top_k, bool)
                                            or not isinstance(reference_top_k, int)
                                            or reference_top_k < 1):
            raise ValueError(f"reference_top_k must be an int >= 1, got {reference_top_k!r}")
        self.schedule = schedule
        self.controller = (LoadController(target_load, load_rate)
                           if target_load is not None else None)
        self.aux_loss = bool(aux_loss)
        self.reference_top_k = reference_top_k
        self.per_layer = bool(per_layer)
        self.alpha: float | None = None
        self._models: list[nn.Module] = []
        self._layers: list[nn.Module] = []
        self._saved_flags: list = []
        self._load_sum: torch.Tensor | None = None
        self._load_count = 0

    # ---- placement: ahead of the reporting callbacks ------------------------------------------

    def _move_to_front(self) -> None:
        frame = inspect.currentframe()
        try:
            caller = frame.f_back
            for _ in range(4):  # our event <- CallbackHandler.call_event (<- on_<event>)
                caller = caller.f_back if caller is not None else None
                handler = caller.f_locals.get("self") if caller is not None else None
                if isinstance(handler, CallbackHandler):
                    break
            else:
                return
        finally:
            del frame
        cbs = handler.callbacks
        if self not in cbs:
            return
        j = cbs.index(self)
        i = next((pos + 1 for pos, cb in enumerate(cbs) if isinstance(cb, DefaultFlowCallback)), 0)
        if i < j:  # call_event is iterating over cbs at j: the entries after j keep their places
            cbs.pop(j)
            cbs.insert(i, self)

    # ---- the model ----------------------------------------------------------------------------

    def _bind(self, model: nn.Module | None) -> None:
        if model is None:
            raise ValueError("AdaMoECallback needs the model: use it with a transformers Trainer")
        models = adamoe_models(model)
        layers = adamoe_layers(model)
        if not models or not layers:
            raise ValueError("AdaMoECallback: the model has no AdaMoE layers; convert it with "
                             "ak.convert_model (MoE models) or ak.add_mo_lora (dense models) "
                             "before building the Trainer")
        self._models, self._layers = models, layers

    def _set_alpha(self, position: float) -> None:
        if self.schedule is None:
            self.alpha = float(getattr(self._models[0], "router_aux_loss_coef", 0.0))
            return
        self.alpha = self.schedule(position)
        for mod in self._models:
            mod.router_aux_loss_coef = self.alpha

    def _reference_k(self) -> int:
        if self.reference_top_k is not None:
            return self.reference_top_k
        return int(self._models[0].config.adamoe.get("original_top_k") or 2)

    def _accumulate(self) -> None:
        if any(layer.last_router_logits is None for layer in self._layers):
            return
        loads = torch.stack([layer.last_load.detach().float().reshape(()) for layer in self._layers])
        self._load_sum = loads if self._load_sum is None else self._load_sum + loads
        self._load_count += 1

    # ---- Trainer events -----------------------------------------------------------------------

    def on_init_end(self, args, state, control, **kwargs):
        self._move_to_front()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._move_to_front()
        self._bind(model)
        self._saved_flags = []
        if self.aux_loss:
            for mod in self._models:
                self._saved_flags.append((mod.config, getattr(mod.config, "output_router_logits",
                                                              False)))
                mod.config.output_router_logits = True
        self._load_sum, self._load_count = None, 0
        self._set_alpha(self._position(state, epoch_start=True))

    def on_train_end(self, args, state, control, **kwargs):
        for config, flag in self._saved_flags:
            config.output_router_logits = flag
        self._saved_flags = []

    def _position(self, state, epoch_start: bool = False) -> float:
        if self.schedule is not None and self.schedule.unit == "step":
            return float(state.global_step)
        epoch = float(state.epoch or 0.0)
        if epoch_start or self.schedule is None or not self.schedule.linear:
            return float(math.floor(epoch + 1e-6))
        return epoch

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self._models:
            self._set_alpha(self._position(state, epoch_start=True))

    def on_step_begin(self, args, state, control, **kwargs):
        if self._models and self.schedule is not None and (
                self.schedule.unit == "step" or self.schedule.linear):
            self._set_alpha(self._position(state))

    def on_substep_end(self, args, state, control, **kwargs):
        if self._layers:
            self._accumulate()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self._layers:
            return
        self._accumulate()
        if self.controller is not None:
            self.controller.update(model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not self._layers or self._load_count == 0:
            return  # e.g. the eval metrics: no training step since the last log
        loads = self._load_sum / self._load_count
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(loads)
            loads = loads / torch.distributed.get_world_size()
        loads = loads.cpu().tolist()
        self._load_sum, self._load_count = None, 0
        mean = sum(loads) / len(loads)
        new = {}
        if self.per_layer:
            new.update({f"{LOG_PREFIX}load_layer{i}": v for i, v in enumerate(loads)})
        new[f"{LOG_PREFIX}load"] = mean
        new[f"{LOG_PREFIX}expert_flops_saved"] = 1.0 - mean / self._reference_k()
        if self.alpha is not None:
            new[f"{LOG_PREFIX}alpha"] = self.alpha
        if self.controller is not None:
            biases = [float(layer.null_bias) for layer in self._layers]
            new[f"{LOG_PREFIX}null_bias"] = sum(biases) / len(biases)
        logs.update(new)
        # Trainer.log appended a copy of logs to the history just before calling us
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(new)
