"""Generate ``finance_pref_demo.json``, the project's own finance preference pairs for the CPU MinorDPO demo.

Every pair is a question written by the finance Q&A generator (``make_finance_qa_demo.py``, the SFT demo set's),
with its correct answer as ``chosen`` and a plausible wrong one, written by the same generator, as ``rejected``:

- worked calculations: the same worked solution with one typical mistake (simple interest in place of compound,
  one period too few, a rate divided where it multiplies, ...; each generator's ``mistake`` says which);
- concept explanations: the definition of another glossary term (a swapped term);
- four-option multiple choice: a wrong letter;
- questions about a fictional company report: the answer to another question about the same report (another
  ratio), and for a question the report cannot answer, a confident answer from its figures instead of saying why.

Seeded, so ``python data/make_finance_pref_demo.py`` rewrites the file byte for byte (a test checks the committed
file). The pairs are shuffled, so any prefix (LLaMA-Factory's ``max_samples``) is a varied slice.
"""

import argparse
import importlib.util
import os
import random

SEED = 20240821
OUTPUT_NAME = "finance_pref_demo.json"
PER_CALCULATION = 6
CONCEPTS = 20
PER_CHOICE_KIND = 8
REPORTS = 6


def _qa_generator():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "make_finance_qa_demo.py")
    spec = importlib.util.spec_from_file_location("make_finance_qa_demo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pair(row: dict, rejected: str) -> dict:
    assert rejected != row["output"], row
    return {
        "system": row["system"],
        "instruction": row["instruction"],
        "input": row["input"],
        "chosen": row["output"],
        "rejected": rejected,
    }


def calculation_pairs(qa, make, rng: random.Random, count: int) -> list:
    """The generator's question with its answer, and the same draw answered with the generator's mistake."""
    pairs, seen = [], set()
    while len(pairs) < count:
        state = rng.getstate()
        right = make(rng)
        replay = random.Random()
        replay.setstate(state)
        wrong = make(replay, mistake=True)
        assert wrong["instruction"] == right["instruction"]
        if right["instruction"] not in seen:
            seen.add(right["instruction"])
            pairs.append(pair(right, wrong["output"]))
    return pairs


def concept_pairs(qa, rng: random.Random, count: int) -> list:
    terms = rng.sample(sorted(qa.GLOSSARY), count)
    pairs = []
    for term in terms:
        row = qa.concept(term, rng.choice(qa.CONCEPT_QUESTIONS))
        other = rng.choice([t for t in sorted(qa.GLOSSARY) if t != term])
        pairs.append(pair(row, f"{term}是指{qa.GLOSSARY[other]}。"))
    return pairs


def choice_pairs(qa, rng: random.Random, count: int) -> list:
    pairs = []
    for make in (qa.term_choice, qa.definition_choice, qa.numeric_choice):
        for row in qa.draw_distinct(make, rng, count):
            pairs.append(pair(row, rng.choice([letter for letter in "ABCD" if letter != row["output"]])))
    return pairs


def report_pairs(qa, rng: random.Random, count: int) -> list:
    pairs = []
    for _ in range(count):
        *answerable, unanswerable = qa.company_report(rng)
        for i, row in enumerate(answerable):
            pairs.append(pair(row, answerable[(i + 1) % len(answerable)]["output"]))
        pairs.append(pair(unanswerable, answerable[0]["output"]))
    return pairs


def build(seed: int = SEED) -> list:
    qa = _qa_generator()
    rng = random.Random(seed)
    pairs = []
    for make in qa.CALCULATIONS:
        pairs.extend(calculation_pairs(qa, make, rng, PER_CALCULATION))
    pairs.extend(concept_pairs(qa, rng, CONCEPTS))
    pairs.extend(choice_pairs(qa, rng, PER_CHOICE_KIND))
    pairs.extend(report_pairs(qa, rng, REPORTS))
    rng.shuffle(pairs)
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), OUTPUT_NAME))
    args = parser.parse_args()
    _qa_generator().write_json(build(), args.output, "pairs")


if __name__ == "__main__":
    main()
