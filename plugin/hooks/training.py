"""Routing the plugin's stages to its trainer inside LLaMA-Factory's own SFT workflow, and its metrics into
LLaMA-Factory's ``trainer_log.jsonl``."""

import contextlib
import functools

from . import resume
from .arguments import PLUGIN_STAGES, validate_data_arguments

# Keys the trainer adds to each log entry; LogCallback copies them into trainer_log.jsonl.
TRAIN_LOG_KEYS = ("deviation", "token_deviation", "kl", "coef_mean", "logps/policy", "logps/ref")
PLOT_KEYS = ("deviation", "eval_deviation")


def patch_tuner(module) -> None:
    module.run_sft = functools.partial(run_sft_stage, module.run_sft)
    module.LogCallback = _make_log_callback(module.LogCallback)


def is_plugin_metric(key: str) -> bool:
    """A key the trainer logs: ``deviation``, ``eval_deviation``, or with ``eval_on_each_dataset``
    ``eval_<dataset>_deviation``."""
    return key in TRAIN_LOG_KEYS or (
        key.startswith("eval_") and any(key == f"eval_{name}" or key.endswith(f"_{name}") for name in TRAIN_LOG_KEYS)
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
