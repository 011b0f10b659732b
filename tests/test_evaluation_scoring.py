"""minorsft eval: the scoring path against a planted case (a stub module whose A-D logits are known),
padding and positions, the answer tokens of a real template, and the strict reply parser."""

from types import SimpleNamespace

import pytest
import torch
from llamafactory_minorsft.evaluation.data import Question
from llamafactory_minorsft.evaluation.generation import parse_answer
from llamafactory_minorsft.evaluation.pipeline import encode_questions, predict
from llamafactory_minorsft.evaluation.results import summarize
from llamafactory_minorsft.evaluation.scoring import (
    choice_token_ids,
    last_real_positions,
    length_sorted_batches,
    pad_batch,
)
from llamafactory_minorsft.evaluation.tasks import CHOICES, load_prompt, load_task


@pytest.fixture(scope="module")
def smollm2_template(tiny_model_dir):
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return tokenizer, get_template_and_fix_tokenizer(tokenizer, DataArguments(template="smollm2"))


def test_answer_tokens_are_the_bare_letters_for_smollm2(smollm2_template):
    tokenizer, template = smollm2_template
    ids = choice_token_ids(template, tokenizer)
    # After "<|im_start|>assistant\n" SmolLM2 answers with the letter token itself, not " A".
    assert ids == [tokenizer.convert_tokens_to_ids(letter) for letter in CHOICES] == [49, 50, 51, 52]
    assert ids != tokenizer.convert_tokens_to_ids(["ĠA", "ĠB", "ĠC", "ĠD"])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_keeps_positions_and_finds_the_last_real_token(side):
    input_ids, mask, positions = pad_batch([[5, 6, 7], [8], [1, 2, 3, 4, 9]], pad_id=0, padding_side=side)
    assert input_ids.shape == (3, 5) and mask.sum(-1).tolist() == [3, 1, 5]
    last = last_real_positions(mask)
    assert input_ids[torch.arange(3), last].tolist() == [7, 8, 9]
    for row in range(3):
        assert positions[row][mask[row].bool()].tolist() == list(range(int(mask[row].sum())))


def test_batches_are_length_sorted_and_cap_padding():
    lengths = [100, 50, 95, 300, 91, 89, 99, 100]
    assert length_sorted_batches(lengths, 3, max_padding=None) == [[3, 0, 7], [6, 2, 4], [5, 1]]
    # 89 would need 11% padding next to 100; 50 next to 89 even more.
    assert length_sorted_batches(lengths, 4, max_padding=0.1) == [[3], [0, 7, 6, 2], [4, 5], [1]]
    assert sorted(i for batch in length_sorted_batches(lengths, 2) for i in batch) == list(range(8))


class PlantedModel(torch.nn.Module):
    """Answers each prompt with a planted letter at its last real position, and with another letter everywhere
    else, so reading the wrong position (or mixing up rows after length sorting) changes the predictions."""

    def __init__(self, planted: dict, choice_ids: list, vocab_size: int):
        super().__init__()
        self.planted, self.choice_ids, self.vocab_size = planted, choice_ids, vocab_size
        self.seen_batch_sizes = []

    def logits_for(self, input_ids, attention_mask, position_ids):
        self.seen_batch_sizes.append(input_ids.shape[0])
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        for row in range(input_ids.shape[0]):
            real = attention_mask[row].nonzero().flatten()
            assert position_ids[row, real].tolist() == list(range(len(real)))
            letter = CHOICES.index(self.planted[tuple(input_ids[row, real].tolist())])
            logits[row, :, self.choice_ids[(letter + 1) % 4]] = 9.0
            logits[row, real[-1], :] = 0.0
            logits[row, real[-1], self.choice_ids[letter]] = 5.0
        return logits


class PlantedModelAllLogits(PlantedModel):
    def forward(self, input_ids, attention_mask, position_ids):
        return SimpleNamespace(logits=self.logits_for(input_ids, attention_mask, position_ids))


class PlantedModelKeepsLogits(PlantedModel):
    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep=0):
        logits = self.logits_for(input_ids, attention_mask, position_ids)
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


# subject -> planted letters for its questions; the gold answer is always the question's own letter below.
GOLD = {"accountant": "ABCD", "advanced_mathematics": "DCB", "art_studies": "AAB"}
PLANTED = {"accountant": "ABCA", "advanced_mathematics": "DAA", "art_studies": "BBA"}


def planted_questions():
    return [
        Question(
            subject,
            str(i),
            f"Question {i} of {subject}:" + " and more" * (3 * i + len(subject) % 5),
            ("one", "two", "three", "four"),
            gold,
            f"planted line {i}",
        )
        for subject, golds in GOLD.items()
        for i, gold in enumerate(golds)
    ]


@pytest.mark.parametrize("model_class", [PlantedModelAllLogits, PlantedModelKeepsLogits])
@pytest.mark.parametrize("batch_size, side", [(1, "left"), (4, "left"), (4, "right"), (16, "right")])
def test_planted_predictions_give_the_known_accuracy(smollm2_template, model_class, batch_size, side):
    tokenizer, template = smollm2_template
    task = load_task("ceval")
    questions = planted_questions()
    shots = {subject: [questions[0]] if subject == "art_studies" else [] for subject in GOLD}
    encoded = encode_questions(template, tokenizer, questions, shots, load_prompt("paper", task), task)
    planted_letters = [letter for subject in GOLD for letter in PLANTED[subject]]
    choice_ids = choice_token_ids(template, tokenizer)
    model = model_class(dict(zip(map(tuple, encoded), planted_letters)), choice_ids, len(tokenizer))

    # max_padding None: full batches of prompts of very different lengths, the hardest case for positions.
    predictions = predict(
        model, tokenizer, template, questions, encoded, choice_ids, "logits", batch_size, side, max_padding=None
    )

    assert [p.predicted for p in predictions] == planted_letters
    assert max(model.seen_batch_sizes) == min(batch_size, len(questions))
    assert all(
        p.probabilities[p.predicted]
        == pytest.approx(torch.softmax(torch.tensor([5.0, 0, 0, 0]), 0)[0].item(), abs=1e-6)
        for p in predictions
    )
    results = summarize(task, "val", predictions, {})
    assert (results["num_correct"], results["num_questions"]) == (4, 10)
    assert results["accuracy"] == pytest.approx(0.4)
    assert {key: (entry["num_correct"], entry["num_questions"]) for key, entry in results["subjects"].items()} == {
        "accountant": (3, 4),
        "advanced_mathematics": (1, 3),
        "art_studies": (0, 3),
    }
    assert results["macro_accuracy"] == pytest.approx((3 / 4 + 1 / 3 + 0) / 3)
    assert {key: entry["accuracy"] for key, entry in results["categories"].items()} == pytest.approx(
        {"Other": 3 / 4, "STEM": 1 / 3, "Humanities": 0.0}
    )


def test_prompts_go_through_the_template_with_the_right_system_slot(smollm2_template):
    tokenizer, template = smollm2_template
    question = Question("cpa", "0", "What is 2+2?", ("1", "2", "3", "4"), "D", "x")
    shot = Question("cpa", "9", "What is 1+1?", ("1", "2", "3", "4"), "B", "y")
    fiq = load_task("financeiq")
    encoded = encode_questions(template, tokenizer, [question], {"cpa": [shot]}, load_prompt("paper", fiq), fiq)
    text = tokenizer.decode(encoded[0])
    assert text.startswith("<|im_start|>system\nPlease answer the questions based on the context provided.")
    options = "\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:<|im_end|>\n<|im_start|>assistant\n"
    assert f"<|im_start|>user\nWhat is 1+1?{options}B<|im_end|>\n" in text
    assert text.endswith(f"<|im_start|>user\nWhat is 2+2?{options}")

    ceval = load_task("ceval")
    question = Question("accountant", "0", "2+2?", ("1", "2", "3", "4"), "D", "x")
    text = tokenizer.decode(
        encode_questions(template, tokenizer, [question], {"accountant": []}, load_prompt("paper", ceval), ceval)[0]
    )
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # the template's default
    assert "<|im_start|>user\nYou need to choose one of the four options" in text


@pytest.mark.parametrize(
    "reply, letter",
    [
        ("B", "B"),
        (" C.", "C"),
        ("(A)", "A"),
        ("D、选项内容", "D"),
        ("A\nbecause", "A"),
        ("答案：C", "C"),
        ("答案是 B。", "B"),
        ("The answer is (D).", "D"),
        ("Answer: A", "A"),
        ("我选择B", "B"),
        ("【C】", "C"),
        ("A. first, but the answer is B", None),  # two different letters named
        ("A lot depends on the context", None),  # a word, not an answer
        ("I am not sure.", None),
        ("", None),
        ("E", None),
        ("BC", None),
        ("answer: b", None),
    ],
)
def test_reply_parser_is_strict(reply, letter):
    assert parse_answer(reply) == letter
