"""``minorsft drift-set``: samples of the reference as an eval set whose deviation estimates −KL(π_ref‖π_θ)."""

import json

import pytest
import torch
from llamafactory_minorsft.errors import UsageError
from llamafactory_minorsft.evaluation import drift_set
from llamafactory_minorsft.train.run_record import DRIFT_SET_KEY

from helpers import REPO_ROOT, read_log_history, run_llamafactory_train, tiny_train_config, write_sft_dataset

SHIPPED_PROMPTS = REPO_ROOT / "data" / "general_prompts.json"


def test_shipped_prompts_and_dataset_info_entry():
    prompts = drift_set.read_prompts(str(SHIPPED_PROMPTS))
    assert len(prompts) >= 40 and len({p["instruction"] for p in prompts}) == len(prompts)
    chinese = [p for p in prompts if any("\u4e00" <= ch <= "\u9fff" for ch in p["instruction"])]
    assert 10 <= len(chinese) <= len(prompts) - 10
    info = json.loads((REPO_ROOT / "data" / "dataset_info.json").read_text())
    for name in ("general_drift", "smollm2_general_drift"):  # marked, so that `minorsft report` reads them as drift
        assert info[name] == {"file_name": f"{name}.json", "columns": drift_set.COLUMNS, DRIFT_SET_KEY: True}
    assert not any(entry.get(DRIFT_SET_KEY) for name, entry in info.items() if "drift" not in name)


@pytest.mark.parametrize(
    "content, message",
    [
        ("[]", "expected a non-empty JSON list"),
        ('["ok", {"input": "x"}]', "row 1 needs a non-empty string `instruction`"),
        ('[{"instruction": "a", "input": 3}]', "row 0: `input` must be a string"),
        ("{", "not valid JSON"),
    ],
)
def test_bad_prompt_files_are_refused_naming_the_row(tmp_path, content, message):
    path = tmp_path / "prompts.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UsageError, match=message):
        drift_set.read_prompts(str(path))


class _BigramModel(torch.nn.Module):
    """Logits depend on the last token only: a distribution the sampler's frequencies can be checked against."""

    class Cache:
        def batch_select_indices(self, indices) -> None:
            pass

    def __init__(self, vocab: int = 5) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)) * 1.5)

    def forward(self, input_ids, past_key_values=None, **kwargs):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.table[input_ids], past_key_values=past_key_values or self.Cache())


def test_sampler_draws_from_the_softmax_and_repeats_with_the_seed_whatever_the_batching():
    model = _BigramModel()
    samples = drift_set.sample_from_reference(
        model, [[2]], stop_ids={4}, num_samples=20000, max_new_tokens=2, seed=7, batch_size=20000
    )[0]
    first = torch.tensor([sample[0] for sample in samples])
    expected = torch.softmax(model.table[2].detach(), -1)
    observed = torch.bincount(first, minlength=5).float() / len(samples)
    torch.testing.assert_close(observed, expected, atol=0.015, rtol=0)  # ~4 standard errors at n=20000
    # The second token is drawn given the first; a stop token ends a sample.
    after_zero = torch.tensor([sample[1] for sample in samples if sample[0] == 0])
    observed = torch.bincount(after_zero, minlength=5).float() / len(after_zero)
    torch.testing.assert_close(observed, torch.softmax(model.table[0].detach(), -1), atol=0.03, rtol=0)
    assert all(len(sample) == 1 for sample in samples if sample[0] == 4)
    # Each response has its own random stream: other prompts, fewer samples, other chunks change nothing.
    again = drift_set.sample_from_reference(
        model, [[2], [1, 3]], stop_ids={4}, num_samples=500, max_new_tokens=2, seed=7, batch_size=33
    )
    assert again[0] == samples[:500]
    assert again[1] != again[0]


@pytest.mark.slow
def test_padding_leaves_each_rows_distribution_as_it_is_alone(tiny_model_dir):
    """Prompts of different lengths decoded in one left-padded batch with the KV cache get, at every step, the
    next-token probabilities that each gets alone from a plain forward over its whole sequence. (Unmasked padding
    fails this; with RoPE, whose scores depend on relative positions only, the position ids matter for rounding
    alone, but models with absolute positions need them.) The tiny model is a Llama like SmolLM2, with its
    tokenizer: the batching, not the model, is under test."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    sequences = [[1, 504, 1458, 282, 260, 1784], [1, 1690, 314], [2, 504, 1458, 282, 1345, 9, 17, 42, 260, 88, 15]]

    def alone(ids):
        with torch.no_grad():
            return torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], -1)

    def check(batch):
        for row, ids in enumerate(sequences):
            torch.testing.assert_close(torch.softmax(batch.logits[row], -1), alone(ids), atol=1e-5, rtol=0)

    batch = drift_set.PaddedBatch(model, sequences)
    check(batch)
    for step in range(3):  # cached steps, each row given another token
        tokens = torch.tensor([100 + step, 1000 + step, 2000 + step])
        batch.advance(tokens)
        sequences = [ids + [token] for ids, token in zip(sequences, tokens.tolist())]
        check(batch)
    # A row that stopped leaves the batch; the others go on as before.
    batch.keep_rows([0, 2])
    sequences = [sequences[0], sequences[2]]
    check(batch)
    batch.advance(torch.tensor([7, 8]))
    sequences = [sequences[0] + [7], sequences[1] + [8]]
    check(batch)


def _response_logps(model, tokenizer, template, rows) -> torch.Tensor:
    """Independent of the plugin: (Σ log π(y_t|x, y_<t), m) per row, LLaMA-Factory's encoding of the row."""
    values = []
    for row in rows:
        messages = [{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": row["output"]}]
        prompt_ids, response_ids = template.encode_oneturn(tokenizer, messages)
        ids = torch.tensor([prompt_ids + response_ids])
        with torch.no_grad():
            logps = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
        targets = ids[0, 1:][len(prompt_ids) - 1 :]
        values.append((logps[len(prompt_ids) - 1 :].gather(-1, targets[:, None]).sum(), len(response_ids)))
    return values


@pytest.mark.slow
def test_drift_set_is_loaded_by_llamafactory_and_its_deviation_is_the_mean_log_ratio_of_its_samples(
    tmp_path, tiny_model_dir
):
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments
    from llamafactory_minorsft.cli import main
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data_dir = write_sft_dataset(tmp_path / "data", "tiny_sft", num_samples=8)
    command = [
        "drift-set",
        "--model_name_or_path",
        str(tiny_model_dir),
        "--template",
        "default",
        "--prompts",
        str(SHIPPED_PROMPTS),
        "--output_dir",
        str(data_dir),
        "--max_new_tokens",
        "6",
        "--num_samples",
        "2",
        "--keep_truncated",
        "--seed",
        "3",
    ]
    assert main(command) == 0  # `minorsft drift-set ...`, in this process
    rows = json.loads((data_dir / "general_drift.json").read_text(encoding="utf-8"))
    info = json.loads((data_dir / "dataset_info.json").read_text())
    assert set(info) == {"tiny_sft", "general_drift"}  # the existing entry is kept
    assert info["general_drift"][DRIFT_SET_KEY] is True  # `minorsft report` reads it as a drift set
    assert DRIFT_SET_KEY not in info["tiny_sft"]
    # Random tokens of the untrained model do not always survive decode + re-encode; most do.
    assert len(rows) >= 40 and len({row["prompt_index"] for row in rows}) >= 30

    output_dir = tmp_path / "run" / "out"
    config = tiny_train_config(
        tiny_model_dir,
        data_dir,
        output_dir,
        stage="sft",
        pref_beta=None,
        deviation_metric=True,
        max_steps=3,
        learning_rate=1.0e-2,
        cutoff_len=256,
        eval_dataset="tiny_sft,general_drift",
        eval_on_each_dataset=True,
        eval_strategy="steps",
        eval_steps=3,
        eval_on_start=True,
        per_device_eval_batch_size=8,
    )
    result = run_llamafactory_train(config, tmp_path / "run")
    assert result.returncode == 0, result.stderr[-4000:]
    evaluations = [entry for entry in read_log_history(output_dir) if "eval_general_drift_deviation" in entry]
    assert [entry["step"] for entry in evaluations] == [0, 3]
    # Each eval set is logged on its own entry, its metrics named after it.
    assert [entry["step"] for entry in read_log_history(output_dir) if "eval_tiny_sft_deviation" in entry] == [0, 3]
    assert abs(evaluations[0]["eval_general_drift_deviation"]) < 1e-5

    # The same estimate computed here, from the trained and the starting model, on the written samples.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    template = get_template_and_fix_tokenizer(tokenizer, DataArguments(template="default"))
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    trained = AutoModelForCausalLM.from_pretrained(output_dir, dtype=torch.float32).eval()
    ratios = [
        float(policy - ref) / tokens
        for (policy, tokens), (ref, _) in zip(
            _response_logps(trained, tokenizer, template, rows), _response_logps(reference, tokenizer, template, rows)
        )
    ]
    estimate = sum(ratios) / len(ratios)
    assert evaluations[-1]["eval_general_drift_deviation"] == pytest.approx(estimate, rel=1e-4, abs=1e-6)
    # Training moved the model on these samples, so the equality above is not 0 = 0. Its sign is not asserted: the
    # random model's samples are not all kept (about a third do not re-encode to their tokens), and the kept ones
    # are not samples of the reference, whose mean log-ratio would be -KL <= 0.
    assert abs(estimate) > 1e-3


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompts", "missing.json"], "--prompts missing.json: no such file"),
        (["--model_name_or_path", "./gone"], "--model_name_or_path ./gone: no such file or folder"),
        (["--num_samples", "0"], "--num_samples must be at least 1"),
        (["--batch_size", "0"], "--batch_size must be at least 1"),
        (["--dataset_name", "a/b"], "--dataset_name 'a/b'"),
    ],
)
def test_bad_arguments_exit_2_before_loading_the_model_and_write_nothing(tmp_path, capsys, extra, message):
    from llamafactory_minorsft.cli import main

    (tmp_path / "model").mkdir()  # refused before anything reads it
    args = [
        "drift-set",
        "--model_name_or_path",
        str(tmp_path / "model"),
        "--template",
        "default",
        "--prompts",
        str(SHIPPED_PROMPTS),
        "--output_dir",
        str(tmp_path / "out"),
    ]
    assert main(args + extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
