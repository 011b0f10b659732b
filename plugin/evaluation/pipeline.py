"""Questions to predictions: prompts through the template, then logits-mode scoring or generation."""

import torch

from .generation import generate_replies, parse_answer
from .results import Prediction
from .scoring import MAX_PADDING, build_messages, encode_question, score_choices
from .tasks import CHOICES


def encode_questions(template, tokenizer, questions: list, shots: dict, prompt, task) -> list:
    return [
        encode_question(
            template,
            tokenizer,
            build_messages(q, shots[q.subject], prompt, task.subjects[q.subject].name),
            prompt.system,
        )
        for q in questions
    ]


def predict(
    model,
    tokenizer,
    template,
    questions: list,
    encoded: list,
    choice_ids: list,
    mode: str,
    batch_size: int,
    padding_side: str = "left",
    max_new_tokens: int = 32,
    max_padding: float | None = MAX_PADDING,
) -> list:
    """One Prediction per question, in question order."""
    if mode == "logits":
        scores = score_choices(
            model, encoded, choice_ids, tokenizer.pad_token_id, batch_size, padding_side, max_padding
        )
        predicted, replies = [CHOICES[i] for i in scores.argmax(-1).tolist()], [None] * len(questions)
    else:
        stop_ids = template.get_stop_token_ids(tokenizer)
        replies, scores = generate_replies(model, tokenizer, encoded, choice_ids, stop_ids, batch_size, max_new_tokens)
        predicted = [parse_answer(reply) for reply in replies]
    probabilities = torch.softmax(scores, dim=-1).tolist()
    return [
        Prediction(question, letter, {c: round(p, 6) for c, p in zip(CHOICES, probs)}, reply)
        for question, letter, probs, reply in zip(questions, predicted, probabilities, replies)
    ]
