"""Generate mode: greedy decoding and a strict parser that refuses to guess."""

import re

import torch

from .scoring import model_device, pad_batch, progress_batches

_OPEN, _CLOSE = r"[(（\[【]?", r"[)）\]】]?"
# A reply that starts with the letter, ended by punctuation, a line break or the end ("B", "B.", "(B)", "B、").
_LEADING = re.compile(rf"\s*{_OPEN}([A-D]){_CLOSE}(?=$|\n|[.．。、:：,，;；])")
# The letter named as the answer anywhere ("答案：B", "答案是 B", "The answer is (B)", "选择B").
_NAMED = re.compile(
    rf"(?:答案|正确选项|选择|选|(?i:answer))(?:\s|[:：]|是|为|应为|应该是|(?i:is))*{_OPEN}([A-D])(?![A-Za-z])"
)


def parse_answer(text: str) -> str | None:
    """The letter a reply commits to, or None when it names none or several different ones."""
    letters = set(_NAMED.findall(text))
    leading = _LEADING.match(text)
    if leading:
        letters.add(leading.group(1))
    return letters.pop() if len(letters) == 1 else None


@torch.inference_mode()
def generate_replies(
    model, tokenizer, encoded: list, choice_ids: list, stop_ids: list, batch_size: int, max_new_tokens: int
) -> tuple:
    """Greedy replies (texts) and, like logits mode, the [questions, 4] answer-letter logits at the first
    generated position. Generation pads on the left, as decoder-only generation must."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id
    )
    device = model_device(model)
    replies = [""] * len(encoded)
    scores = torch.empty(len(encoded), len(choice_ids), dtype=torch.float32)
    for batch in progress_batches(encoded, batch_size, "Generating"):
        input_ids, attention_mask, _ = pad_batch([encoded[i] for i in batch], tokenizer.pad_token_id, "left")
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=config,
            output_logits=True,
            return_dict_in_generate=True,
        )
        scores[batch] = output.logits[0][:, choice_ids].float().cpu()
        texts = tokenizer.batch_decode(output.sequences[:, input_ids.shape[1] :], skip_special_tokens=True)
        for i, text in zip(batch, texts):
            replies[i] = text.strip()
    return replies, scores
