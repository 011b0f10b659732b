"""minorsft eval end to end on SmolLM2-135M-Instruct (and a tiny random Llama) and the benchmark fixtures: batch-size
and padding invariance, the CLI on all three tasks in both modes, --check_data and its exit statuses, a benchmark
added by a task file outside the package, refusals before any work, LoRA adapters."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from llamafactory_minorsft import cli
from llamafactory_minorsft.evaluation.checkpoint import load_checkpoint, load_tokenizer_and_template
from llamafactory_minorsft.evaluation.data import load_split
from llamafactory_minorsft.evaluation.pipeline import encode_questions, predict
from llamafactory_minorsft.evaluation.results import summarize
from llamafactory_minorsft.evaluation.scoring import choice_token_ids
from llamafactory_minorsft.evaluation.tasks import load_prompt, load_task

pytestmark = pytest.mark.slow

FOLDERS = {"ceval": "ceval-exam", "financeiq": "FinanceIQ", "fineval": "fineval"}
CEVAL_FIXTURE_SUBJECTS = ["accountant", "high_school_mathematics", "law"]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    """SmolLM2 loaded as `minorsft eval` loads it."""
    tokenizer, template, loader_args = load_tokenizer_and_template(str(smollm2_dir), None, "smollm2", "float32", "cpu")
    return load_checkpoint(tokenizer, loader_args), tokenizer, template


def test_accuracy_is_the_same_for_batch_size_1_and_10_and_both_padding_sides(smollm2, benchmark_fixtures_dir):
    model, tokenizer, template = smollm2
    assert model.dtype == torch.float32
    task = load_task("ceval")
    by_subject = load_split(task, benchmark_fixtures_dir / "ceval-exam", "val", CEVAL_FIXTURE_SUBJECTS, None)
    everything = [q for items in by_subject.values() for q in items]
    prompt = load_prompt("paper", task)
    no_shots = {subject: [] for subject in task.subjects}
    lengths = [len(ids) for ids in encode_questions(template, tokenizer, everything, no_shots, prompt, task)]
    # The 10 shortest of the fixture's 24 prompts (152 to 167 tokens): different lengths that stay cheap on a CPU.
    shortest = sorted(range(len(everything)), key=lambda i: (lengths[i], i))[:10]
    questions = [everything[i] for i in sorted(shortest)]
    encoded = encode_questions(template, tokenizer, questions, no_shots, prompt, task)
    assert len({len(ids) for ids in encoded}) > 4  # so that a batch of all 10 carries real padding
    choice_ids = choice_token_ids(template, tokenizer)

    # max_padding None: one batch of all 10, padded to the longest.
    runs = {
        (size, side): predict(
            model, tokenizer, template, questions, encoded, choice_ids, "logits", size, side, max_padding=None
        )
        for size, side in [(1, "left"), (10, "left"), (10, "right")]
    }
    reference = runs[(1, "left")]
    reference_accuracy = summarize(task, "val", reference, {})["accuracy"]
    for (size, side), predictions in runs.items():
        assert [p.predicted for p in predictions] == [p.predicted for p in reference], (size, side)
        assert summarize(task, "val", predictions, {})["accuracy"] == reference_accuracy
        for ours, theirs in zip(predictions, reference):
            assert ours.probabilities == pytest.approx(theirs.probabilities, abs=1e-4)


def _eval_args(task, out, model_dir, data_dir, *extra):
    return [
        "eval",
        "--task",
        task,
        "--data_dir",
        str(data_dir),
        "--model_name_or_path",
        str(model_dir),
        "--template",
        "smollm2",
        "--output_dir",
        str(out),
        "--device",
        "cpu",
        *extra,
    ]


@pytest.mark.parametrize("mode", ["logits", "generate"])
@pytest.mark.parametrize("task_key", sorted(FOLDERS))
def test_cli_end_to_end(task_key, mode, smollm2_dir, tiny_model_dir, benchmark_fixtures_dir, tmp_path):
    """Every task in both modes; SmolLM2's replies on C-Eval, the tiny model's (random, fast) elsewhere: what is
    checked here is the command's handling of each task's data and outputs, not the model's answers."""
    model = smollm2_dir if (task_key, mode) == ("ceval", "generate") else tiny_model_dir
    out = tmp_path / "out"
    extra = ["--max_samples", "4", "--seed", "7", "--mode", mode, "--batch_size", "4", "--max_new_tokens", "4"]
    if task_key == "fineval":
        extra += ["--n_shot", "1"]
    assert cli.main(_eval_args(task_key, out, model, benchmark_fixtures_dir / FOLDERS[task_key], *extra)) == 0

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
    # The fixtures hold 3 subjects of each benchmark: the others are listed, not silently dropped.
    assert len(results["missing_subjects"]) == len(task.subjects) - 3
    assert results["data_dir"] == str(benchmark_fixtures_dir / FOLDERS[task_key])


def _run_cli(*args, env: dict | None = None):
    environment = {key: value for key, value in os.environ.items() if key != "MINORSFT_EVAL_DATA_DIR"}
    return subprocess.run(
        [sys.executable, "-m", "llamafactory_minorsft.cli", *args],
        capture_output=True,
        text=True,
        env={**environment, **(env or {})},
        check=False,
    )


@pytest.fixture
def cli_here(capsys, monkeypatch):
    """``minorsft ARGS`` in this process (as ``_run_cli`` runs it in a child): its exit status and output;
    ``env``: environment variables for the call, MINORSFT_EVAL_DATA_DIR unset unless given."""

    def run(*args, env: dict | None = None) -> subprocess.CompletedProcess:
        monkeypatch.delenv("MINORSFT_EVAL_DATA_DIR", raising=False)
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        capsys.readouterr()
        returncode = cli.main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, returncode, out, err)

    return run


def test_cli_refuses_before_any_work(tiny_model_dir, benchmark_fixtures_dir, tmp_path, cli_here):
    out = tmp_path / "out"
    data = benchmark_fixtures_dir / "ceval-exam"
    done = cli_here(
        *_eval_args("ceval", out, tiny_model_dir, data, "--max_samples", "3", "--subjects", "accountant,法学")
    )
    assert done.returncode == 0, done.stderr
    before = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert set(before["subjects"]) == {"accountant", "law"} and before["missing_subjects"] == []

    refused = cli_here(*_eval_args("ceval", out, tiny_model_dir, data))
    assert refused.returncode != 0 and "exists and is not empty; pass --overwrite" in refused.stderr
    assert json.loads((out / "results.json").read_text(encoding="utf-8")) == before
    # A subject asked for by name must be in the data.
    absent = cli_here(*_eval_args("ceval", tmp_path / "new", tmp_path / "no-model", data, "--subjects", "law,logic"))
    assert (
        absent.returncode == 2 and f"{data / 'val' / 'logic_val.csv'}: file not found (subject logic)" in absent.stderr
    )

    bad = tmp_path / "bad"
    (bad / "val").mkdir(parents=True)
    (bad / "val" / "accountant_val.csv").write_text("id,question,A,B,C,D,answer\n0,Q,a,b,c,d,F\n", encoding="utf-8")
    # A model path that does not exist: the data error must come first.
    failed = cli_here(*_eval_args("ceval", tmp_path / "new", tmp_path / "no-model", bad, "--subjects", "accountant"))
    assert failed.returncode == 2
    assert f"{bad / 'val' / 'accountant_val.csv'} line 2: answer 'F' is not one of A, B, C, D" in failed.stderr
    assert not (tmp_path / "new").exists()
    test_split = cli_here(*_eval_args("ceval", tmp_path / "new", tiny_model_dir, bad, "--split", "test"))
    assert test_split.returncode != 0 and "test answers are not public" in test_split.stderr


def test_skip_bad_rows_counts_what_it_skipped(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    (data / "val").mkdir(parents=True)
    (data / "val" / "accountant_val.csv").write_text(
        "id,question,A,B,C,D,answer\n0,Q1,a,b,c,d,A\n1,Q2,a,,c,d,B\n2,Q3,a,b,c,d,C\n", encoding="utf-8"
    )
    out = tmp_path / "out"
    args = _eval_args("ceval", out, tiny_model_dir, data, "--subjects", "accountant", "--skip_bad_rows")
    assert cli.main(args) == 0
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["num_questions"] == 2 and results["num_skipped_rows"] == 1
    assert results["skipped_rows"][0].endswith("accountant_val.csv line 3: missing option(s) B")


def test_lora_adapter_is_applied(tiny_model_dir, benchmark_fixtures_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(tmp_path / "adapter")

    probabilities = {}
    for name, extra in (("base", []), ("lora", ["--adapter_name_or_path", str(tmp_path / "adapter")])):
        out = tmp_path / name
        args = _eval_args(
            "fineval", out, tiny_model_dir, benchmark_fixtures_dir / "fineval", "--max_samples", "4", *extra
        )
        assert cli.main(args) == 0
        lines = (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
        probabilities[name] = [json.loads(line)["probabilities"] for line in lines]
    lora_results = json.loads((tmp_path / "lora" / "results.json").read_text(encoding="utf-8"))
    assert lora_results["adapter_name_or_path"] == str(tmp_path / "adapter")
    assert any(base != lora for base, lora in zip(probabilities["base"], probabilities["lora"]))


def test_check_data_finds_and_reads_the_data_without_a_model(benchmark_fixtures_dir, tmp_path, capsys, monkeypatch):
    fixtures = str(benchmark_fixtures_dir)
    line = f"fineval val: 24 questions, 6 dev examples in 3 of 34 subjects from {benchmark_fixtures_dir / 'fineval'}"
    # From --data_dir, and from the environment variable: exit 0 and one line on stdout.
    monkeypatch.delenv("MINORSFT_EVAL_DATA_DIR", raising=False)
    for args, env in ((["--data_dir", fixtures], None), ([], fixtures)):
        if env:
            monkeypatch.setenv("MINORSFT_EVAL_DATA_DIR", env)
        assert cli.main(["eval", "--task", "fineval", "--check_data", "--n_shot", "2", *args]) == 0
        out, err = capsys.readouterr()
        assert out == line + "\n"
        assert "holds 3 of the 34 fineval subjects; evaluating those (missing: advanced_financial_accounting" in err
    # --json: the same answer as one JSON object, for the sweep.
    assert cli.main(["eval", "--task", "fineval", "--check_data", "--n_shot", "2", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert len(answer.pop("missing_subjects")) == 31
    assert answer == {
        "status": "usable",
        "message": line,
        "task": "fineval",
        "split": "val",
        "questions": 24,
        "few_shot_examples": 6,
        "subjects": 3,
        "subjects_asked": 34,
        "source": str(benchmark_fixtures_dir / "fineval"),
    }

    # Offline, nothing local: exit 3, the two ways to get data, no traceback. The variable set to a folder without
    # the benchmark falls through to the Hub as well. (In a child process: the Hub's cache folder is read at import.)
    for env, json_flag in (({}, []), ({"MINORSFT_EVAL_DATA_DIR": str(tmp_path)}, ["--json"])):
        unreachable = _run_cli(
            "eval", "--task", "ceval", "--check_data", *json_flag, env={"HF_HOME": str(tmp_path / "hf"), **env}
        )
        assert unreachable.returncode == 3, unreachable.stderr
        assert (
            "ceval/ceval-exam" in unreachable.stderr and "the Hugging Face Hub cannot be reached" in unreachable.stderr
        )
        assert "--data_dir FOLDER or set MINORSFT_EVAL_DATA_DIR" in unreachable.stderr
        assert "network access to the Hugging Face Hub" in unreachable.stderr
        assert "Traceback" not in unreachable.stderr
        if not json_flag:
            assert unreachable.stdout == ""
            continue
        answer = json.loads(unreachable.stdout)
        assert answer["status"] == "unreachable" and answer["message"] in unreachable.stderr
        # What failed, without the ways out (the sweep says those once for all benchmarks).
        assert re.search(r"^ceval/ceval-exam .*: the Hugging Face Hub cannot be reached \(\w+\)$", answer["reason"])
        assert "--data_dir" not in answer["reason"]

    # Malformed data and bad arguments: exit 2.
    bad = tmp_path / "bad" / "val"
    bad.mkdir(parents=True)
    (bad / "law_val.csv").write_text("id,question,A,B,C,D,answer\n0,Q,a,b,c,d,E\n", encoding="utf-8")
    message = "law_val.csv line 2: answer 'E' is not one of A, B, C, D"
    assert cli.main(["eval", "--task", "ceval", "--check_data", "--data_dir", str(tmp_path / "bad")]) == 2
    assert message in capsys.readouterr().err
    assert cli.main(["eval", "--task", "ceval", "--check_data", "--data_dir", str(tmp_path / "bad"), "--json"]) == 2
    out, err = capsys.readouterr()
    answer = json.loads(out)
    assert answer["status"] == "bad_input" and message in answer["reason"] and message in err
    assert cli.main(["eval", "--task", "ceval", "--data_dir", fixtures]) == 2
    assert "--model_name_or_path and --output_dir required (except with --check_data)" in capsys.readouterr().err
    assert cli.main(["eval", "--task", "ceval", "--data_dir", fixtures, "--json"]) == 2
    assert "--json goes with --check_data" in capsys.readouterr().err


# A benchmark the project does not ship, defined only here: a task file, its prompt next to it, CSV files.
CUSTOM_TASK = {
    "name": "Made-up arithmetic",
    "local_folder": "arith",
    "splits": ["val"],
    "unanswered_splits": {"test": "no answers here"},
    "few_shot_split": "dev",
    "file": "{split}/{subject}.csv",
    "columns": {"id": "Index", "question": "Prompt", "answer": "Key"},
    "prompt": "arith_prompt.txt",
    "subjects": {"sums": {"name": "加法", "category": "Math"}, "products": {"name": "乘法", "category": "Math"}},
}


def _write_custom_benchmark(root: Path) -> tuple:
    task_dir, data_dir = root / "my-benchmarks", root / "data" / "arith"
    task_dir.mkdir(parents=True)
    (task_dir / "arith.json").write_text(json.dumps(CUSTOM_TASK, ensure_ascii=False), encoding="utf-8")
    (task_dir / "arith_prompt.txt").write_text(
        "[system]\nAnswer with one letter.\n[user]\n{subject}: {question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\n",
        encoding="utf-8",
    )
    for subject, sign, operation in (("sums", "+", int.__add__), ("products", "*", int.__mul__)):
        for split, count in (("val", 3), ("dev", 2)):
            rows = ["Index,Prompt,A,B,C,D,Key"]
            for i in range(count):
                a, b = i + 2, i + 3
                right = operation(a, b)
                rows.append(f"{i},{a}{sign}{b}=?,{right + 1},{right},{right + 2},{right + 3},B")
            (data_dir / split).mkdir(parents=True, exist_ok=True)
            (data_dir / split / f"{subject}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return task_dir / "arith.json", data_dir


def test_a_benchmark_added_by_a_task_file_runs_through_the_cli(tiny_model_dir, tmp_path, cli_here):
    task_file, data_dir = _write_custom_benchmark(tmp_path)
    out = tmp_path / "out"
    done = cli_here(*_eval_args(str(task_file), out, tiny_model_dir, data_dir, "--n_shot", "1"))
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["task"] == "arith" and results["benchmark"] == "Made-up arithmetic"
    assert results["num_questions"] == 6 and set(results["subjects"]) == {"sums", "products"}
    assert results["categories"]["Math"]["num_questions"] == 6
    assert results["prompt"] == "paper" and results["missing_subjects"] == []
    # Through the environment variable too: <MINORSFT_EVAL_DATA_DIR>/<local_folder>.
    check = cli_here(
        "eval", "--task", str(task_file), "--check_data", env={"MINORSFT_EVAL_DATA_DIR": str(data_dir.parent)}
    )
    assert check.returncode == 0 and check.stdout.startswith("arith val: 6 questions in 2 of 2 subjects"), check.stderr


def test_a_broken_task_file_is_refused_before_the_model_loads(tmp_path):
    task_file, data_dir = _write_custom_benchmark(tmp_path)
    no_model = tmp_path / "no-model"  # never reached: every refusal must come first

    def refusal(definition=None):
        if definition is not None:
            task_file.write_text(json.dumps(definition, ensure_ascii=False), encoding="utf-8")
        done = _run_cli(*_eval_args(str(task_file), tmp_path / "out", no_model, data_dir))
        assert done.returncode == 2 and "Traceback" not in done.stderr and not (tmp_path / "out").exists()
        return done.stderr

    assert "missing key(s) columns.answer" in refusal({**CUSTOM_TASK, "columns": {"id": "Index", "question": "Prompt"}})
    assert "missing key(s) splits" in refusal({k: v for k, v in CUSTOM_TASK.items() if k != "splits"})
    message = refusal({**CUSTOM_TASK, "prompt": "absent_prompt.txt"})
    assert f"prompt file absent_prompt.txt not found (looked for {task_file.parent / 'absent_prompt.txt'}" in message
    task_file.write_text(json.dumps(CUSTOM_TASK, ensure_ascii=False), encoding="utf-8")
    (data_dir / "val" / "products.csv").unlink()
    done = _run_cli(*_eval_args(str(task_file), tmp_path / "out", no_model, data_dir, "--subjects", "sums,products"))
    assert done.returncode == 2 and f"{data_dir / 'val' / 'products.csv'}: file not found" in done.stderr
    for path in (data_dir / "val").iterdir():
        path.unlink()
    assert f"no val file of any arith subject (such as val/sums.csv) in {data_dir}" in refusal()
