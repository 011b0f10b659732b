"""LLaMA-Board with the plugin, built in-process: stage choices, dataset filter, runner arguments, save/load,
languages and the live plot. Event handlers are called through the app's own Gradio wiring (the components
each event was registered with), so a control that is not wired to "Preview command" or "Load arguments"
fails here."""

import json
from pathlib import Path

import pytest
import yaml

from helpers import write_sft_dataset

BETA = 0.04


class Board:
    """The Gradio app of ``llamafactory-cli webui`` and the handlers its Train tab registered."""

    def __init__(self, demo):
        self.demo = demo
        self.handlers = list(demo.fns.values())
        self.preview = self.handler("Runner.preview_train")
        self.runner = self.preview.fn.__self__
        self.manager = self.runner.manager

    def handler(self, qualname, inputs=None):
        matches = [
            block_fn
            for block_fn in self.handlers
            if getattr(block_fn.fn, "__qualname__", None) == qualname
            and (inputs is None or block_fn.inputs == [self.manager.get_elem_by_id(i) for i in inputs])
        ]
        assert matches, f"no handler {qualname} with inputs {inputs}"
        return matches[0]

    def elem(self, elem_id):
        return self.manager.get_elem_by_id(elem_id)

    def train_values(self, dataset_dir, **overrides):
        """Values of the components that "Preview command" reads, as a fresh page shows them plus ``overrides``
        (keys are element ids with ``.`` written as ``__``)."""
        values = {block: block.value for block in self.preview.inputs}
        values.update(
            {
                self.elem("top.lang"): "en",
                self.elem("top.model_name"): "Custom",
                self.elem("top.model_path"): "/models/tiny",
                self.elem("train.dataset_dir"): str(dataset_dir),
                self.elem("train.dataset"): ["tiny_sft"],
                self.elem("train.compute_type"): "fp32",
                self.elem("train.output_dir"): "train_board_test",
                self.elem("train.config_path"): "board_test.yaml",
            }
        )
        values.update({self.elem(key.replace("__", ".")): value for key, value in overrides.items()})
        return values

    def preview_text(self, values):
        (outputs,) = list(self.preview.fn(values))
        return outputs[self.elem("train.output_box")]


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    from llamafactory.webui.interface import create_ui

    workdir = tmp_path_factory.mktemp("board")  # the board writes llamaboard_cache/, llamaboard_config/, saves/
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        yield Board(create_ui())


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data")
    write_sft_dataset(directory, "tiny_sft")
    write_sft_dataset(directory, "tiny_pairs", ranking=True)
    return directory


def test_stage_dropdown_offers_new_stages_beside_llamafactory_stages(board):
    stage = board.elem("train.training_stage")
    labels = [label for label, _ in stage.choices]
    assert labels[:3] == ["Supervised Fine-Tuning", "MinorSFT", "SFT using DPO"]
    assert {"Reward Modeling", "PPO", "DPO", "KTO", "Pre-Training"} <= set(labels)
    assert stage.value == "Supervised Fine-Tuning"


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        ("MinorSFT", ["tiny_sft"]),
        ("SFT using DPO", ["tiny_sft"]),
        ("Supervised Fine-Tuning", ["tiny_sft"]),
        ("DPO", ["tiny_pairs"]),
    ],
)
def test_dataset_list_shows_supervised_datasets_for_new_stages(board, dataset_dir, stage, expected):
    list_datasets = board.handler("list_datasets", inputs=["train.dataset_dir", "train.training_stage"])
    dropdown = list_datasets.fn(str(dataset_dir), stage)
    assert [value for _, value in dropdown.choices] == expected


@pytest.mark.parametrize(("stage", "name"), [("MinorSFT", "minorsft"), ("SFT using DPO", "sft_dpo")])
def test_preview_command_has_stage_and_beta(board, dataset_dir, stage, name):
    text = board.preview_text(board.train_values(dataset_dir, train__training_stage=stage, train__pref_beta=BETA))
    assert f"--stage {name} " in text
    assert f"--pref_beta {BETA} " in text
    assert "--deviation_metric" not in text


def test_dpo_loss_type_offers_minor_dpo_and_preview_shows_it(board, dataset_dir, tiny_model_dir):
    from llamafactory.hparams import get_train_args
    from llamafactory.webui.common import save_cmd

    pref_loss = board.elem("train.pref_loss")
    assert [value for _, value in pref_loss.choices] == [
        "sigmoid",
        "hinge",
        "ipo",
        "kto_pair",
        "orpo",
        "simpo",
        "minor_dpo",
    ]
    values = board.train_values(
        dataset_dir,
        train__training_stage="DPO",
        train__dataset=["tiny_pairs"],
        train__pref_loss="minor_dpo",
        train__pref_beta=0.2,
        top__model_path=str(tiny_model_dir),
    )
    text = board.preview_text(values)
    assert "--stage dpo " in text and "--pref_loss minor_dpo " in text and "--pref_beta 0.2 " in text
    args = board.runner._parse_train_args(values)
    training_args = yaml.safe_load(Path(save_cmd(args)).read_text(encoding="utf-8"))
    _, _, _, finetuning_args, _ = get_train_args(training_args)
    assert (finetuning_args.stage, finetuning_args.pref_loss) == ("dpo", "minor_dpo")


def test_runner_arguments_pass_llamafactory_parser(board, dataset_dir, tiny_model_dir):
    """The dict the runner builds, written as LLaMA-Board writes training_args.yaml, parses with the plugin."""
    from llamafactory.hparams import get_train_args
    from llamafactory.webui.common import save_cmd

    values = board.train_values(
        dataset_dir, train__training_stage="MinorSFT", train__pref_beta=BETA, top__model_path=str(tiny_model_dir)
    )
    args = board.runner._parse_train_args(values)
    assert (args["stage"], args["pref_beta"]) == ("minorsft", BETA)
    training_args = yaml.safe_load(Path(save_cmd(args)).read_text(encoding="utf-8"))
    _, _, _, finetuning_args, _ = get_train_args(training_args)
    assert (finetuning_args.sft_objective, finetuning_args.pref_beta) == ("minorsft", BETA)


@pytest.mark.parametrize(("checked", "expected"), [(True, True), (False, None)])
def test_sft_deviation_metric_switch(board, dataset_dir, checked, expected):
    values = board.train_values(dataset_dir, train__deviation_metric=checked, train__pref_beta=BETA)
    args = board.runner._parse_train_args(values)
    assert (args["stage"], args.get("deviation_metric"), args.get("pref_beta")) == ("sft", expected, None)
    assert ("--deviation_metric True" in board.preview_text(values)) is checked


def test_switch_is_ignored_by_other_stages(board, dataset_dir):
    for stage in ("MinorSFT", "DPO"):
        values = board.train_values(dataset_dir, train__training_stage=stage, train__deviation_metric=True)
        assert "deviation_metric" not in board.runner._parse_train_args(values)
    dpo_values = board.train_values(dataset_dir, train__training_stage="DPO", train__pref_beta=0.2)
    assert board.runner._parse_train_args(dpo_values)["pref_beta"] == 0.2  # LLaMA-Factory's own path, unchanged


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_zero_beta_is_refused_in_the_board_language(board, dataset_dir, lang):
    from llamafactory.webui.locales import ALERTS

    values = board.train_values(dataset_dir, top__lang=lang, train__training_stage="SFT using DPO", train__pref_beta=0)
    text = board.preview_text(values)
    assert text == ALERTS["err_plugin_beta"][lang]
    assert "llamafactory-cli train" not in text


@pytest.mark.parametrize(
    "overrides",
    [
        {"train__training_stage": "MinorSFT", "train__pref_beta": BETA},
        {"train__training_stage": "Supervised Fine-Tuning", "train__deviation_metric": True},
    ],
)
def test_save_and_load_arguments_keep_stage_beta_and_switch(board, dataset_dir, overrides):
    save = board.handler("Runner.save_args")
    load = board.handler("Runner.load_args")
    saved = board.train_values(dataset_dir, **overrides)
    save.fn(saved)

    loaded = load.fn("en", "board_test.yaml")
    assert set(loaded) <= set(load.outputs), "Load arguments returned a component it is not wired to"
    for key, value in overrides.items():
        assert loaded[board.elem(key.replace("__", "."))] == value


def test_labels_follow_board_language(board):
    change_lang = board.handler("Engine.change_lang")
    checkbox = board.elem("train.deviation_metric")
    labels = {lang: change_lang.fn(lang)[checkbox].label for _, lang in board.elem("top.lang").choices}
    assert labels["en"] == "Deviation metric"
    assert labels["zh"] == "偏离度指标"
    assert len(set(labels.values())) == len(labels), labels


def test_deviation_metric_sits_with_the_sft_options(board):
    checkbox = board.elem("train.deviation_metric")
    siblings = checkbox.parent.children
    assert board.elem("train.train_on_prompt") in siblings and board.elem("train.mask_history") in siblings
    layout = json.dumps(board.demo.get_config_file()["layout"])
    assert f'"id": {checkbox._id}' in layout


def test_live_plot_shows_deviation(tmp_path):
    from llamafactory.webui import control

    log = [
        {
            "current_steps": step,
            "total_steps": 3,
            "loss": 2.0 - step / 10,
            "deviation": 0.01 * step,
            "percentage": 33.3 * step,
            "elapsed_time": "0:00:01",
            "remaining_time": "0:00:02",
        }
        for step in (1, 2, 3)
    ]
    figure = control.gen_loss_plot(log)
    deviation_axes = [axis for axis in figure.axes if axis.get_ylabel() == "deviation"]
    assert len(deviation_axes) == 1
    assert list(deviation_axes[0].lines[0].get_ydata()) == [0.01, 0.02, 0.03]

    plain = control.gen_loss_plot([{key: value for key, value in entry.items() if key != "deviation"} for entry in log])
    assert [axis.get_ylabel() for axis in plain.axes] == ["loss"]
