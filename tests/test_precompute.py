"""``precompute_ref_logps``: the precomputed reference gives the online reference's losses and gradients,
and its cache is reused only for the same reference model, tokenised data, template and cutoff_len.

The end-to-end cases train the tiny random Llama through LLaMA-Factory's ``run_exp`` (what ``llamafactory-cli
train`` runs), all of them one after another in one subprocess that runs this file as a script and records every
optimizer step's loss and gradient (``recorded``, once per module). Two ranks: ``test_invariance`` (DDP) and
``test_zero3`` (ZeRO-3); ``streaming`` is refused in ``test_zero3`` too.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import OFFLINE_ENV, TRAIN_ENV, tiny_train_config, write_sft_dataset
from independent_step import (
    assert_eval_ref_logps_as_expected,
    assert_logged_as_expected,
    assert_step_as_expected,
    expected_step,
    load_tokenized_samples,
    sgd_step_config,
)

HERE = Path(__file__).resolve()


# --- the recorder (runs in a subprocess) ------------------------------------------------------------


def _record_runs(runs_path: str, result_path: str) -> None:
    """Train each run of ``runs_path`` (a JSON list of LLaMA-Factory argument dicts) with ``run_exp``;
    save per run the loss, deviation and flat gradient of every optimizer step, the eval metrics, the
    cache files at the end, how many reference models were created and still alive at the first step, and
    the traceback of a run that raised (the next run still runs)."""
    import gc
    import traceback
    import weakref

    from llamafactory.train.tuner import run_exp
    from llamafactory_minorsft.train import reference, trainer
    from transformers import TrainerCallback

    created = []
    create_ref_model = trainer.create_ref_model

    def counting_create_ref_model(*args, **kwargs):
        model = create_ref_model(*args, **kwargs)
        created.append(weakref.ref(model) if model is not None else (lambda: None))
        return model

    # The trainer loads the online reference, the shared reference module the one for the precomputed pass.
    trainer.create_ref_model = reference.create_ref_model = counting_create_ref_model

    class Recorder(TrainerCallback):
        def __init__(self, cache_dir):
            self.cache_dir = cache_dir
            self.record = {
                "losses": [],
                "deviations": [],
                "grads": [],
                "eval": [],
                "references_alive": None,
                "error": None,
            }

        def on_step_begin(self, args, state, control, **kwargs):
            if self.record["references_alive"] is None:
                gc.collect()
                self.record["references_alive"] = sum(ref() is not None for ref in created)

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads = [p.grad.detach().flatten().float().cpu() for p in model.parameters() if p.grad is not None]
            self.record["grads"].append(torch.cat(grads))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                self.record["losses"].append(logs["loss"])
                self.record["deviations"].append(logs.get("deviation"))

        def on_train_end(self, args, state, control, **kwargs):
            if self.cache_dir is not None:
                self.record["cache_files"] = _cache_files(Path(self.cache_dir))

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            keys = ("eval_loss", "eval_deviation", "eval_coef_mean", "eval_logps/policy", "eval_logps/ref")
            self.record["eval"].append({k: v for k, v in metrics.items() if k in keys})

    results = []
    for run in json.loads(Path(runs_path).read_text()):
        created.clear()
        recorder = Recorder(run.get("ref_logps_cache_dir"))
        try:
            run_exp(args=run, callbacks=[recorder])
        except Exception:
            recorder.record["error"] = traceback.format_exc()
        recorder.record["references_created"] = len(created)
        recorder.record["grads"] = torch.stack(recorder.record["grads"]) if recorder.record["grads"] else None
        results.append(recorder.record)
    torch.save(results, result_path)


def _record(runs: list[dict], workdir: Path) -> list[dict]:
    runs_path, result_path = workdir / "runs.json", workdir / "recorded.pt"
    runs_path.write_text(json.dumps(runs))
    env = {**os.environ, **OFFLINE_ENV, **TRAIN_ENV}
    env.pop("MINORSFT_DISABLE", None)
    proc = subprocess.run(
        [sys.executable, str(HERE), str(runs_path), str(result_path)],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(result_path, weights_only=False)


# --- every end-to-end run of this module, recorded once ---------------------------------------------


def _train_args(model_dir, data_dir, output_dir, **overrides) -> dict:
    """The shared tiny config, with shuffled data in 2-step accumulation, an eval set and raw gradients."""
    settings = {
        "pref_beta": 0.1,
        "template": "smollm2",
        "gradient_accumulation_steps": 2,
        "per_device_eval_batch_size": 3,
        "max_steps": 3,
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0.0,  # record the raw gradient
        "val_size": 4,
        "eval_strategy": "steps",
        "eval_steps": 2,
        "seed": 7,
        "plot_loss": False,
    }
    return tiny_train_config(model_dir, data_dir, output_dir, **{**settings, **overrides})


# Each trained online and precomputed. Full and LoRA train 4 steps with checkpoints at 2, to be resumed. (The
# looked-up values reach every objective's loss as the online ones do; each loss itself: test_invariance.)
VARIANTS = {
    "full": {"max_steps": 4, "save_strategy": "steps", "save_steps": 2},
    "lora": {
        "finetuning_type": "lora",
        "lora_target": "all",
        "learning_rate": 1.0e-2,
        "max_steps": 4,
        "save_strategy": "steps",
        "save_steps": 2,
    },
    "neat_packing": {"neat_packing": True, "per_device_train_batch_size": 1, "val_size": 2},
}
SWEEP_RUNS = [("first", 1.0, 1.0, "computed"), ("second", 0.6, 0.5, "loaded")]  # name, beta, lr, reference pass


@pytest.fixture(scope="module")
def recorded(tiny_model_dir, policy_and_reference, tmp_path_factory) -> dict:
    workdir = tmp_path_factory.mktemp("precompute")
    data_dir = write_sft_dataset(workdir / "data", num_samples=16)
    runs = {}

    def add(name, data=data_dir, **overrides):
        runs[name] = _train_args(tiny_model_dir, data, workdir / name, **overrides)

    for name, overrides in VARIANTS.items():
        add(f"{name}-online", **overrides)
        add(f"{name}-precomputed", precompute_ref_logps=True, ref_logps_cache_dir=str(workdir / name), **overrides)
    # Resumed from the precomputed run's checkpoint-2 without the cache (full: a reference copy is loaded; LoRA:
    # its adapters disabled), and with it (no reference at all; the same for both).
    for name in ("full", "lora"):
        resume = {**VARIANTS[name], "precompute_ref_logps": True}
        checkpoint = str(workdir / f"{name}-precomputed" / "checkpoint-2")
        if name == "full":
            add(
                "full-resumed-hit", ref_logps_cache_dir=str(workdir / name), resume_from_checkpoint=checkpoint, **resume
            )
        add(
            f"{name}-resumed-miss",
            ref_logps_cache_dir=str(workdir / f"{name}-empty-cache"),
            resume_from_checkpoint=checkpoint,
            **resume,
        )
    for precompute in (False, True):  # evaluation only: the eval set's values are computed at evaluate()
        add(
            f"eval-only-{'precomputed' if precompute else 'online'}",
            precompute_ref_logps=precompute,
            do_train=False,
            do_eval=True,
            eval_dataset="tiny_sft",
            val_size=0,
            eval_strategy="no",
        )

    # A separate `ref_model`, online, then precomputed into `cache`, then again with the same key; then another
    # dataset, then another reference (1 step each): each computes a new file. (Every input of the key, and that
    # each changes it: test_cache_key_changes_with_each_input.)
    reference = workdir / "reference"
    shutil.copytree(tiny_model_dir, reference)
    other_reference, other_data = _other_reference(reference, workdir), _other_data(workdir)
    cache = str(workdir / "cache")
    add("ref_model-online", ref_model=str(reference))
    for name in ("ref_model-precomputed", "ref_model-same-key"):
        add(name, ref_model=str(reference), precompute_ref_logps=True, ref_logps_cache_dir=cache)
    one_step = {"precompute_ref_logps": True, "ref_logps_cache_dir": cache, "max_steps": 1, "eval_strategy": "no"}
    add("key-dataset", data=other_data, ref_model=str(reference), **one_step)
    add("key-model", ref_model=str(other_reference), **one_step)

    # The independent step: a `ref_model` that differs from the policy, precomputed, then loaded by a second
    # run of the same model and data at another β and learning rate.
    policy, noisy_reference = policy_and_reference
    sweep_data = write_sft_dataset(workdir / "sweep-data", num_samples=8)
    write_sft_dataset(sweep_data, "tiny_eval", num_samples=4)
    for name, beta, learning_rate, _ in SWEEP_RUNS:
        runs[f"sweep-{name}"] = sgd_step_config(
            policy,
            noisy_reference,
            sweep_data,
            workdir / f"sweep-{name}",
            beta,
            learning_rate,
            precompute_ref_logps=True,
            ref_logps_cache_dir=str(workdir / "sweep-cache"),
            do_eval=True,
            eval_dataset="tiny_eval",
            per_device_eval_batch_size=3,
        )

    results = dict(zip(runs, _record(list(runs.values()), workdir)))
    for name, result in results.items():
        result["config"] = runs[name]
    return {"workdir": workdir, **results}


def _other_reference(reference: Path, workdir: Path) -> Path:
    from safetensors.torch import load_file, save_file

    other = workdir / "other-reference"
    shutil.copytree(reference, other)
    weights = load_file(other / "model.safetensors")
    save_file(
        {k: v * 1.5 if v.dim() == 2 else v for k, v in weights.items()},
        other / "model.safetensors",
        metadata={"format": "pt"},
    )
    return other


def _other_data(workdir: Path) -> Path:
    other = write_sft_dataset(workdir / "other-data", num_samples=16)
    (other / "tiny_sft.json").write_text((other / "tiny_sft.json").read_text().replace("Indeed", "Surely"))
    return other


def _run(recorded: dict, name: str) -> dict:
    run = recorded[name]
    assert run["error"] is None, f"{name}: {run['error']}"
    return run


def _assert_same_training(online: dict, precomputed: dict, steps=slice(None)) -> None:
    assert len(precomputed["losses"]) == len(online["losses"]) > 0
    assert precomputed["losses"][steps] == pytest.approx(online["losses"][steps], rel=1e-5, abs=1e-6)
    torch.testing.assert_close(precomputed["grads"][steps], online["grads"][steps], rtol=1e-4, atol=1e-6)
    assert len(precomputed["eval"]) == len(online["eval"])
    for precomputed_eval, online_eval in zip(precomputed["eval"], online["eval"]):
        assert precomputed_eval.keys() == online_eval.keys()
        assert precomputed_eval == pytest.approx(online_eval, rel=1e-5, abs=1e-6)


def _cache_files(directory: Path) -> dict:
    return {path.name: path.stat().st_mtime_ns for path in directory.glob("ref_logps-*.pt")}


# --- precomputed == online ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_precomputed_reference_gives_online_losses_and_gradients(recorded, variant):
    """Shuffled data, 2 accumulation steps, eval set; full fine-tuning, LoRA, neat_packing."""
    online, precomputed = _run(recorded, f"{variant}-online"), _run(recorded, f"{variant}-precomputed")
    _assert_same_training(online, precomputed)
    # Before the first update the policy is the reference: r = 0 (this also checks that the reference's
    # logits, computed from the first labelled position on, line up with the policy's full logits).
    assert online["deviations"][0] == pytest.approx(0.0, abs=1e-5)
    assert precomputed["deviations"][0] == pytest.approx(0.0, abs=1e-5)
    # Later the policy moved off the reference (r != 0), so the reference values mattered.
    assert abs(online["deviations"][-1]) > 1e-3
    assert precomputed["references_alive"] == 0
    if variant == "full":  # no ref_model given: the pass runs on the policy itself, so no copy is ever loaded
        assert (precomputed["references_created"], online["references_created"], online["references_alive"]) == (
            0,
            1,
            1,
        )


@pytest.mark.slow
def test_evaluation_only_computes_the_eval_set_at_evaluate(recorded):
    online, precomputed = _run(recorded, "eval-only-online"), _run(recorded, "eval-only-precomputed")
    assert online["eval"] and online["eval"][0]["eval_deviation"] == pytest.approx(0.0, abs=1e-5)
    assert precomputed["eval"][0] == pytest.approx(online["eval"][0], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_precompute_with_ref_model_loads_it_once_and_frees_it(recorded):
    online = _run(recorded, "ref_model-online")
    precomputed, rerun = _run(recorded, "ref_model-precomputed"), _run(recorded, "ref_model-same-key")
    _assert_same_training(online, precomputed)
    assert precomputed["references_created"] == 1 and precomputed["references_alive"] == 0
    assert rerun["references_created"] == 0  # cache hit: the reference is not even loaded
    _assert_same_training(online, rerun)


@pytest.mark.slow
@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_resume_gets_the_same_reference_values(recorded, finetuning_type):
    """Resumed from checkpoint-2 without the cache (full: a reference copy is loaded; LoRA: its adapters
    disabled), and (full) with it; steps 3 and 4 equal the online run's."""
    online = _run(recorded, f"{finetuning_type}-online")
    miss = _run(recorded, f"{finetuning_type}-resumed-miss")
    hit = _run(recorded, "full-resumed-hit") if finetuning_type == "full" else None
    for resumed in (miss, hit) if hit else (miss,):
        assert len(resumed["losses"]) == 2  # steps 3 and 4
        assert resumed["losses"] == pytest.approx(online["losses"][2:], rel=1e-5, abs=1e-6)
        torch.testing.assert_close(resumed["grads"], online["grads"][2:], rtol=1e-4, atol=1e-6)
        assert resumed["references_alive"] == 0
    assert hit is None or hit["references_created"] == 0
    assert miss["references_created"] == (1 if finetuning_type == "full" else 0)
    assert len(_cache_files(recorded["workdir"] / f"{finetuning_type}-empty-cache")) == 1


# --- the cache ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cache_is_reused_only_for_the_same_model_data_and_template(recorded):
    first = _run(recorded, "ref_model-precomputed")["cache_files"]
    assert len(first) == 1
    assert _run(recorded, "ref_model-same-key")["cache_files"] == first  # reused: no new or rewritten file
    previous = first
    for name in ("key-dataset", "key-model"):
        files = _run(recorded, name)["cache_files"]
        assert len(files) == len(previous) + 1, f"{name}: a changed key must compute a new cache file"
        assert all(files[k] == v for k, v in previous.items()), name
        previous = files
    cache = recorded["workdir"] / "cache"
    stored = [torch.load(cache / name, weights_only=True)["logps"] for name in previous]
    assert all(not torch.equal(stored[0], other) for other in stored[1:] if other.shape == stored[0].shape)


@pytest.mark.slow
def test_precomputed_ref_model_gives_the_independent_step_and_a_sweep_reuses_it(recorded, policy_and_reference):
    """A `ref_model` that differs from the policy, precomputed: the step, `logps/ref` and `eval_logps/ref` equal
    the float64 computation. A second run of the same model and data at another learning rate and β with the
    same `ref_logps_cache_dir` loads the file: no pass, no new or rewritten file, and its own correct step."""
    policy, reference = policy_and_reference
    listings = []
    for name, beta, learning_rate, reference_pass in SWEEP_RUNS:
        run = _run(recorded, f"sweep-{name}")
        workdir = Path(run["config"]["output_dir"]).parent
        recorded_pass = json.loads((workdir / "out" / "minorsft_run.json").read_text())["reference"]
        assert (recorded_pass["mode"], recorded_pass["pass"]) == ("precomputed", reference_pass), name
        assert (recorded_pass["seconds"] is None) is (reference_pass == "loaded"), name
        listings.append(run["cache_files"])
        samples = load_tokenized_samples(workdir / "tokenized")
        expected = expected_step(policy, reference, samples, "minorsft", beta, learning_rate)
        assert_step_as_expected(policy, workdir / "out", expected, rtol=1e-4)
        assert_logged_as_expected(workdir / "out", expected)
        assert_eval_ref_logps_as_expected(workdir, reference)
    assert len(listings[0]) == 1 and list(listings[0])[0].startswith("ref_logps-")
    assert listings[1] == listings[0]


# --- units ---------------------------------------------------------------------------------------------


def _tiny_splits(tokens_offset=0):
    from datasets import Dataset

    train = Dataset.from_dict(
        {
            "input_ids": [[1, 2, 3 + tokens_offset], [4, 5]],
            "attention_mask": [[1, 1, 1], [1, 1]],
            "labels": [[-100, 2, 3 + tokens_offset], [-100, 5]],
        }
    )
    return {"train": train}


class _Args(dict):
    __getattr__ = dict.__getitem__


def _key_args(model_dir, **changes):
    model_args = _Args(
        model_name_or_path=str(model_dir),
        adapter_name_or_path=None,
        quantization_bit=None,
        model_revision="main",
        cache_dir=None,
        compute_dtype=torch.float32,
    )
    data_args = _Args(template="smollm2", cutoff_len=64, neat_packing=False)
    finetuning_args = _Args(
        ref_model=None, ref_model_adapters=None, ref_model_quantization_bit=None, finetuning_type="full"
    )
    for group in (model_args, data_args, finetuning_args):
        group.update({k: v for k, v in changes.items() if k in group})
    return model_args, data_args, finetuning_args


def test_cache_key_changes_with_each_input(tmp_path):
    from llamafactory_minorsft.train.ref_cache import cache_key

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8}')
    (model / "model.safetensors").write_bytes(b"weights")
    base = cache_key(*_key_args(model), _tiny_splits())
    assert cache_key(*_key_args(model), _tiny_splits()) == base

    changed = {
        "template": cache_key(*_key_args(model, template="default"), _tiny_splits()),
        "cutoff_len": cache_key(*_key_args(model, cutoff_len=32), _tiny_splits()),
        "dataset": cache_key(*_key_args(model), _tiny_splits(tokens_offset=1)),
        "ref_model": cache_key(*_key_args(model, ref_model=str(model)), _tiny_splits()),
        "lora": cache_key(*_key_args(model, finetuning_type="lora"), _tiny_splits()),
    }
    (model / "config.json").write_text('{"hidden_size": 16}')
    changed["config"] = cache_key(*_key_args(model), _tiny_splits())
    (model / "model.safetensors").write_bytes(b"other weights")
    changed["weights"] = cache_key(*_key_args(model), _tiny_splits())
    for name, key in changed.items():
        assert key != base, name


def test_dataset_digest_follows_row_order_and_indices_mapping():
    from datasets import Dataset
    from llamafactory_minorsft.train.ref_cache import dataset_digest

    dataset = Dataset.from_dict({"input_ids": [[1, 2], [3], [4, 5, 6]], "labels": [[1, 2], [3], [4, 5, 6]]})
    shuffled = dataset.select([2, 0, 1])
    assert dataset_digest(dataset) == dataset_digest(Dataset.from_dict(dataset.to_dict()))
    assert dataset_digest(shuffled) == dataset_digest(Dataset.from_dict(shuffled.to_dict()))
    assert dataset_digest(shuffled) != dataset_digest(dataset)


def test_cache_file_for_another_key_or_broken_is_not_used(tmp_path):
    from llamafactory_minorsft.train.ref_cache import CacheFile, ReferenceTable

    table = ReferenceTable(torch.tensor([-1.5, -2.5]), torch.tensor([3, 4]), torch.tensor([0, 1, 2]))
    path = str(tmp_path / "ref_logps-x.pt")
    CacheFile(path, {"k": 1}, num_rows=2).save(table, seconds=0.1, cpu_seconds=0.1)
    assert [p.name for p in tmp_path.iterdir()] == ["ref_logps-x.pt"]  # no staging file left behind
    loaded = CacheFile(path, {"k": 1}, num_rows=2).load()
    assert torch.equal(loaded.logps, table.logps) and torch.equal(loaded.offsets, table.offsets)
    assert CacheFile(path, {"k": 2}, num_rows=2).load() is None
    assert CacheFile(path, {"k": 1}, num_rows=3).load() is None
    Path(path).write_bytes(Path(path).read_bytes()[:20])
    assert CacheFile(path, {"k": 1}, num_rows=2).load() is None


def test_table_lookup_per_row_and_per_packed_segment():
    from llamafactory_minorsft.train.ref_cache import ReferenceTable

    # Row 0: one sample; row 1: no labelled sample; row 2: three packed segments; row 3: one sample.
    table = ReferenceTable(
        logps=torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0]),
        num_tokens=torch.tensor([1, 2, 3, 4, 5]),
        offsets=torch.tensor([0, 1, 1, 4, 5]),
    )
    assert table.lookup(torch.tensor([3, 0, 2, 1])).tolist() == [-5.0, -1.0, -2.0, -3.0, -4.0]
    table.check_num_tokens(torch.tensor([2, 0]), torch.tensor([2, 3, 4, 1]))
    with pytest.raises(RuntimeError, match="dataset rows \\[0, 3\\]"):
        table.check_num_tokens(torch.tensor([0, 3]), torch.tensor([1, 4]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_tokens", [None, 1, 7])
def test_chunked_log_prob_gradient_equals_log_softmax_gather(dtype, chunk_tokens):
    """The chunked autograd Function's hand-written backward against autograd through log_softmax."""
    from llamafactory_minorsft.train.losses import per_token_logps

    torch.manual_seed(0)
    logits = torch.randn(3, 17, 1000, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 1000, (3, 17))
    labels[:, :5] = -100
    labels[1, 10:] = -100
    mask = labels[:, 1:] != -100
    expected = logits.float()[:, :-1].log_softmax(-1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = expected * mask
    weights = torch.randn(expected.shape)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), logits)

    token_logps, token_mask = per_token_logps(logits, labels, chunk_tokens)
    (grad,) = torch.autograd.grad((token_logps * weights).sum(), logits)
    assert torch.equal(token_mask, mask)
    torch.testing.assert_close(token_logps, expected, rtol=1e-5, atol=1e-5)
    assert grad.dtype == dtype
    torch.testing.assert_close(
        grad.float(),
        expected_grad.float(),
        rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
        atol=1e-2 if dtype == torch.bfloat16 else 1e-6,
    )


def test_rows_are_shared_evenly_over_ranks():
    from llamafactory_minorsft.train.ref_cache import rows_of_this_rank

    lengths = [5, 9, 1, 7, 3]
    shares = [rows_of_this_rank(lengths, rank, 2) for rank in range(2)]
    assert [len(share) for share in shares] == [3, 3]
    assert sorted(set(shares[0]) | set(shares[1])) == list(range(5))
    assert shares[0][0] == 1  # longest first


def test_rows_are_numbered_over_train_and_eval_sets_and_the_table_is_built_by_row():
    """Global row numbers run over the train set, then each eval set; per-row results gathered from the ranks
    (in any order, a row repeated) build the table, which refuses a missing row."""
    from datasets import Dataset
    from llamafactory_minorsft.errors import UsageError
    from llamafactory_minorsft.train.ref_cache import DATASET_ROW_KEY, number_rows, split_by_row, table_from_rows

    train = Dataset.from_dict({"input_ids": [[1, 2, 3], [4]], "labels": [[-100, 2, 3], [4]]})
    evals = {"a": Dataset.from_dict({"input_ids": [[5, 6]], "labels": [[5, 6]]}), "b": train.select([1])}
    rows = number_rows(train, evals)
    assert rows.train_dataset[DATASET_ROW_KEY] == [0, 1]
    assert {name: d[DATASET_ROW_KEY] for name, d in rows.eval_dataset.items()} == {"a": [2], "b": [3]}
    assert rows.num_rows == 4 and rows.lengths() == [3, 1, 2, 1]
    assert rows.features(2) == {"input_ids": [5, 6], "labels": [5, 6]}  # as tokenised: no row column
    evaluation_only = number_rows(train, evals["a"], with_train=False)
    assert evaluation_only.train_dataset is train and evaluation_only.eval_dataset[DATASET_ROW_KEY] == [0]
    with pytest.raises(UsageError, match="already has a `dataset_row` column"):
        number_rows(rows.train_dataset, None)

    # Row 1 holds two packed segments; row 3 was computed twice (the last rank's padding repeat).
    gathered = split_by_row([3, 1], [1, 2], [-4.0, -2.0, -2.5], [4, 2, 3]) + split_by_row(
        [0, 2, 3], [1, 1, 1], [-1.0, -3.0, -4.0], [1, 3, 4]
    )
    table = table_from_rows(gathered, num_rows=4)
    assert table.offsets.tolist() == [0, 1, 3, 4, 5]
    assert table.lookup(torch.tensor([1, 3])).tolist() == [-2.0, -2.5, -4.0]
    with pytest.raises(RuntimeError, match="covered 3 of 4 dataset rows"):
        table_from_rows(split_by_row([0, 1, 2], [1, 1, 1], [0.0, 0.0, 0.0], [1, 1, 1]), num_rows=4)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"stage": "sft", "precompute_ref_logps": True}, "precompute_ref_logps"),
        ({"stage": "minorsft", "ref_logps_cache_dir": "x"}, "ref_logps_cache_dir"),
    ],
)
def test_bad_keys_are_refused_when_parsed(overrides, message):
    from llamafactory.hparams import FinetuningArguments

    with pytest.raises(ValueError, match=message):
        FinetuningArguments(**overrides)


def test_cache_dir_that_is_a_file_is_refused(tmp_path):
    from llamafactory.hparams import FinetuningArguments

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(ValueError, match="ref_logps_cache_dir"):
        FinetuningArguments(stage="minorsft", precompute_ref_logps=True, ref_logps_cache_dir=str(not_a_dir))


if __name__ == "__main__":
    _record_runs(sys.argv[1], sys.argv[2])
