"""Test-only: holds a process at one named point of training, so that a test can SIGKILL it exactly there.

A test puts this folder on ``PYTHONPATH`` of the ``llamafactory-cli train`` (or sweep) it starts, with
``MINORSFT_TEST_PAUSE_AT`` naming the point and ``MINORSFT_TEST_PAUSED_FILE`` a file to create on arrival. Python
imports ``sitecustomize`` at start-up; this one patches the module of the point once that module has been imported,
and on arrival writes the file and blocks the main thread for good (other threads, such as LLaMA-Factory's log
writer, go on). Nothing else changes: without the variable this file does nothing.

Points (``NAME:ARGUMENT``):

- ``cache_replace``: the end of the reference pass, its cache file written to its temporary name, not yet renamed;
- ``step_begin:N``: the start of step N+1, after step N was logged (and saved, if it was a saving step);
- ``save_optimizer:checkpoint-N``: inside the save of checkpoint-N, its weights written, not yet its optimizer
  state or ``trainer_state.json`` (``Trainer._save_optimizer_and_scheduler``);
- ``evaluation_batch:N``: an evaluation, before its N-th batch (``Trainer.prediction_step``).
"""

import functools
import importlib.abc
import os
import sys
import threading

POINT = os.environ.get("MINORSFT_TEST_PAUSE_AT", "")
NAME, _, ARGUMENT = POINT.partition(":")


def pause() -> None:
    marker = os.environ["MINORSFT_TEST_PAUSED_FILE"]
    with open(marker + ".tmp", "w") as f:
        f.write(POINT)
    os.replace(marker + ".tmp", marker)
    threading.Event().wait()


def pause_at_call(function, number: int, counts=lambda *args, **kwargs: True):
    """``function``, pausing before the ``number``-th of its calls for which ``counts`` holds."""
    calls = 0

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        nonlocal calls
        if counts(*args, **kwargs):
            calls += 1
            if calls == number:
                pause()
        return function(*args, **kwargs)

    return wrapper


class _OsWithPausingReplace:
    """``os`` for one module, whose ``replace`` pauses first."""

    def __getattr__(self, name):
        return getattr(os, name)

    def replace(self, *args, **kwargs):
        pause()


def patch_ref_cache(module) -> None:
    if NAME == "cache_replace":
        module.os = _OsWithPausingReplace()


def patch_trainer_callback(module) -> None:
    if NAME == "step_begin":
        handler = module.CallbackHandler
        handler.on_step_begin = pause_at_call(
            handler.on_step_begin, 1, lambda self, args, state, control: state.global_step == int(ARGUMENT)
        )


def patch_trainer(module) -> None:
    trainer = module.Trainer
    if NAME == "save_optimizer":
        trainer._save_optimizer_and_scheduler = pause_at_call(
            trainer._save_optimizer_and_scheduler, 1, lambda self, output_dir: os.path.basename(output_dir) == ARGUMENT
        )
    elif NAME == "evaluation_batch":
        trainer.prediction_step = pause_at_call(trainer.prediction_step, int(ARGUMENT))


PATCHES = {
    "llamafactory_minorsft.train.ref_cache": patch_ref_cache,
    "transformers.trainer_callback": patch_trainer_callback,
    "transformers.trainer": patch_trainer,
}


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        PATCHES[module.__name__](module)

    def __getattr__(self, name):  # get_source (tracebacks), is_package, ...
        return getattr(self._loader, name)


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    spec.loader = _PatchingLoader(spec.loader)
                    return spec
        return None


if POINT:
    sys.meta_path.insert(0, _PatchAfterImport())
