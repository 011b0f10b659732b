"""Plugin activation and argument validation, in-process and through a bare Python start-up."""

import json
import subprocess
import sys
import types

import pytest
from llamafactory_minorsft import _autoload, hooks
from llamafactory_minorsft.hooks import arguments, training


def python(code: str, **env) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )


def test_startup_hook_is_installed_and_costs_no_heavy_import():
    result = python(
        "import sys, json; print(json.dumps({"
        "'hook': any(type(f).__name__ == '_PostImportFinder' for f in sys.meta_path),"
        "'torch': 'torch' in sys.modules, 'llamafactory': 'llamafactory' in sys.modules,"
        "'hooks': 'llamafactory_minorsft.hooks' in sys.modules}))"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"hook": True, "torch": False, "llamafactory": False, "hooks": False}


def test_importing_llamafactory_activates_the_plugin_without_an_extra_import():
    """Also the comparisons of ``test_stock_untouched`` mean nothing unless ``MINORSFT_DISABLE=0`` activates the
    plugin's hooks (its ``LogCallback`` too) and ``MINORSFT_DISABLE=1`` does not."""
    result = python(
        "from llamafactory.hparams import FinetuningArguments, get_train_args; import llamafactory.train.tuner as t;"
        "print(FinetuningArguments(stage='minorsft').sft_objective, t.run_sft.func.__name__, t.LogCallback.__module__,"
        "t._training_function.func.__name__)",
        MINORSFT_DISABLE="0",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "minorsft",
        "run_sft_stage",
        "llamafactory_minorsft.hooks.training",
        "run_training_function",
    ]


def test_disable_switch():
    """``MINORSFT_DISABLE=1`` installs no import hook, the one way the plugin patches LLaMA-Factory."""
    result = python(
        "import sys; from llamafactory.hparams import FinetuningArguments;"
        "print(any(type(f).__name__ == '_PostImportFinder' for f in sys.meta_path),"
        "hasattr(FinetuningArguments(), 'sft_objective'))",
        MINORSFT_DISABLE="1",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("world_size, sleeps", [(None, []), ("1", []), ("2", [training.SHUTDOWN_GRACE_SECONDS])])
def test_a_rank_of_a_multi_rank_run_waits_after_training_before_it_shuts_down(monkeypatch, world_size, sleeps):
    """Only after LLaMA-Factory's whole run, and only with several ranks (the gloo threads it waits for exist only
    there; the two-rank tests are the ones that aborted without it, about 1 launch in 6 of the ZeRO-3 MinorDPO one)."""
    events = []
    monkeypatch.setattr(training.time, "sleep", lambda seconds: events.append(("sleep", seconds)))
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    config = {"args": {"stage": "sft"}}
    training.run_training_function(lambda given: events.append(("run", given)), config)
    assert events == [("run", config), *(("sleep", seconds) for seconds in sleeps)]


def test_hook_lists_are_in_sync():
    assert set(_autoload.HOOKED_MODULES) == set(hooks.POST_IMPORT_HOOKS)


def test_unsupported_llamafactory_version_is_refused_with_the_range():
    with pytest.raises(ImportError, match=r"supports LLaMA-Factory >=0\.9\.5,<0\.9\.6, found 0\.9\.4"):
        hooks.check_llamafactory_version(types.SimpleNamespace(__version__="0.9.4"))
    hooks.check_llamafactory_version(types.SimpleNamespace(__version__="0.9.5"))


def parse(tmp_path, **overrides):
    from llamafactory.hparams import get_train_args

    args = {
        "model_name_or_path": "unused",
        "stage": "minorsft",
        "pref_beta": 0.04,
        "do_train": True,
        "dataset": "tiny_sft",
        "template": "default",
        "output_dir": str(tmp_path / "out"),
        "report_to": "none",
    }
    args.update(overrides)
    return get_train_args({k: v for k, v in args.items() if v is not None})


@pytest.mark.parametrize("stage", ["minorsft", "sft_dpo"])
def test_plugin_stages_run_as_sft_for_llamafactory_and_report_their_name(tmp_path, stage):
    _, data_args, _, finetuning_args, _ = parse(tmp_path, stage=stage, pref_beta=0.1)
    assert finetuning_args.stage == "sft" and finetuning_args.sft_objective == stage
    assert finetuning_args.pref_beta == 0.1
    assert finetuning_args.to_dict()["stage"] == stage
    assert data_args.packing is False
    assert not (tmp_path / "out").exists()


def test_plain_sft_is_untouched(tmp_path):
    _, _, _, finetuning_args, _ = parse(tmp_path, stage="sft", pref_beta=None)
    assert finetuning_args.sft_objective == "sft" and not finetuning_args.deviation_metric
    assert not training.uses_plugin_trainer(finetuning_args)
    _, _, _, finetuning_args, _ = parse(tmp_path, stage="sft", deviation_metric=True)
    assert training.uses_plugin_trainer(finetuning_args)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"stage": "minorsf"},
            r"Unknown `stage: minorsf`\. Valid stages: pt, sft, rm, ppo, dpo, kto, minorsft, sft_dpo",
        ),
        ({"pref_beta": 0.0}, r"`pref_beta` must be finite and > 0 for `stage: minorsft`"),
        ({"stage": "sft_dpo", "pref_beta": -0.1}, r"`pref_beta` must be finite and > 0 for `stage: sft_dpo`"),
        ({"stage": "kto", "deviation_metric": True}, r"is for `stage: sft` .* and `stage: dpo`"),
        ({"deviation_metric": True}, r"`stage: minorsft` logs the deviation always"),
        ({"use_dft_loss": True}, r"`use_dft_loss` replaces the SFT loss"),
    ],
)
def test_bad_arguments_fail_at_parse_time(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        parse(tmp_path, **overrides)
    assert not (tmp_path / "out").exists()


def test_deviation_metric_with_liger_kernel_is_refused(tmp_path):
    from helpers import write_sft_dataset

    write_sft_dataset(tmp_path / "data")
    model_args, data_args, _, finetuning_args, _ = parse(
        tmp_path, stage="sft", deviation_metric=True, dataset_dir=str(tmp_path / "data")
    )
    arguments.validate_data_arguments(data_args, model_args, finetuning_args)
    model_args.enable_liger_kernel = True  # set after parsing: liger-kernel itself is not installed here
    with pytest.raises(ValueError, match="`enable_liger_kernel: true` does not materialise"):
        arguments.validate_data_arguments(data_args, model_args, finetuning_args)


@pytest.mark.slow
def test_a_regular_wheel_ships_the_startup_hook(tmp_path):
    """`pip install .` (not editable) must activate the plugin too: the .pth sits at the wheel's root."""
    import zipfile

    from helpers import REPO_ROOT as repo

    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(repo), "-w", str(tmp_path / "dist")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("llamafactory_minorsft-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "llamafactory_minorsft.pth" in names
    assert {"llamafactory_minorsft/train/losses.py", "llamafactory_minorsft/hooks/__init__.py"} <= set(names)
    site_dir = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site_dir)
    # -S: no site-packages (so not this checkout's editable install); a site directory added by hand
    # processes its .pth files exactly as site-packages does at start-up.
    result = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            f"import site, sys; site.addsitedir({str(site_dir)!r});"
            "import llamafactory_minorsft; print(llamafactory_minorsft.__file__);"
            "print(any(type(f).__name__ == '_PostImportFinder' for f in sys.meta_path))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    location, hooked = result.stdout.split()
    assert location.startswith(str(site_dir)) and hooked == "True"
