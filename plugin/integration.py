"""Every hook point into LLaMA-Factory's internals, in one module.

``_autoload`` calls ``run_post_import_hook`` right after each module in ``POST_IMPORT_HOOKS`` has been
executed; each hook patches exactly that module:

=====================================  ===========================================================
``llamafactory``                       refuse an unsupported LLaMA-Factory version, loudly
``llamafactory.hparams.finetuning_args``  ``FinetuningArguments`` gains the stages ``minorsft`` and
                                       ``sft_dpo`` and the key ``deviation_metric``; stage names are
                                       validated against the full list
``llamafactory.hparams.training_args``  a ``deepspeed:`` file that is missing or not JSON is refused
                                       with the key and the file named
``llamafactory.train.tuner``           ``run_sft`` routes the new stages (and ``sft`` with
                                       ``deviation_metric``) to ``MinorSFTTrainer``; ``LogCallback``
                                       writes the deviation into ``trainer_log.jsonl``
``llamafactory.extras.constants``     LLaMA-Board's stage table gains "MinorSFT" and "SFT using DPO"
``llamafactory.webui.*``               LLaMA-Board: Beta and ``deviation_metric`` in the runner, the
                                       checkbox, locales, deviation in the live plot (``_patch_webui_*``)
=====================================  ===========================================================

LLaMA-Factory runs both new stages through its own SFT workflow (data pipeline, collator,
``load_model``, ``CustomSeq2SeqTrainer``), so after validation ``FinetuningArguments.stage`` reads
``"sft"`` to LLaMA-Factory and ``FinetuningArguments.sft_objective`` keeps the method
(``"sft"``, ``"minorsft"`` or ``"sft_dpo"``); ``to_dict()`` reports the stage the user asked for.
"""

import base64
import contextlib
import dataclasses
import functools
import json
import os
from typing import Literal

from . import SUPPORTED_LLAMAFACTORY

LLAMAFACTORY_STAGES = ("pt", "sft", "rm", "ppo", "dpo", "kto")
PLUGIN_STAGES = ("minorsft", "sft_dpo")
# LLaMA-Factory's own SFT loss variants (its `compute_loss_func`): kept, with the deviation logged beside them.
SFT_LOSS_VARIANTS = ("use_dft_loss", "use_asft_loss", "use_eaft_loss")
VALID_STAGES = LLAMAFACTORY_STAGES + PLUGIN_STAGES

# Keys the trainer adds to each log entry; LogCallback copies them into trainer_log.jsonl.
TRAIN_LOG_KEYS = ("deviation", "coef_mean", "logps/policy", "logps/ref")
PLOT_KEYS = ("deviation", "eval_deviation")


class UnsupportedLlamaFactoryVersion(ImportError):
    pass


def run_post_import_hook(fullname: str, module) -> None:
    POST_IMPORT_HOOKS[fullname](module)


# --- llamafactory: version gate -------------------------------------------------------------------


def check_llamafactory_version(module) -> None:
    from packaging.specifiers import SpecifierSet

    version = getattr(module, "__version__", "unknown")
    if version not in SpecifierSet(SUPPORTED_LLAMAFACTORY):
        raise UnsupportedLlamaFactoryVersion(
            f"llamafactory-minorsft supports LLaMA-Factory {SUPPORTED_LLAMAFACTORY}, found {version}. "
            "Install `llamafactory==0.9.5`, or set MINORSFT_DISABLE=1 to run LLaMA-Factory without the plugin."
        )


# --- llamafactory.hparams.finetuning_args: stages and keys ----------------------------------------


def patch_finetuning_arguments(module) -> None:
    base = module.FinetuningArguments

    @dataclasses.dataclass
    class FinetuningArguments(base):
        stage: Literal["pt", "sft", "rm", "ppo", "dpo", "kto", "minorsft", "sft_dpo"] = dataclasses.field(
            default="sft",
            metadata={
                "help": "Which stage will be performed in training. `minorsft` (MinorSFT, Eq. 7) and `sft_dpo` "
                "(SFT using DPO, Eq. 3) come from llamafactory-minorsft and use `pref_beta` as beta."
            },
        )
        deviation_metric: bool = dataclasses.field(
            default=False,
            metadata={
                "help": "Log the deviation from the reference model (MinorSFT paper, Eq. 8) for `stage: sft`; "
                "the loss is unchanged. Always on for `minorsft` and `sft_dpo`."
            },
        )
        precompute_ref_logps: bool = dataclasses.field(
            default=False,
            metadata={
                "help": "Compute the reference log-probs of every train and eval sample once, before the first update, "
                "cache them and release the reference (no reference forward per step, no reference copy in memory)."
            },
        )
        ref_logps_cache_dir: str | None = dataclasses.field(
            default=None,
            metadata={"help": "Directory of the precomputed reference log-probs (default: `output_dir`)."},
        )

        def __post_init__(self):
            validate_finetuning_arguments(self)
            self.sft_objective = self.stage if self.stage in PLUGIN_STAGES else "sft"
            if self.stage in PLUGIN_STAGES:
                self.stage = "sft"
            super().__post_init__()

        def to_dict(self):
            args = super().to_dict()
            if self.sft_objective in PLUGIN_STAGES:
                args["stage"] = self.sft_objective
            return args

    # Pickled arguments (and LLaMA-Factory's own references) resolve to the patched class.
    FinetuningArguments.__module__ = base.__module__
    FinetuningArguments.__qualname__ = base.__qualname__
    module.FinetuningArguments = FinetuningArguments


def validate_finetuning_arguments(args) -> None:
    """Checks that need only FinetuningArguments; run when the arguments are parsed."""
    if args.stage not in VALID_STAGES:
        raise ValueError(f"Unknown `stage: {args.stage}`. Valid stages: {', '.join(VALID_STAGES)}.")
    if args.deviation_metric and args.stage != "sft":
        raise ValueError(
            f"`deviation_metric: true` is for `stage: sft` (the baseline of the paper's Figure 1); "
            f"`stage: {args.stage}` "
            + ("logs the deviation always." if args.stage in PLUGIN_STAGES else "does not support it.")
        )
    if args.deviation_metric:
        check_sft_loss_variant(args)
    uses_reference = args.stage in PLUGIN_STAGES or args.deviation_metric
    if args.precompute_ref_logps and not uses_reference:
        raise ValueError(
            f"`precompute_ref_logps: true` precomputes the reference of `stage: minorsft`, `stage: sft_dpo` or "
            f"`deviation_metric: true`; `stage: {args.stage}` uses no reference log-probs."
        )
    if args.ref_logps_cache_dir is not None and not args.precompute_ref_logps:
        raise ValueError(
            "`ref_logps_cache_dir` is set but `precompute_ref_logps` is false; set it to true or drop the key."
        )
    if args.ref_logps_cache_dir is not None and os.path.exists(args.ref_logps_cache_dir) and not os.path.isdir(
        args.ref_logps_cache_dir
    ):
        raise ValueError(f"`ref_logps_cache_dir: {args.ref_logps_cache_dir}` exists and is not a directory.")
    if args.stage not in PLUGIN_STAGES:
        return
    if not args.pref_beta > 0:
        raise ValueError(
            f"`pref_beta` must be > 0 for `stage: {args.stage}` (it is beta of Eq. 3/7; the paper's best is 0.04), "
            f"got {args.pref_beta}."
        )
    conflicting = [key for key in SFT_LOSS_VARIANTS if getattr(args, key)]
    if conflicting:
        raise ValueError(f"`{conflicting[0]}` replaces the SFT loss and cannot be combined with `stage: {args.stage}`.")
    _refuse_own_trainers(args, f"`stage: {args.stage}`")


def _refuse_own_trainers(args, what: str) -> None:
    for key in ("use_mca", "use_hyper_parallel"):
        if getattr(args, key):
            raise ValueError(f"`{key}: true` runs its own trainer; {what} does not support it.")


def check_sft_loss_variant(args) -> None:
    """``deviation_metric`` beside LLaMA-Factory's SFT loss variants: combinations that cannot run."""
    _refuse_own_trainers(args, "`deviation_metric: true`")
    variants = [key for key in SFT_LOSS_VARIANTS if getattr(args, key)]
    if len(variants) > 1:
        # LLaMA-Factory picks the first loss function but still runs ASFT's reference forward and hands its
        # logits to that function in place of `num_items_in_batch`.
        raise ValueError(
            f"`{variants[0]}` and `{variants[1]}` are both true; LLaMA-Factory trains with one SFT loss variant "
            "at a time. Keep one of them."
        )
    if args.use_asft_loss and args.finetuning_type == "lora" and args.ref_model is None:
        raise ValueError(
            "`use_asft_loss: true` with `finetuning_type: lora` needs `ref_model`: LLaMA-Factory loads no reference "
            "model for LoRA, and its ASFT loss calls one on every step. Set `ref_model` to the starting model."
        )


def validate_data_arguments(data_args, model_args, finetuning_args) -> None:
    """Checks that need the data and model arguments; run before anything is loaded."""
    from llamafactory.data.parser import get_dataset_list

    method = finetuning_args.sft_objective if finetuning_args.sft_objective != "sft" else "sft` with `deviation_metric"
    for key in ("dataset", "eval_dataset"):
        names = getattr(data_args, key) or []
        for name, attr in zip(names, get_dataset_list(names, data_args.dataset_dir)):
            if attr.ranking:
                raise ValueError(
                    f"`{key}: {name}` is a preference (ranking) dataset in "
                    f"{data_args.dataset_dir}/dataset_info.json; `stage: {method}` trains on supervised "
                    "(prompt, response) data. Give an SFT dataset, or use `stage: dpo` for preference data."
                )
    if data_args.packing and not data_args.neat_packing:
        raise ValueError(
            f"`packing: true` merges samples into one sequence, so `stage: {method}` cannot compute per-sample "
            "log-probs. Use `neat_packing: true` (per-sample log-probs are computed per packed segment)."
        )
    if finetuning_args.precompute_ref_logps and data_args.streaming:
        raise ValueError(
            "`precompute_ref_logps: true` looks samples up by their row in the dataset, which `streaming: true` does "
            "not have; turn one of them off."
        )
    if finetuning_args.sft_objective == "sft" and model_args.enable_liger_kernel:
        raise ValueError(
            "`deviation_metric: true` needs the logits, which `enable_liger_kernel: true` does not materialise in "
            "`stage: sft`; turn one of them off."
        )


# --- llamafactory.hparams.training_args: the DeepSpeed config file -------------------------------


def patch_training_arguments(module) -> None:
    base = module.TrainingArguments

    class TrainingArguments(base):
        def __post_init__(self):
            check_deepspeed_config(self.deepspeed)
            super().__post_init__()

    TrainingArguments.__module__ = base.__module__
    TrainingArguments.__qualname__ = base.__qualname__
    module.TrainingArguments = TrainingArguments


def check_deepspeed_config(value) -> None:
    """The ``deepspeed:`` file exists and holds a JSON object; run when the arguments are parsed.

    transformers reads the file itself, but reports a broken one only as ``Expecting value: line 1
    column 1`` (no file, no key) and a missing one without saying where a relative path was looked up.
    It also accepts a dict and base64-encoded JSON, which are left to it.
    """
    if not isinstance(value, str) or value.lstrip().startswith("{"):
        return
    if not os.path.isfile(value):
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            json.loads(base64.urlsafe_b64decode(value).decode("utf-8"))
            return
        raise ValueError(
            f"`deepspeed: {value}` is not a file (a relative path is resolved against the working directory, "
            f"{os.getcwd()}; the repository's recipes are run from its root)."
        )
    try:
        with open(value, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"`deepspeed: {value}` is not valid JSON: {error}.") from None
    if not isinstance(config, dict):
        raise ValueError(f"`deepspeed: {value}` must hold a JSON object, found a {type(config).__name__}.")


# --- llamafactory.train.tuner: routing and logging ------------------------------------------------


def patch_tuner(module) -> None:
    module.run_sft = functools.partial(run_sft_stage, module.run_sft)
    module.LogCallback = _make_log_callback(module.LogCallback)


def uses_plugin_trainer(finetuning_args) -> bool:
    return finetuning_args.sft_objective in PLUGIN_STAGES or finetuning_args.deviation_metric


def run_sft_stage(lf_run_sft, model_args, data_args, training_args, finetuning_args, generating_args, callbacks=None):
    """LLaMA-Factory's ``run_sft``, with ``MinorSFTTrainer`` in place of ``CustomSeq2SeqTrainer`` when needed."""
    if not uses_plugin_trainer(finetuning_args):
        return lf_run_sft(model_args, data_args, training_args, finetuning_args, generating_args, callbacks)

    validate_data_arguments(data_args, model_args, finetuning_args)
    from llamafactory.extras.ploting import plot_loss
    from llamafactory.train.sft import workflow

    from .trainer import MinorSFTTrainer

    trainer_cls = functools.partial(
        MinorSFTTrainer, model_args=model_args, data_args=data_args, neat_packing=data_args.neat_packing
    )

    def plot_loss_and_deviation(save_dictionary, keys=("loss",)):
        plot_loss(save_dictionary, keys=[*keys, *PLOT_KEYS])

    with _module_attributes(workflow, CustomSeq2SeqTrainer=trainer_cls, plot_loss=plot_loss_and_deviation):
        return lf_run_sft(model_args, data_args, training_args, finetuning_args, generating_args, callbacks)


@contextlib.contextmanager
def _module_attributes(module, **values):
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
            metrics = {key: value for key, value in latest.items() if key.removeprefix("eval_") in TRAIN_LOG_KEYS}
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


POST_IMPORT_HOOKS = {
    "llamafactory": check_llamafactory_version,
    "llamafactory.hparams.finetuning_args": patch_finetuning_arguments,
    "llamafactory.hparams.training_args": patch_training_arguments,
    "llamafactory.train.tuner": patch_tuner,
}


# --- llamafactory.webui: LLaMA-Board ---------------------------------------------------------------
#
# LLaMA-Board reads its stage dropdown, dataset filter and runner from ``TRAINING_STAGES``; the new stages
# map to supervised data there because neither is in ``STAGES_USE_PAIR_DATA``. The RLHF tab's Beta slider
# is reused as ``pref_beta``; a ``deviation_metric`` checkbox joins the SFT-only options.

BOARD_STAGES = {"MinorSFT": "minorsft", "SFT using DPO": "sft_dpo"}

BOARD_LOCALES = {
    "deviation_metric": {
        "en": {
            "label": "Deviation metric",
            "info": "Log the deviation from the reference model (MinorSFT paper, Eq. 8); the loss is unchanged "
            "(only for SFT; MinorSFT and SFT using DPO always log it).",
        },
        "ru": {
            "label": "Метрика отклонения",
            "info": "Записывать отклонение от эталонной модели (статья MinorSFT, формула 8); функция потерь не "
            "меняется (только для SFT; MinorSFT и SFT using DPO записывают его всегда).",
        },
        "zh": {
            "label": "偏离度指标",
            "info": "记录相对参考模型的偏离度（MinorSFT 论文公式 8），不改变损失（仅适用于 SFT；MinorSFT 与 "
            "SFT using DPO 始终记录）。",
        },
        "ko": {
            "label": "편차 지표",
            "info": "참조 모델로부터의 편차를 기록합니다 (MinorSFT 논문 식 8). 손실은 바뀌지 않습니다 (SFT에만 "
            "해당; MinorSFT와 SFT using DPO는 항상 기록).",
        },
        "ja": {
            "label": "乖離度メトリクス",
            "info": "参照モデルからの乖離度を記録します（MinorSFT 論文の式 8）。損失は変わりません（SFT のみ。"
            "MinorSFT と SFT using DPO は常に記録）。",
        },
    },
}

BOARD_ALERTS = {
    "err_plugin_beta": {
        "en": "Beta value (RLHF configurations) must be > 0 for MinorSFT and SFT using DPO; the paper's best is 0.04.",
        "ru": "Для MinorSFT и SFT using DPO бета (конфигурации RLHF) должна быть > 0; лучшее значение в статье — 0.04.",
        "zh": "MinorSFT 与 SFT using DPO 要求 Beta 参数（RLHF 参数设置）大于 0；论文中的最佳值为 0.04。",
        "ko": "MinorSFT와 SFT using DPO에는 0보다 큰 베타 값(RLHF 구성)이 필요합니다. 논문의 최적값은 0.04입니다.",
        "ja": "MinorSFT と SFT using DPO では Beta 値（RLHF 設定）は 0 より大きくなければなりません。論文の最良値は 0.04 です。",  # noqa: E501 (CJK counts double)
    },
}


def _patch_webui_stage_table(module) -> None:
    """``llamafactory.extras.constants``: the new stages follow "Supervised Fine-Tuning" in ``TRAINING_STAGES``.

    The dict is updated in place, so every module that imported it by name sees the same table.
    """
    stages = module.TRAINING_STAGES
    entries = [entry for entry in stages.items() if entry[0] not in BOARD_STAGES]
    position = 1 + [stage for _, stage in entries].index("sft")
    stages.clear()
    stages.update(entries[:position] + list(BOARD_STAGES.items()) + entries[position:])


def _patch_webui_locales(module) -> None:
    module.LOCALES.update(BOARD_LOCALES)
    module.ALERTS.update(BOARD_ALERTS)


def _patch_webui_control(module) -> None:
    """The board's live plot (``get_trainer_info`` calls ``gen_loss_plot`` by its name in ``control``)."""
    module.gen_loss_plot = functools.partial(gen_loss_and_deviation_plot, module.gen_loss_plot)


def gen_loss_and_deviation_plot(lf_gen_loss_plot, trainer_log):
    """LLaMA-Board's loss plot, with the deviation on a second y axis when the log has it."""
    figure = lf_gen_loss_plot(trainer_log)
    points = [(log["current_steps"], log["deviation"]) for log in trainer_log if "deviation" in log]
    if points:
        axis = figure.axes[0].twinx()
        steps, deviations = zip(*points)
        axis.plot(steps, deviations, color="#ff7f0e", label="deviation")
        axis.set_ylabel("deviation")
        axis.legend(loc="upper center")
    return figure


def _patch_webui_runner(module) -> None:
    runner_cls = module.Runner
    lf_initialize, lf_parse_train_args = runner_cls._initialize, runner_cls._parse_train_args

    def _initialize(self, data, do_train, from_preview):
        return lf_initialize(self, data, do_train, from_preview) or check_board_values(self, data, do_train)

    def _parse_train_args(self, data):
        return add_board_train_args(self, data, lf_parse_train_args(self, data))

    runner_cls._initialize = _initialize
    runner_cls._parse_train_args = _parse_train_args


def _board_value(runner, data, elem_id):
    return data[runner.manager.get_elem_by_id(elem_id)]


def check_board_values(runner, data, do_train) -> str:
    """The board's own error string (empty when fine), shown before a command is previewed or launched."""
    from llamafactory.extras.constants import TRAINING_STAGES
    from llamafactory.webui.locales import ALERTS

    stage = TRAINING_STAGES[_board_value(runner, data, "train.training_stage")] if do_train else None
    if stage in PLUGIN_STAGES and not _board_value(runner, data, "train.pref_beta") > 0:
        return ALERTS["err_plugin_beta"][_board_value(runner, data, "top.lang")]
    return ""


def add_board_train_args(runner, data, args):
    """LLaMA-Board passes Beta only to dpo/kto; the new stages need it too, and plain SFT its metric switch."""
    if args["stage"] in PLUGIN_STAGES:
        args["pref_beta"] = _board_value(runner, data, "train.pref_beta")
    elif args["stage"] == "sft" and _board_value(runner, data, "train.deviation_metric"):
        args["deviation_metric"] = True
    return args


def _patch_webui_train_tab(module) -> None:
    module.create_train_tab = functools.partial(create_train_tab, module.create_train_tab)


def create_train_tab(lf_create_train_tab, engine):
    """LLaMA-Board's Train tab with a ``deviation_metric`` checkbox beside "Train on prompt".

    LLaMA-Factory wires preview, start and save/load arguments to the set returned by
    ``manager.get_base_elems()``, so the checkbox joins that set before the tab is built, and is rendered
    afterwards into the box that holds "Train on prompt" and "Mask history".
    """
    import gradio as gr

    deviation_metric = gr.Checkbox(value=False, render=False)
    lf_base_elems = engine.manager.get_base_elems
    with _module_attributes(engine.manager, get_base_elems=lambda: lf_base_elems() | {deviation_metric}):
        elems = lf_create_train_tab(engine)

    sft_options = elems["train_on_prompt"].parent
    parent = sft_options.parent
    with sft_options:
        deviation_metric.render()
    sft_options.parent = parent  # entering a built container again re-parents it to the current context
    return {**elems, "deviation_metric": deviation_metric}


def _patch_webui_components(module) -> None:
    """``llamafactory.webui.components`` re-exports ``create_train_tab``, which ``interface`` imports by name."""
    module.create_train_tab = module.train.create_train_tab


POST_IMPORT_HOOKS.update(
    {
        "llamafactory.extras.constants": _patch_webui_stage_table,
        "llamafactory.webui.locales": _patch_webui_locales,
        "llamafactory.webui.control": _patch_webui_control,
        "llamafactory.webui.runner": _patch_webui_runner,
        "llamafactory.webui.components.train": _patch_webui_train_tab,
        "llamafactory.webui.components": _patch_webui_components,
    }
)
