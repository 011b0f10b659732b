"""``precompute_ref_logps``: the precomputed reference gives the online reference's losses and gradients,
and its cache is reused only for the same reference model, tokenised data, template and cutoff_len.

End-to-end cases train the tiny random Llama through LLaMA-Factory's ``run_exp`` (in a subprocess that
runs this file as a script and records every optimizer step's loss and gradient) or its CLI.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import (
    OFFLINE_ENV,
    free_port,
    read_log_history,
    run_llamafactory_train,
    tiny_train_config,
    write_sft_dataset,
)
from independent_step import (
    assert_eval_ref_logps_as_expected,
    assert_logged_as_expected,
    assert_step_as_expected,
    expected_step,
    load_tokenized_samples,
    run_training,
    sgd_step_config,
)

HERE = Path(__file__).resolve()


# --- the recorder (runs in a subprocess) ------------------------------------------------------------


def _record_runs(runs_path: str, result_path: str) -> None:
    """Train each run of ``runs_path`` (a JSON list of LLaMA-Factory argument dicts) with ``run_exp``;
    save per run the loss, deviation and flat gradient of every optimizer step, the eval metrics, the
    cache files at the end, and how many reference models were created and still alive at the first step."""
    import gc
    import weakref

    import llamafactory_minorsft.train.trainer as plugin_trainer
    from llamafactory.train.tuner import run_exp
    from transformers import TrainerCallback

    created = []
    create_ref_model = plugin_trainer.create_ref_model

    def counting_create_ref_model(*args, **kwargs):
        model = create_ref_model(*args, **kwargs)
        created.append(weakref.ref(model) if model is not None else (lambda: None))
        return model

    plugin_trainer.create_ref_model = counting_create_ref_model

    class Recorder(TrainerCallback):
        def __init__(self, cache_dir):
            self.cache_dir = cache_dir
            self.record = {"losses": [], "deviations": [], "grads": [], "eval": [], "references_alive": None}

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
        run_exp(args=run, callbacks=[recorder])
        recorder.record["references_created"] = len(created)
        recorder.record["grads"] = torch.stack(recorder.record["grads"]) if recorder.record["grads"] else None
        results.append(recorder.record)
    torch.save(results, result_path)


# --- helpers ------------------------------------------------------------------------------------------


def _env() -> dict:
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
    env.pop("MINORSFT_DISABLE", None)
    return env


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


def _record(runs: list[dict], tmp_path: Path) -> list[dict]:
    runs_path, result_path = tmp_path / "runs.json", tmp_path / "recorded.pt"
    runs_path.write_text(json.dumps(runs))
    proc = subprocess.run(
        [sys.executable, str(HERE), str(runs_path), str(result_path)],
        env=_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(result_path, weights_only=False)


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


@pytest.fixture
def data_dir(tmp_path):
    return write_sft_dataset(tmp_path / "data", num_samples=16)


# --- precomputed == online ---------------------------------------------------------------------------


@pytest.mark.slow
def test_precomputed_reference_gives_online_losses_and_gradients(tiny_model_dir, data_dir, tmp_path):
    """Shuffled data, 2 accumulation steps, eval set; full fine-tuning, LoRA, sft_dpo, neat_packing, and
    evaluation without training."""
    variants = {
        "full": {},
        "lora": {"finetuning_type": "lora", "lora_target": "all", "learning_rate": 1.0e-2},
        "sft_dpo": {"stage": "sft_dpo", "pref_beta": 0.5},
        "neat_packing": {"neat_packing": True, "per_device_train_batch_size": 1, "val_size": 2},
    }
    runs = []
    for name, overrides in variants.items():
        for precompute in (False, True):
            out = tmp_path / f"{name}-{precompute}"
            runs.append(_train_args(tiny_model_dir, data_dir, out, precompute_ref_logps=precompute, **overrides))
    for precompute in (False, True):  # evaluation only: the eval set's values are computed at evaluate()
        runs.append(
            _train_args(
                tiny_model_dir,
                data_dir,
                tmp_path / f"eval-{precompute}",
                precompute_ref_logps=precompute,
                do_train=False,
                do_eval=True,
                eval_dataset="tiny_sft",
                val_size=0,
                eval_strategy="no",
            )
        )
    keys = [(name, p) for name in [*variants, "eval_only"] for p in (False, True)]
    recorded = dict(zip(keys, _record(runs, tmp_path)))

    for name in variants:
        online, precomputed = recorded[(name, False)], recorded[(name, True)]
        _assert_same_training(online, precomputed)
        # Before the first update the policy is the reference: r = 0 (this also checks that the reference's
        # logits, computed from the first labelled position on, line up with the policy's full logits).
        assert online["deviations"][0] == pytest.approx(0.0, abs=1e-5), name
        assert precomputed["deviations"][0] == pytest.approx(0.0, abs=1e-5), name
        # Later the policy moved off the reference (r != 0), so the reference values mattered.
        assert abs(online["deviations"][-1]) > 1e-3, name
        assert precomputed["references_alive"] == 0, name
    eval_only = [recorded[("eval_only", p)] for p in (False, True)]
    assert eval_only[0]["eval"] and eval_only[0]["eval"][0]["eval_deviation"] == pytest.approx(0.0, abs=1e-5)
    assert eval_only[1]["eval"][0] == pytest.approx(eval_only[0]["eval"][0], rel=1e-5, abs=1e-6)
    # No ref_model given: the precompute pass runs on the policy itself, so no copy is ever loaded.
    assert recorded[("full", True)]["references_created"] == 0
    assert recorded[("full", False)]["references_created"] == 1
    assert recorded[("full", False)]["references_alive"] == 1


@pytest.mark.slow
def test_precompute_with_ref_model_loads_it_once_and_frees_it(tiny_model_dir, data_dir, tmp_path):
    ref_dir = tmp_path / "reference"
    shutil.copytree(tiny_model_dir, ref_dir)
    runs = [
        _train_args(tiny_model_dir, data_dir, tmp_path / f"out-{p}", ref_model=str(ref_dir), precompute_ref_logps=p)
        for p in (False, True)
    ] + [
        _train_args(tiny_model_dir, data_dir, tmp_path / "out-True", ref_model=str(ref_dir), precompute_ref_logps=True)
    ]
    online, precomputed, rerun = _record(runs, tmp_path)
    _assert_same_training(online, precomputed)
    assert precomputed["references_created"] == 1 and precomputed["references_alive"] == 0
    assert rerun["references_created"] == 0  # cache hit: the reference is not even loaded
    _assert_same_training(online, rerun)


@pytest.mark.slow
@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_resume_gets_the_same_reference_values(tiny_model_dir, data_dir, tmp_path, finetuning_type):
    extra = (
        {"finetuning_type": "lora", "lora_target": "all", "learning_rate": 1.0e-2} if finetuning_type == "lora" else {}
    )
    common = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, **extra}
    cache = tmp_path / "cache"
    first = _train_args(
        tiny_model_dir,
        data_dir,
        tmp_path / "first",
        precompute_ref_logps=True,
        ref_logps_cache_dir=str(cache),
        **common,
    )
    online = _train_args(tiny_model_dir, data_dir, tmp_path / "online", **common)
    checkpoint = str(tmp_path / "first" / "checkpoint-2")
    # Resume with the cache, and without it (full: a reference copy is loaded; LoRA: adapters disabled).
    resumed_hit = _train_args(
        tiny_model_dir,
        data_dir,
        tmp_path / "resumed-hit",
        precompute_ref_logps=True,
        ref_logps_cache_dir=str(cache),
        resume_from_checkpoint=checkpoint,
        **common,
    )
    resumed_miss = _train_args(
        tiny_model_dir,
        data_dir,
        tmp_path / "resumed-miss",
        precompute_ref_logps=True,
        ref_logps_cache_dir=str(tmp_path / "empty-cache"),
        resume_from_checkpoint=checkpoint,
        **common,
    )
    first_rec, online_rec, hit_rec, miss_rec = _record([first, online, resumed_hit, resumed_miss], tmp_path)

    _assert_same_training(online_rec, first_rec)
    for resumed in (hit_rec, miss_rec):
        assert len(resumed["losses"]) == 2  # steps 3 and 4
        assert resumed["losses"] == pytest.approx(online_rec["losses"][2:], rel=1e-5, abs=1e-6)
        torch.testing.assert_close(resumed["grads"], online_rec["grads"][2:], rtol=1e-4, atol=1e-6)
        assert resumed["references_alive"] == 0
    assert hit_rec["references_created"] == 0
    assert miss_rec["references_created"] == (1 if finetuning_type == "full" else 0)
    assert len(_cache_files(tmp_path / "empty-cache")) == 1


@pytest.mark.slow
def test_two_cpu_ranks(tiny_model_dir, data_dir, tmp_path):
    """FORCE_TORCHRUN with 2 gloo ranks: the same losses, gradient norms and final weights either way."""
    from safetensors.torch import load_file

    histories, weights = {}, {}
    for precompute in (False, True):
        out = tmp_path / f"ddp-{precompute}"
        args = _train_args(
            tiny_model_dir,
            data_dir,
            out,
            precompute_ref_logps=precompute,
            gradient_accumulation_steps=1,
            max_grad_norm=1.0e6,
            max_steps=4,
            ddp_backend="gloo",
        )
        env = {**_env(), "FORCE_TORCHRUN": "1", "NNODES": "1", "NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())}
        proc = run_llamafactory_train(args, tmp_path / f"ddp-{precompute}-config", env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        log_history = read_log_history(out)
        histories[precompute] = [entry for entry in log_history if "loss" in entry or "eval_loss" in entry]
        weights[precompute] = load_file(out / "model.safetensors")

    assert len(histories[True]) == len(histories[False]) == 4 + 2
    for online, precomputed in zip(histories[False], histories[True]):
        for key in ("loss", "grad_norm", "eval_loss", "eval_deviation", "deviation"):
            if key in online:
                assert precomputed[key] == pytest.approx(online[key], rel=1e-5, abs=1e-6), key
    assert histories[False][-2]["deviation"] > 0  # the reference values mattered
    for name, tensor in weights[False].items():
        torch.testing.assert_close(weights[True][name], tensor, rtol=1e-4, atol=1e-6)
    assert len(_cache_files(tmp_path / "ddp-True")) == 1


# --- the cache ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cache_is_reused_only_for_the_same_model_data_and_template(tiny_model_dir, data_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    cache = tmp_path / "cache"
    other_model = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other_model)
    weights = load_file(other_model / "model.safetensors")
    save_file(
        {k: v * 1.5 if v.dim() == 2 else v for k, v in weights.items()},
        other_model / "model.safetensors",
        metadata={"format": "pt"},
    )
    other_data = write_sft_dataset(tmp_path / "other-data", num_samples=16)
    (other_data / "tiny_sft.json").write_text((other_data / "tiny_sft.json").read_text().replace("Indeed", "Surely"))

    def run(name, model=tiny_model_dir, data=data_dir, **overrides):
        return _train_args(
            model,
            data,
            tmp_path / name,
            precompute_ref_logps=True,
            ref_logps_cache_dir=str(cache),
            max_steps=1,
            eval_strategy="no",
            **overrides,
        )

    cases = {
        "first": run("first"),
        "same": run("same"),
        "template": run("template", template="default"),
        "dataset": run("dataset", data=other_data),
        "model": run("model", model=other_model),
        "cutoff_len": run("cutoff", cutoff_len=48),
    }
    recorded = dict(zip(cases, _record(list(cases.values()), tmp_path)))

    assert len(recorded["first"]["cache_files"]) == 1
    assert recorded["same"]["cache_files"] == recorded["first"]["cache_files"]  # reused: no new or rewritten file
    previous = recorded["same"]["cache_files"]
    for name in ("template", "dataset", "model", "cutoff_len"):
        files = recorded[name]["cache_files"]
        assert len(files) == len(previous) + 1, f"{name}: a changed key must compute a new cache file"
        assert all(files[k] == v for k, v in previous.items()), name
        previous = files
    stored = [torch.load(cache / name, weights_only=True)["logps"] for name in previous]
    assert all(not torch.equal(stored[0], other) for other in stored[1:] if other.shape == stored[0].shape)


@pytest.mark.slow
def test_precomputed_ref_model_gives_the_independent_step_and_a_sweep_reuses_it(policy_and_reference, tmp_path):
    """A `ref_model` that differs from the policy, precomputed: the step, `logps/ref` and `eval_logps/ref` equal
    the float64 computation. A second run of the same model and data at another learning rate and β with the
    same `ref_logps_cache_dir` loads the file: no pass, no new or rewritten file, and its own correct step."""
    policy, reference = policy_and_reference
    data = write_sft_dataset(tmp_path / "data", num_samples=8)
    write_sft_dataset(data, "tiny_eval", num_samples=4)
    cache = tmp_path / "cache"
    listings = []
    for name, beta, learning_rate, reference_pass in [("first", 1.0, 1.0, "computed"), ("second", 0.6, 0.5, "loaded")]:
        workdir = tmp_path / name
        config = sgd_step_config(
            policy,
            reference,
            data,
            workdir,
            beta,
            learning_rate,
            precompute_ref_logps=True,
            ref_logps_cache_dir=str(cache),
            do_eval=True,
            eval_dataset="tiny_eval",
            per_device_eval_batch_size=3,
        )
        run_training(config, workdir)
        recorded = json.loads((workdir / "out" / "minorsft_run.json").read_text())["reference"]
        assert (recorded["mode"], recorded["pass"]) == ("precomputed", reference_pass), name
        assert (recorded["seconds"] is None) is (reference_pass == "loaded"), name
        listings.append({path.name: (path.stat().st_size, path.stat().st_mtime_ns) for path in cache.iterdir()})
        samples = load_tokenized_samples(workdir / "tokenized")
        expected = expected_step(policy, reference, samples, "minorsft", beta, learning_rate)
        assert_step_as_expected(policy, workdir / "out", expected, rtol=1e-4)
        assert_logged_as_expected(workdir / "out", expected)
        assert_eval_ref_logps_as_expected(workdir, reference)
    assert len(listings[0]) == 1 and list(listings[0])[0].startswith("ref_logps-")
    assert listings[1] == listings[0]


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
    from llamafactory_minorsft.train.ref_cache import ReferenceTable, load_table, save_table

    table = ReferenceTable(torch.tensor([-1.5, -2.5]), torch.tensor([3, 4]), torch.tensor([0, 1, 2]))
    path = str(tmp_path / "ref_logps-x.pt")
    save_table(path, {"k": 1}, table, seconds=0.1)
    assert [p.name for p in tmp_path.iterdir()] == ["ref_logps-x.pt"]  # no staging file left behind
    loaded = load_table(path, {"k": 1}, num_rows=2)
    assert torch.equal(loaded.logps, table.logps) and torch.equal(loaded.offsets, table.offsets)
    assert load_table(path, {"k": 2}, num_rows=2) is None
    assert load_table(path, {"k": 1}, num_rows=3) is None
    Path(path).write_bytes(Path(path).read_bytes()[:20])
    assert load_table(path, {"k": 1}, num_rows=2) is None


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


def test_streaming_is_refused_before_loading(tiny_model_dir, data_dir, tmp_path):
    args = _train_args(
        tiny_model_dir,
        data_dir,
        tmp_path / "out",
        precompute_ref_logps=True,
        streaming=True,
        max_steps=1,
        val_size=0,
        eval_strategy="no",
    )
    proc = run_llamafactory_train(args, tmp_path / "streaming-config", env=_env(), timeout=300)
    assert proc.returncode != 0
    assert "streaming: true" in proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("ref_logps-*"))


if __name__ == "__main__":
    _record_runs(sys.argv[1], sys.argv[2])
