"""minorsft eval end to end on SmolLM2-135M-Instruct and the real benchmark data: batch-size and padding
invariance, the CLI on all three tasks in both modes, refusals before any work, LoRA adapters."""

import json
import os
import subprocess
import sys
from argparse import Namespace

import pytest
import torch

from llamafactory_minorsft import cli
from llamafactory_minorsft.evaluation.checkpoint import load_model_and_template
from llamafactory_minorsft.evaluation.data import load_split
from llamafactory_minorsft.evaluation.pipeline import encode_questions, predict
from llamafactory_minorsft.evaluation.results import summarize
from llamafactory_minorsft.evaluation.scoring import choice_token_ids
from llamafactory_minorsft.evaluation.tasks import load_prompt, load_task

pytestmark = pytest.mark.slow

FOLDERS = {"ceval": "ceval-exam", "financeiq": "FinanceIQ", "fineval": "fineval"}


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    args = Namespace(model_name_or_path=str(smollm2_dir), adapter_name_or_path=None, template="smollm2",
                     dtype="float32", device="cpu")
    return load_model_and_template(args)


def test_accuracy_is_the_same_for_batch_size_1_and_16_and_both_padding_sides(smollm2, shared_data_dir):
    model, tokenizer, template = smollm2
    assert model.dtype == torch.float32
    task = load_task("ceval")
    by_subject = load_split(task, shared_data_dir / "ceval-exam", "val", list(task.subjects), None)
    everything = [q for items in by_subject.values() for q in items]
    prompt = load_prompt("paper", task)
    no_shots = {subject: [] for subject in task.subjects}
    lengths = [len(ids) for ids in encode_questions(template, tokenizer, everything, no_shots, prompt, task)]
    # Every third of the 48 shortest prompts: 16 questions of different lengths that stay cheap on a CPU.
    shortest = sorted(range(len(everything)), key=lambda i: (lengths[i], i))[:48:3]
    questions = [everything[i] for i in sorted(shortest)]
    encoded = encode_questions(template, tokenizer, questions, no_shots, prompt, task)
    assert len({len(ids) for ids in encoded}) > 4  # so that batches of 16 carry real padding
    choice_ids = choice_token_ids(template, tokenizer)

    # max_padding None: one batch of all 16, padded to the longest.
    runs = {(size, side): predict(model, tokenizer, template, questions, encoded, choice_ids, "logits", size, side,
                                  max_padding=None)
            for size, side in [(1, "left"), (16, "left"), (16, "right")]}
    reference = runs[(1, "left")]
    reference_accuracy = summarize(task, "val", reference, {})["accuracy"]
    for (size, side), predictions in runs.items():
        assert [p.predicted for p in predictions] == [p.predicted for p in reference], (size, side)
        assert summarize(task, "val", predictions, {})["accuracy"] == reference_accuracy
        for ours, theirs in zip(predictions, reference):
            assert ours.probabilities == pytest.approx(theirs.probabilities, abs=1e-4)


def _eval_args(task, out, model_dir, data_dir, *extra):
    return ["eval", "--task", task, "--data_dir", str(data_dir), "--model_name_or_path", str(model_dir),
            "--template", "smollm2", "--output_dir", str(out), "--device", "cpu", *extra]


@pytest.mark.parametrize("mode", ["logits", "generate"])
@pytest.mark.parametrize("task_key", sorted(FOLDERS))
def test_cli_end_to_end(task_key, mode, smollm2_dir, shared_data_dir, tmp_path):
    out = tmp_path / "out"
    extra = ["--max_samples", "4", "--seed", "7", "--mode", mode, "--batch_size", "4", "--max_new_tokens", "4"]
    if task_key == "fineval":
        extra += ["--n_shot", "1"]
    assert cli.main(_eval_args(task_key, out, smollm2_dir, shared_data_dir / FOLDERS[task_key], *extra)) == 0

    assert sorted(os.listdir(out)) == ["predictions.jsonl", "results.json", "results.md"]
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    task = load_task(task_key)
    assert results["task"] == task_key and results["split"] == task.splits[0] and results["mode"] == mode
    assert results["num_questions"] == len(records) == 4
    assert 0.0 <= results["accuracy"] <= 1.0
    assert results["num_correct"] == sum(record["gold"] == record["predicted"] for record in records)
    assert sum(entry["num_questions"] for entry in results["subjects"].values()) == 4
    assert sum(entry["num_questions"] for entry in results["categories"].values()) == 4
    for record in records:
        assert set(record) >= {"subject", "id", "question", "gold", "predicted", "probabilities"}
        assert sum(record["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert record["subject"] in task.subjects
    if mode == "generate":
        assert all("reply" in record for record in records)
        assert results["num_unparseable"] == sum(record["predicted"] is None for record in records)
    else:
        assert results["num_unparseable"] == 0
    assert "| **all** | 4 |" in (out / "results.md").read_text(encoding="utf-8")


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "llamafactory_minorsft.cli", *args], capture_output=True, text=True)


def test_cli_refuses_before_any_work(tiny_model_dir, shared_data_dir, tmp_path):
    out = tmp_path / "out"
    done = _run_cli(*_eval_args("ceval", out, tiny_model_dir, shared_data_dir / "ceval-exam", "--max_samples", "3",
                                "--subjects", "accountant,法学"))
    assert done.returncode == 0, done.stderr
    before = (out / "results.json").read_text(encoding="utf-8")
    assert set(json.loads(before)["subjects"]) <= {"accountant", "law"}

    refused = _run_cli(*_eval_args("ceval", out, tiny_model_dir, shared_data_dir / "ceval-exam"))
    assert refused.returncode != 0 and "exists and is not empty; pass --overwrite" in refused.stderr
    assert (out / "results.json").read_text(encoding="utf-8") == before

    bad = tmp_path / "bad"
    (bad / "val").mkdir(parents=True)
    (bad / "val" / "accountant_val.csv").write_text("id,question,A,B,C,D,answer\n0,Q,a,b,c,d,F\n", encoding="utf-8")
    # A model path that does not exist: the data error must come first.
    failed = _run_cli(*_eval_args("ceval", tmp_path / "new", tmp_path / "no-model", bad, "--subjects", "accountant"))
    assert failed.returncode != 0
    assert f"{bad / 'val' / 'accountant_val.csv'} line 2: answer 'F' is not one of A, B, C, D" in failed.stderr
    assert not (tmp_path / "new").exists()
    test_split = _run_cli(*_eval_args("ceval", tmp_path / "new", tiny_model_dir, bad, "--split", "test"))
    assert test_split.returncode != 0 and "test answers are not public" in test_split.stderr


def test_skip_bad_rows_counts_what_it_skipped(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    (data / "val").mkdir(parents=True)
    (data / "val" / "accountant_val.csv").write_text(
        "id,question,A,B,C,D,answer\n0,Q1,a,b,c,d,A\n1,Q2,a,,c,d,B\n2,Q3,a,b,c,d,C\n", encoding="utf-8")
    out = tmp_path / "out"
    args = _eval_args("ceval", out, tiny_model_dir, data, "--subjects", "accountant", "--skip_bad_rows")
    assert cli.main(args) == 0
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["num_questions"] == 2 and results["num_skipped_rows"] == 1
    assert results["skipped_rows"][0].endswith("accountant_val.csv line 3: missing option(s) B")


def test_lora_adapter_is_applied(tiny_model_dir, shared_data_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(tmp_path / "adapter")

    probabilities = {}
    for name, extra in (("base", []), ("lora", ["--adapter_name_or_path", str(tmp_path / "adapter")])):
        out = tmp_path / name
        args = _eval_args("fineval", out, tiny_model_dir, shared_data_dir / "fineval", "--max_samples", "4", *extra)
        assert cli.main(args) == 0
        lines = (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
        probabilities[name] = [json.loads(line)["probabilities"] for line in lines]
    lora_results = json.loads((tmp_path / "lora" / "results.json").read_text(encoding="utf-8"))
    assert lora_results["adapter_name_or_path"] == str(tmp_path / "adapter")
    assert any(base != lora for base, lora in zip(probabilities["base"], probabilities["lora"]))
