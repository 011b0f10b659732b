"""Checks a sweep's training configs as ``llamafactory-cli train`` would parse them, before any training.

``minorsft sweep`` runs ``python -m llamafactory_minorsft.sweep.check ANSWER.json`` once, with every run's
config as a JSON object {run name: config} on stdin, in a process that sees no GPU. Importing LLaMA-Factory
here activates the plugin (its start-up hook), so its checks run too. It writes {run name: error} for each
config that LLaMA-Factory or the plugin refuses to ANSWER.json.

Two settings of the check's own are not the run's: ``use_cpu`` (the check runs on this CPU, so ``bf16``
is not refused for a lack of GPU) and no ``deepspeed`` (LLaMA-Factory parses a DeepSpeed config only
under torchrun); the DeepSpeed file is checked with the plugin's own check instead. The output folder is
the sweep's business (it resumes or restarts it), so ``overwrite_output_dir`` is set for the check.
"""

import json
import sys


def check(config: dict) -> None:
    from llamafactory.hparams import get_train_args

    from ..hooks.arguments import (
        check_deepspeed_config,
        validate_data_arguments,
        validate_preference_data_arguments,
    )
    from ..hooks.training import uses_plugin_dpo_trainer, uses_plugin_trainer

    config = dict(config)
    check_deepspeed_config(config.pop("deepspeed", None))
    config.update(use_cpu=True, overwrite_output_dir=True)
    model_args, data_args, training_args, finetuning_args, _ = get_train_args(config)
    if finetuning_args.stage == "dpo":
        if uses_plugin_dpo_trainer(finetuning_args):
            validate_preference_data_arguments(data_args, finetuning_args, training_args)
    elif uses_plugin_trainer(finetuning_args):
        validate_data_arguments(data_args, model_args, finetuning_args, training_args)


def main(argv=None) -> int:
    [answer_path] = sys.argv[1:] if argv is None else argv
    configs = json.load(sys.stdin)
    errors = {}
    for name, config in configs.items():
        try:
            check(config)
        except Exception as error:  # LLaMA-Factory's refusals are ValueErrors, a bad value's type may be another
            errors[name] = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
    with open(answer_path, "w", encoding="utf-8") as f:
        json.dump(errors, f, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
