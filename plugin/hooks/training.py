"""Routing the plugin's stages to its trainers inside LLaMA-Factory's own SFT and DPO workflows, and its metrics into
LLaMA-Factory's ``trainer_log.jsonl``."""

import contextlib
import functools
import os
import time

from . import resume
from .arguments import (
    DPO_PLUGIN_KEYS,
    MINOR_DPO,
    PLUGIN_STAGES,
    validate_data_arguments,
    validate_preference_data_arguments,
)

# Keys the trainers add to each log entry; LogCallback copies them into trainer_log.jsonl.
TRAIN_LOG_KEYS = ("deviation", "token_deviation", "kl", "coef_mean", "logps/policy", "logps/ref")
DPO_LOG_KEYS = ("deviation/chosen", "deviation/rejected", "rejected_active", "kl/chosen")
PLOT_KEYS = ("deviation", "eval_deviation")
DPO_PLOT_KEYS = ("deviation/chosen", "deviation/rejected", "rejected_active")
# `pref_loss` values that LLaMA-Factory 0.9.5 passes to TRL 0.24's `dpo_loss` without its `loss_type`, whose
# default is "sigmoid": they train the sigmoid loss (docs/behaviour.md).
SIGMOID_IN_DISGUISE = ("hinge", "ipo", "kto_pair")
# Seconds a rank of a multi-rank run holds back its interpreter's shutdown once training is over
# (`run_training_function`).
SHUTDOWN_GRACE_SECONDS = 0.1


def patch_tuner(module) -> None:
    module.run_sft = functools.partial(run_sft_stage, module.run_sft)
    module.run_dpo = functools.partial(run_dpo_stage, module.run_dpo)
    module.LogCallback = _make_log_callback(module.LogCallback)
    module._training_function = functools.partial(run_training_function, module._training_function)


def run_training_function(lf_training_function, config) -> None:
    """LLaMA-Factory's ``_training_function`` (one rank's whole run); then, in a multi-rank run, a sleep of
    ``SHUTDOWN_GRACE_SECONDS`` before the interpreter shuts down.

    torch's gloo backend destroys each collective's work object on the worker thread that ran it, after the rank that
    waited for the collective has moved on, and releasing the work's tensors takes the GIL. If that rank is already
    shutting its interpreter down, Python ends the worker thread inside the destructor: "terminate called without an
    active exception", SIGABRT, and torchrun stops the other rank, which may still be writing its checkpoint
    (pytorch/pytorch#190489). Sleeping hands the GIL to those threads while the interpreter is still whole: a grace
    period, not a guarantee, since torch offers no way to wait for them. The outputs of a run are untouched;
    docs/behaviour.md, "Multi-rank runs on the CPU", has the measurements."""
    lf_training_function(config)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        time.sleep(SHUTDOWN_GRACE_SECONDS)


def is_plugin_metric(key: str) -> bool:
    """A key the trainers log: ``deviation``, ``eval_deviation``, or with ``eval_on_each_dataset``
    ``eval_<dataset>_deviation``; the same for the DPO keys."""
    names = (*TRAIN_LOG_KEYS, *DPO_LOG_KEYS)
    return key in names or (
        key.startswith("eval_") and any(key == f"eval_{name}" or key.endswith(f"_{name}") for name in names)
    )


def uses_plugin_trainer(finetuning_args) -> bool:
    return (
        finetuning_args.sft_objective in PLUGIN_STAGES or finetuning_args.deviation_metric or finetuning_args.kl_metric
    )


def run_sft_stage(lf_run_sft, model_args, data_args, training_args, finetuning_args, generating_args, callbacks=None):
    """LLaMA-Factory's ``run_sft``, with ``MinorSFTTrainer`` in place of ``CustomSeq2SeqTrainer`` when needed."""
    if not uses_plugin_trainer(finetuning_args):
        return lf_run_sft(model_args, data_args, training_args, finetuning_args, generating_args, callbacks)

    validate_data_arguments(data_args, model_args, finetuning_args, training_args)
    resume.drop_replayed_log_lines(training_args)
    from llamafactory.extras.ploting import plot_loss
    from llamafactory.train.sft import workflow

    from ..train.trainer import MinorSFTTrainer

    trainer_cls = functools.partial(
        MinorSFTTrainer, model_args=model_args, data_args=data_args, neat_packing=data_args.neat_packing
    )

    def plot_loss_and_deviation(save_dictionary, keys=("loss",)):
        plot_loss(save_dictionary, keys=[*keys, *PLOT_KEYS])

    with module_attributes(workflow, CustomSeq2SeqTrainer=trainer_cls, plot_loss=plot_loss_and_deviation):
        return lf_run_sft(model_args, data_args, training_args, finetuning_args, generating_args, callbacks)


def uses_plugin_dpo_trainer(finetuning_args) -> bool:
    """Whether ``stage: dpo`` runs ``MinorDPOTrainer``; without these keys LLaMA-Factory's own trainer runs."""
    return finetuning_args.pref_loss == MINOR_DPO or any(getattr(finetuning_args, key) for key in DPO_PLUGIN_KEYS)


def run_dpo_stage(lf_run_dpo, model_args, data_args, training_args, finetuning_args, callbacks=None):
    """LLaMA-Factory's ``run_dpo``, with ``MinorDPOTrainer`` in place of ``CustomDPOTrainer`` when a plugin key is
    set. With ``precompute_ref_logps`` the workflow loads no reference copy: the trainer loads one only if its pass
    or ``kl_metric`` needs it."""
    if finetuning_args.pref_loss in SIGMOID_IN_DISGUISE:
        _warn_sigmoid_in_disguise(finetuning_args.pref_loss)
    if not uses_plugin_dpo_trainer(finetuning_args):
        return lf_run_dpo(model_args, data_args, training_args, finetuning_args, callbacks)

    validate_preference_data_arguments(data_args, finetuning_args, training_args)
    resume.drop_replayed_log_lines(training_args)
    from llamafactory.extras.ploting import plot_loss
    from llamafactory.train.dpo import trainer, workflow

    from ..train.dpo_trainer import MinorDPOTrainer

    trainer_cls = functools.partial(MinorDPOTrainer, model_args=model_args, data_args=data_args)
    workflow_patches = {
        "plot_loss": lambda save_dictionary, keys=("loss",): plot_loss(save_dictionary, keys=[*keys, *DPO_PLOT_KEYS])
    }
    if finetuning_args.precompute_ref_logps:
        workflow_patches["create_ref_model"] = lambda *args, **kwargs: None
    # The workflow imports its trainer class from `trainer` inside `run_dpo`.
    with module_attributes(trainer, CustomDPOTrainer=trainer_cls), module_attributes(workflow, **workflow_patches):
        return lf_run_dpo(model_args, data_args, training_args, finetuning_args, callbacks)


def _warn_sigmoid_in_disguise(pref_loss: str) -> None:
    """On stderr through Python's own logging, not LLaMA-Factory's logger: LLaMA-Board copies that logger's lines into
    the run's files, which must stay as a run without the plugin writes them."""
    import logging

    logging.getLogger(__name__).warning(
        "`pref_loss: %s` trains the sigmoid loss in LLaMA-Factory 0.9.5 with TRL 0.24 (LLaMA-Factory calls TRL's "
        '`dpo_loss` without its `loss_type`, which defaults to "sigmoid"); see docs/behaviour.md.',
        pref_loss,
    )


@contextlib.contextmanager
def module_attributes(module, **values):
    saved = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def _make_log_callback(base):
    class LogCallback(base):
        """LLaMA-Factory's callback; the line its ``on_log`` writes to ``trainer_log.jsonl`` gains the plugin's
        metrics (LLaMA-Factory builds the line from a fixed key set)."""

        def on_log(self, args, state, control, **kwargs):
            latest = state.log_history[-1] if state.log_history else {}
            metrics = {key: value for key, value in latest.items() if is_plugin_metric(key)}
            if not metrics:
                return super().on_log(args, state, control, **kwargs)
            # LLaMA-Factory submits ``self._write_log`` with the line to a worker thread inside ``on_log``;
            # for this call only that method adds these metrics, so they travel with the very line they
            # belong to, whenever the worker writes it. Other writers (evaluation progress) are untouched.
            self._write_log = functools.partial(self._write_log_with_metrics, metrics)
            try:
                super().on_log(args, state, control, **kwargs)
            finally:
                del self._write_log
            if self.webui_mode and args.should_save:
                from llamafactory.extras import logging

                # Under the "llamafactory" logger: its handlers feed LLaMA-Board's log panel.
                logging.get_logger(f"llamafactory.{__name__}").info_rank0(
                    "{" + ", ".join(f"'{key}': {value:.4g}" for key, value in metrics.items()) + "}"
                )

        def _write_log_with_metrics(self, metrics, output_dir, logs):
            super()._write_log(output_dir, {**logs, **metrics})

    LogCallback.__qualname__ = base.__qualname__
    return LogCallback
