"""LLaMA-Board (``llamafactory-cli webui``): the new stages in the Train tab, Beta, the deviation metric and MinorDPO.

LLaMA-Board reads its stage dropdown, dataset filter and runner from ``TRAINING_STAGES``; the new stages map to
supervised data there because neither is in ``STAGES_USE_PAIR_DATA``. The RLHF tab's Beta slider is reused as
``pref_beta``; a ``deviation_metric`` checkbox joins the SFT-only options; the RLHF tab's loss-type dropdown
(``pref_loss``, which LLaMA-Board passes for DPO) offers ``minor_dpo``.
"""

import functools

from .arguments import MINOR_DPO, PLUGIN_STAGES
from .training import module_attributes

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


def patch_stage_table(module) -> None:
    """``llamafactory.extras.constants``: the new stages follow "Supervised Fine-Tuning" in ``TRAINING_STAGES``.

    The dict is updated in place, so every module that imported it by name sees the same table.
    """
    stages = module.TRAINING_STAGES
    entries = [entry for entry in stages.items() if entry[0] not in BOARD_STAGES]
    position = 1 + [stage for _, stage in entries].index("sft")
    stages.clear()
    stages.update(entries[:position] + list(BOARD_STAGES.items()) + entries[position:])


def patch_locales(module) -> None:
    module.LOCALES.update(BOARD_LOCALES)
    module.ALERTS.update(BOARD_ALERTS)


def patch_control(module) -> None:
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


def patch_runner(module) -> None:
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


def patch_train_tab(module) -> None:
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
    with module_attributes(engine.manager, get_base_elems=lambda: lf_base_elems() | {deviation_metric}):
        elems = lf_create_train_tab(engine)

    sft_options = elems["train_on_prompt"].parent
    parent = sft_options.parent
    with sft_options:
        deviation_metric.render()
    sft_options.parent = parent  # entering a built container again re-parents it to the current context
    offer_minor_dpo(elems["pref_loss"])
    return {**elems, "deviation_metric": deviation_metric}


def offer_minor_dpo(pref_loss) -> None:
    """The loss-type dropdown lists LLaMA-Factory's losses in a fixed list; MinorDPO (Eq. 2) joins them."""
    if MINOR_DPO not in [value for _, value in pref_loss.choices]:
        pref_loss.choices = [*pref_loss.choices, (MINOR_DPO, MINOR_DPO)]


def patch_components(module) -> None:
    """``llamafactory.webui.components`` re-exports ``create_train_tab``, which ``interface`` imports by name."""
    module.create_train_tab = module.train.create_train_tab
