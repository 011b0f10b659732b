"""Every hook point into LLaMA-Factory's internals, in one package.

``_autoload`` calls ``run_post_import_hook`` right after each module in ``POST_IMPORT_HOOKS`` has been
executed; each hook patches exactly that module:

=========================================  =========================================================
``llamafactory``                           refuse an unsupported LLaMA-Factory version, loudly
``llamafactory.hparams.finetuning_args``   ``FinetuningArguments`` gains the plugin's stages and keys
                                           (``arguments.MinorSFTArguments``); stage names are validated
``llamafactory.hparams.training_args``     a ``deepspeed:`` file that is missing or not JSON is refused
                                           with the key and the file named (``arguments``)
``llamafactory.hparams.parser``            for the plugin's runs: the checks that need several argument
                                           groups (``output_dir``, ``cutoff_len``); checkpoints a kill cut
                                           short moved aside before LLaMA-Factory picks the one to resume
                                           from (``arguments``, ``resume``)
``llamafactory.train.tuner``               ``run_sft`` routes the new stages (and ``sft`` with
                                           ``deviation_metric``) to ``MinorSFTTrainer``; ``LogCallback``
                                           writes the deviation into ``trainer_log.jsonl``; a rank of a
                                           multi-rank run lets torch's gloo threads finish before its
                                           interpreter shuts down (``training``)
``llamafactory.extras.constants``          LLaMA-Board's stage table gains "MinorSFT" and "SFT using DPO"
``llamafactory.webui.*``                   LLaMA-Board: Beta and ``deviation_metric`` in the runner, the
                                           checkbox, locales, deviation in the live plot (``board``)
=========================================  =========================================================

The patches are imported only when their LLaMA-Factory module is, so patching the argument classes never
imports the trainer or the board.
"""

import importlib

from .. import SUPPORTED_LLAMAFACTORY

# LLaMA-Factory module -> (this package's module, the patch in it).
POST_IMPORT_HOOKS = {
    "llamafactory": ("", "check_llamafactory_version"),
    "llamafactory.hparams.finetuning_args": ("arguments", "patch_finetuning_arguments"),
    "llamafactory.hparams.training_args": ("arguments", "patch_training_arguments"),
    "llamafactory.hparams.parser": ("arguments", "patch_parser"),
    "llamafactory.train.tuner": ("training", "patch_tuner"),
    "llamafactory.extras.constants": ("board", "patch_stage_table"),
    "llamafactory.webui.locales": ("board", "patch_locales"),
    "llamafactory.webui.control": ("board", "patch_control"),
    "llamafactory.webui.runner": ("board", "patch_runner"),
    "llamafactory.webui.components.train": ("board", "patch_train_tab"),
    "llamafactory.webui.components": ("board", "patch_components"),
}


class UnsupportedLlamaFactoryVersion(ImportError):
    pass


def run_post_import_hook(fullname: str, module) -> None:
    submodule, patch = POST_IMPORT_HOOKS[fullname]
    owner = importlib.import_module(f"{__name__}.{submodule}" if submodule else __name__)
    getattr(owner, patch)(module)


def check_llamafactory_version(module) -> None:
    from packaging.specifiers import SpecifierSet

    version = getattr(module, "__version__", "unknown")
    if version not in SpecifierSet(SUPPORTED_LLAMAFACTORY):
        raise UnsupportedLlamaFactoryVersion(
            f"llamafactory-minorsft supports LLaMA-Factory {SUPPORTED_LLAMAFACTORY}, found {version}. "
            "Install `llamafactory==0.9.5`, or set MINORSFT_DISABLE=1 to run LLaMA-Factory without the plugin."
        )
