"""``minorsft drift-set``: responses sampled from the reference model itself, as an evaluation set.

For general (non-domain) prompts ``x`` and responses ``y ~ π_ref(·|x)``,
``E[log π_θ(y|x) − log π_ref(y|x)] = −KL(π_ref(·|x) ‖ π_θ(·|x))``, so the deviation (Eq. 8) that the
trainer logs on this set, ``eval_<name>_deviation``, estimates minus that KL per token: a measure of
drift away from the domain that learning the domain does not raise (docs/method.md, "Two measures that
are easy to confuse").

The estimate is unbiased only for samples drawn from ``π_ref`` exactly, so sampling here is plain
ancestral sampling from the softmax of the reference's logits (temperature 1, no top-k/top-p/min-p, no
repetition penalty), written out rather than left to ``generate()``, whose defaults come from each
model's own ``generation_config``. A sample is kept only if LLaMA-Factory, encoding the written text
with the same template, gets back the very tokens that were sampled (decoding and re-encoding text does
not always give the same tokens).

The samples come from the same π_ref that the training run's reference computes: the model is loaded as
``minorsft eval`` loads it (LLaMA-Factory's loader) in the dtype that reference has, float32 on a CPU.
All prompts × samples are decoded together (in chunks of ``--batch_size`` rows), left-padded with an
attention mask and each row's own position ids, so padding does not change any row's distribution.
"""

import argparse
import hashlib
import json
import os
import time

from ..errors import UsageError
from ..files import (
    add_overwrite_argument,
    checked_output_file,
    local_path,
    local_path_or_hub_id,
    local_paths_or_hub_ids,
    write_text_atomically,
)
from ..train.run_record import DRIFT_SET_KEY
from .checkpoint import add_device_and_dtype_arguments

COLUMNS = {"prompt": "instruction", "query": "input", "response": "output"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Sample responses from the reference model for general prompts and write them as a LLaMA-Factory alpaca "
        "dataset plus its dataset_info.json entry. Evaluated as a second eval set (`eval_dataset: <domain>,NAME` "
        "with `eval_on_each_dataset: true`), `-eval_NAME_deviation` estimates KL(pi_ref || pi_theta) per token. "
        "Sampling is exact (temperature 1, no top-k, no top-p, no repetition penalty): anything else would not "
        "be a sample of pi_ref and the estimate would be biased."
    )
    parser.add_argument(
        "--model_name_or_path", required=True, help="the reference model (the model training starts from)"
    )
    parser.add_argument("--adapter_name_or_path", default=None, help="LoRA adapter(s) of the reference, if any")
    parser.add_argument("--template", required=True, help="the LLaMA-Factory template the training run uses")
    parser.add_argument(
        "--prompts",
        required=True,
        help="JSON list of prompts: strings, or objects with `instruction` (and optional `input`); "
        "the repository ships data/general_prompts.json",
    )
    parser.add_argument("--output_dir", required=True, help="where NAME.json and dataset_info.json are written")
    parser.add_argument("--dataset_name", default="general_drift", help="the dataset's name in dataset_info.json")
    add_overwrite_argument(parser, "NAME.json in --output_dir")
    parser.add_argument("--num_samples", type=int, default=2, help="responses sampled per prompt (default 2)")
    parser.add_argument(
        "--max_new_tokens",
        type=int,
        default=512,
        help="longest response (default 512); keep the training run's cutoff_len above prompt plus "
        "response, or LLaMA-Factory truncates the samples",
    )
    parser.add_argument(
        "--keep_truncated",
        action="store_true",
        help="keep responses that reached --max_new_tokens without ending; LLaMA-Factory then appends "
        "the template's end token, which pi_ref did not sample (default: drop them, and say how many)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed; the same seed gives the same dataset")
    parser.add_argument(
        "--batch_size",
        type=int,
        default=64,
        help="rows (prompt x sample) decoded together (default 64); lower it if memory runs out. It "
        "does not change which responses a seed gives beyond floating-point rounding",
    )
    add_device_and_dtype_arguments(
        parser,
        "the dtype of the sampling model; auto (default): the dtype the training run's reference has when "
        "it sets neither bf16 nor fp16, i.e. float32 with no GPU or other accelerator (or --device cpu), otherwise "
        "the checkpoint's dtype. Pass the training's dtype when it differs (bfloat16 for `bf16: true`), so that "
        "the samples come from the pi_ref that training computes",
    )


def read_prompts(path: str) -> list[dict]:
    """``[{"instruction": ..., "input": ...}]`` from a JSON list; a bad row is named by its index."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"--prompts {path}: no such file.") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"--prompts {path}: not valid JSON ({error}).") from None
    if not isinstance(rows, list) or not rows:
        raise UsageError(f"--prompts {path}: expected a non-empty JSON list of prompts.")
    prompts = []
    for index, row in enumerate(rows):
        if isinstance(row, str):
            row = {"instruction": row}
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
            raise UsageError(f"--prompts {path}: row {index} needs a non-empty string `instruction` (or is a string).")
        if not isinstance(row.get("input", ""), str):
            raise UsageError(f"--prompts {path}: row {index}: `input` must be a string.")
        prompts.append({"instruction": row["instruction"], "input": row.get("input", "")})
    return prompts


def prompt_text(prompt: dict) -> str:
    """The user turn as LLaMA-Factory's alpaca converter builds it from ``instruction`` and ``input``."""
    return prompt["instruction"] + ("\n" + prompt["input"] if prompt["input"] else "")


def _sampling_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """One seed per response, so that a response depends neither on the other prompts nor on the batching."""
    digest = hashlib.sha256(f"{seed}:{prompt_index}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class PaddedBatch:
    """Token sequences of different lengths decoded together with the KV cache.

    Rows are left-padded and masked, and each row gets explicit position ids (its own token count so far, minus
    one), so a padded row sees exactly the positions and keys it would see alone. ``logits`` holds each row's
    next-token logits; ``advance`` appends one token per row, ``keep_rows`` drops the rows not listed.
    """

    def __init__(self, model, sequences: list[list[int]]) -> None:
        import torch

        self.model = model
        device = next(model.parameters()).device
        width = max(map(len, sequences))
        input_ids = torch.zeros((len(sequences), width), dtype=torch.long)  # pad id 0: masked, any token does
        self.attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, ids in enumerate(sequences):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            self.attention_mask[row, width - len(ids) :] = 1
        self.attention_mask = self.attention_mask.to(device)
        position_ids = (self.attention_mask.cumsum(-1) - 1).clamp(min=0)
        self.next_positions = position_ids[:, -1:] + 1
        self.past_key_values = None
        self.logits = self._forward(input_ids.to(device), position_ids)

    def _forward(self, input_ids, position_ids):
        import torch

        with torch.no_grad():
            outputs = self.model(
                input_ids=input_ids,
                attention_mask=self.attention_mask,
                position_ids=position_ids,
                past_key_values=self.past_key_values,
                use_cache=True,
                logits_to_keep=1,
            )
        self.past_key_values = outputs.past_key_values
        return outputs.logits[:, -1]

    def advance(self, tokens) -> None:
        import torch

        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones((len(tokens), 1))], -1)
        position_ids = self.next_positions
        self.next_positions = position_ids + 1
        self.logits = self._forward(tokens[:, None].to(self.attention_mask.device), position_ids)

    def keep_rows(self, rows: list[int]) -> None:
        import torch

        index = torch.tensor(rows, device=self.attention_mask.device)
        self.past_key_values.batch_select_indices(index)
        self.attention_mask = self.attention_mask[index]
        self.next_positions = self.next_positions[index]
        self.logits = self.logits[index]


def _draw(logits, generators: list):
    """One token per row from softmax(logits), by inverting the row's CDF at a uniform from the row's generator."""
    import torch

    cdf = torch.softmax(logits.double(), dim=-1).cumsum(-1)
    uniforms = torch.cat([torch.rand(1, dtype=torch.float64, generator=generator) for generator in generators])
    targets = uniforms.to(cdf.device)[:, None] * cdf[:, -1:]
    # The first token whose cumulative probability exceeds the target: token k with probability p_k / sum(p);
    # a token of probability 0 is never drawn.
    return torch.searchsorted(cdf, targets, right=True)[:, 0].clamp_(max=cdf.shape[-1] - 1).cpu()


def sample_from_reference(
    model,
    prompts: list[list[int]],
    stop_ids: set,
    num_samples: int,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 64,
) -> list[list[list[int]]]:
    """For each prompt ``x``, ``num_samples`` responses ``y ~ π(·|x)``: each token from the softmax of the
    logits, nothing else.

    Every response has its own random stream (a CPU ``torch.Generator`` seeded from ``seed``, the prompt's
    index and the sample's index) and takes one uniform from it per token, turned into a token by inverting
    the CDF of softmax(logits) in float64. A response therefore depends only on its seed and the model's
    logits: not on the other prompts, the batch size or the order of the rows, except where padding changes
    a logit's floating-point rounding and a uniform falls on that boundary.

    Rows are decoded ``batch_size`` at a time, those of similar prompt length together; a row leaves its
    batch when it samples a stop token. Returns ``[prompt][sample] -> token ids``; a response that ended
    includes its stop token as its last token.
    """
    import torch

    rows = sorted(((p, s) for p in range(len(prompts)) for s in range(num_samples)), key=lambda r: len(prompts[r[0]]))
    responses = [[None] * num_samples for _ in prompts]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        generators = [torch.Generator().manual_seed(_sampling_seed(seed, p, s)) for p, s in chunk]
        for (prompt_index, sample_index), tokens in zip(
            chunk, _sample_batch(model, [prompts[p] for p, _ in chunk], generators, stop_ids, max_new_tokens)
        ):
            responses[prompt_index][sample_index] = tokens
    return responses


def _sample_batch(model, prompts: list[list[int]], generators: list, stop_ids: set, max_new_tokens: int):
    batch = PaddedBatch(model, prompts)
    responses = [[] for _ in prompts]
    active = list(range(len(prompts)))  # the response each row of the batch belongs to
    for step in range(max_new_tokens):
        tokens = _draw(batch.logits, [generators[row] for row in active])
        going_on = []
        for position, (row, token) in enumerate(zip(active, tokens.tolist())):
            responses[row].append(token)
            if token not in stop_ids:
                going_on.append(position)
        if not going_on or step == max_new_tokens - 1:
            break
        if len(going_on) < len(active):
            batch.keep_rows(going_on)
            tokens = tokens[going_on]
            active = [active[position] for position in going_on]
        batch.advance(tokens)
    return responses


def reference_dtype(model_name_or_path: str, device: str) -> str:
    """``--dtype auto``: float32 without an accelerator (LLaMA-Factory trains and holds the reference in float32
    on a CPU), else the checkpoint's own dtype."""
    from llamafactory.extras.misc import is_accelerator_available
    from transformers import AutoConfig

    if device == "cpu" or not is_accelerator_available():
        return "float32"
    config = AutoConfig.from_pretrained(model_name_or_path)
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "").replace("torch.", "")
    return dtype if dtype in ("bfloat16", "float16", "float32") else "float32"


def run(args) -> int:
    for key in ("num_samples", "max_new_tokens", "batch_size"):
        if getattr(args, key) < 1:
            raise UsageError(f"--{key} must be at least 1, got {getattr(args, key)}.")
    if not args.dataset_name.replace("_", "").replace("-", "").isalnum():
        raise UsageError(f"--dataset_name {args.dataset_name!r}: use letters, digits, '_' and '-' only.")
    model_name_or_path = local_path_or_hub_id(args.model_name_or_path, "--model_name_or_path")
    adapter_name_or_path = (
        local_paths_or_hub_ids(args.adapter_name_or_path, "--adapter_name_or_path")
        if args.adapter_name_or_path
        else None
    )
    prompts = read_prompts(local_path(args.prompts, "--prompts"))
    # The output folder is a dataset folder that may hold other datasets: the file this command writes is the unit
    # that --overwrite is about, and dataset_info.json gains (or replaces) one entry.
    output_dir = os.path.abspath(args.output_dir)
    file_name = f"{args.dataset_name}.json"
    data_path = checked_output_file(os.path.join(output_dir, file_name), args.overwrite, "--dataset_name")
    info_path = os.path.join(output_dir, "dataset_info.json")
    info = {}
    if os.path.isfile(info_path):
        try:
            with open(info_path, encoding="utf-8") as f:
                info = json.load(f)
        except json.JSONDecodeError as error:
            raise UsageError(f"{info_path} exists and is not valid JSON ({error}); it would be overwritten.") from None
        if not isinstance(info, dict):
            raise UsageError(f"{info_path} exists and is not a JSON object.")

    from .checkpoint import load_checkpoint, load_tokenizer_and_template

    dtype = reference_dtype(model_name_or_path, args.device) if args.dtype == "auto" else args.dtype
    tokenizer, template, loader_args = load_tokenizer_and_template(
        model_name_or_path, adapter_name_or_path, args.template, dtype, args.device
    )
    model = load_checkpoint(tokenizer, loader_args)
    model.eval()
    stop_ids = set(template.get_stop_token_ids(tokenizer))

    users = [{"role": "user", "content": prompt_text(prompt)} for prompt in prompts]
    prompt_ids = [template.encode_oneturn(tokenizer, [user, {"role": "assistant", "content": ""}])[0] for user in users]
    started = time.perf_counter()
    samples = sample_from_reference(
        model, prompt_ids, stop_ids, args.num_samples, args.max_new_tokens, args.seed, args.batch_size
    )
    seconds = time.perf_counter() - started
    rows, dropped = [], {"truncated": 0, "not_reencoded": 0}
    for index, (prompt, user) in enumerate(zip(prompts, users)):
        for sample_index, tokens in enumerate(samples[index]):
            ended = tokens[-1] in stop_ids
            if not ended and not args.keep_truncated:
                dropped["truncated"] += 1
                continue
            text = tokenizer.decode(tokens[:-1] if ended else tokens, skip_special_tokens=False)
            encoded_prompt, encoded_response = template.encode_oneturn(
                tokenizer, [user, {"role": "assistant", "content": text}]
            )
            if encoded_prompt != prompt_ids[index] or encoded_response[: len(tokens)] != tokens:
                dropped["not_reencoded"] += 1
                continue
            rows.append({**prompt, "output": text, "prompt_index": index, "sample_index": sample_index, "ended": ended})

    if not rows:
        raise UsageError(
            f"no sample kept ({dropped['truncated']} reached --max_new_tokens {args.max_new_tokens}, "
            f"{dropped['not_reencoded']} did not re-encode to their tokens); raise --max_new_tokens or --num_samples."
        )
    os.makedirs(output_dir, exist_ok=True)
    write_text_atomically(data_path, json.dumps(rows, ensure_ascii=False, indent=1))
    info[args.dataset_name] = {"file_name": file_name, "columns": dict(COLUMNS), DRIFT_SET_KEY: True}
    write_text_atomically(info_path, json.dumps(info, ensure_ascii=False, indent=2) + "\n")
    total = len(prompts) * args.num_samples
    print(
        f"Wrote {len(rows)} of {total} samples from {model_name_or_path} "
        f"({str(model.dtype).replace('torch.', '')}, sampled in {seconds:.0f} s) to {output_dir}/{file_name} "
        f"(dataset `{args.dataset_name}`; dropped {dropped['truncated']} that reached --max_new_tokens and "
        f"{dropped['not_reencoded']} whose text does not re-encode to the sampled tokens)."
    )
    return 0
