"""Questions -> token ids through the model's LLaMA-Factory template, and logits-mode scoring.

A question is asked exactly as a training sample of that template would be: the prompt ids are what
``template.encode_oneturn`` puts before the response, and the answer tokens are the first response token
of "A".."D" under the same template.
"""

import inspect
from collections.abc import Iterator

import torch
from tqdm import tqdm

from .data import Question
from .tasks import CHOICES, Prompt

# Padding is computed like real tokens; on a CPU it costs as much as they do.
MAX_PADDING = 0.1


def build_messages(question: Question, shots: list, prompt: Prompt, subject_name: str) -> list[dict]:
    """Few-shot examples as earlier turns, then the question; the last (assistant) turn holds the gold letter,
    which ``encode_oneturn`` separates from the prompt."""
    messages = []
    for item in [*shots, question]:
        messages.append({"role": "user", "content": prompt.render(item.question, item.options, subject_name)})
        messages.append({"role": "assistant", "content": item.answer})
    return messages


def encode_question(template, tokenizer, messages: list[dict], system: str | None) -> list[int]:
    prompt_ids, _ = template.encode_oneturn(tokenizer, messages, system=system)
    return prompt_ids


def choice_token_ids(template, tokenizer) -> list[int]:
    """The token each answer letter starts with when the template encodes it as a response."""
    ids = []
    for choice in CHOICES:
        messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": choice}]
        _, response_ids = template.encode_oneturn(tokenizer, messages)
        first = tokenizer.decode(response_ids[:1])
        if first.strip() != choice:
            raise ValueError(
                f"the template starts a response {choice!r} with {first!r}, not with the letter; a reasoning "
                "template needs its `_nothink` variant for logits mode"
            )
        ids.append(response_ids[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"the answer letters share tokens under this tokenizer: {dict(zip(CHOICES, ids))}")
    return ids


def length_sorted_batches(lengths: list, batch_size: int, max_padding: float | None = MAX_PADDING) -> list:
    """Index batches, longest first (so memory trouble shows at once), of neighbours in length. A prompt joins
    a batch only while it needs less padding than ``max_padding`` times the batch's longest one (None: any)."""
    batches = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if (
            batches
            and len(batches[-1]) < batch_size
            and (max_padding is None or lengths[i] >= (1 - max_padding) * lengths[batches[-1][0]])
        ):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def pad_batch(sequences: list, pad_id: int, padding_side: str) -> tuple:
    """input_ids, attention_mask and position_ids; positions count real tokens only, so a left-padded row
    sees the same positions as unpadded."""
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, sequence in enumerate(sequences):
        start = width - len(sequence) if padding_side == "left" else 0
        input_ids[row, start : start + len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, start : start + len(sequence)] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def last_real_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    width = attention_mask.shape[-1]
    return (attention_mask * torch.arange(1, width + 1)).argmax(-1)


def model_device(model) -> torch.device:
    return getattr(model, "device", torch.device("cpu"))


def forward_accepts(model, name: str) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name in inspect.signature(base.forward).parameters


def progress_batches(
    encoded: list, batch_size: int, desc: str, max_padding: float | None = MAX_PADDING
) -> Iterator[list]:
    with tqdm(total=len(encoded), desc=desc, unit="question") as bar:
        for batch in length_sorted_batches([len(ids) for ids in encoded], batch_size, max_padding):
            yield batch
            bar.update(len(batch))


@torch.inference_mode()
def score_choices(
    model,
    encoded: list,
    choice_ids: list,
    pad_id: int,
    batch_size: int,
    padding_side: str = "left",
    max_padding: float | None = MAX_PADDING,
) -> torch.Tensor:
    """[questions, 4] float32 logits of the answer letters at the last prompt position; one forward pass
    per batch."""
    device = model_device(model)
    keep_logits = forward_accepts(model, "logits_to_keep")
    choice_index = torch.tensor(choice_ids, device=device)
    scores = torch.empty(len(encoded), len(choice_ids), dtype=torch.float32)
    for batch in progress_batches(encoded, batch_size, "Scoring", max_padding):
        input_ids, attention_mask, position_ids = pad_batch([encoded[i] for i in batch], pad_id, padding_side)
        last = last_real_positions(attention_mask)
        width = input_ids.shape[1]
        # Only the rows' last positions are read: ask for logits from the earliest of them on.
        extra = {"logits_to_keep": width - int(last.min())} if keep_logits else {}
        logits = model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=position_ids.to(device),
            **extra,
        ).logits
        rows = torch.arange(len(batch), device=logits.device)
        at_last = logits[rows, (last - (width - logits.shape[1])).to(logits.device)]
        scores[batch] = at_last[:, choice_index.to(logits.device)].float().cpu()
    return scores
