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
"""

import argparse
import hashlib
import json
import os
import sys

from .files import (
    add_overwrite_argument,
    checked_output_file,
    local_path,
    local_path_or_hub_id,
    local_paths_or_hub_ids,
    write_text_atomically,
)

DEFAULT_PROMPTS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "general_prompts.json"
)
COLUMNS = {"prompt": "instruction", "query": "input", "response": "output"}
# The mark in the dataset's dataset_info.json entry by which `minorsft report` tells a drift set from held-out domain
# data; LLaMA-Factory ignores keys it does not know.
DRIFT_SET_KEY = "drift_set"


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
    parser.add_argument("--prompts", required=True,
                        help="JSON list of prompts: strings, or objects with `instruction` (and optional `input`); "
                        "the repository ships data/general_prompts.json")
    parser.add_argument("--output_dir", required=True, help="where NAME.json and dataset_info.json are written")
    parser.add_argument("--dataset_name", default="general_drift", help="the dataset's name in dataset_info.json")
    add_overwrite_argument(parser, "NAME.json in --output_dir")
    parser.add_argument("--num_samples", type=int, default=2, help="responses sampled per prompt (default 2)")
    parser.add_argument("--max_new_tokens", type=int, default=512,
                        help="longest response (default 512); keep the training run's cutoff_len above prompt plus "
                        "response, or LLaMA-Factory truncates the samples")
    parser.add_argument("--keep_truncated", action="store_true",
                        help="keep responses that reached --max_new_tokens without ending; LLaMA-Factory then appends "
                        "the template's end token, which pi_ref did not sample (default: drop them, and say how many)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed; the same seed gives the same dataset")


class DriftSetError(ValueError):
    pass


def read_prompts(path: str) -> list[dict]:
    """``[{"instruction": ..., "input": ...}]`` from a JSON list; a bad row is named by its index."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except FileNotFoundError:
        raise DriftSetError(f"--prompts {path}: no such file.") from None
    except json.JSONDecodeError as error:
        raise DriftSetError(f"--prompts {path}: not valid JSON ({error}).") from None
    if not isinstance(rows, list) or not rows:
        raise DriftSetError(f"--prompts {path}: expected a non-empty JSON list of prompts.")
    prompts = []
    for index, row in enumerate(rows):
        if isinstance(row, str):
            row = {"instruction": row}
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
            raise DriftSetError(
                f"--prompts {path}: row {index} needs a non-empty string `instruction` (or is a string)."
            )
        if not isinstance(row.get("input", ""), str):
            raise DriftSetError(f"--prompts {path}: row {index}: `input` must be a string.")
        prompts.append({"instruction": row["instruction"], "input": row.get("input", "")})
    return prompts


def prompt_text(prompt: dict) -> str:
    """The user turn as LLaMA-Factory's alpaca converter builds it from ``instruction`` and ``input``."""
    return prompt["instruction"] + ("\n" + prompt["input"] if prompt["input"] else "")


def _sampling_seed(seed: int, index: int) -> int:
    """One seed per prompt, so a prompt's samples do not depend on the others."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little") >> 1


def sample_from_reference(
    model, prompt_ids: list[int], stop_ids: set, num_samples: int, max_new_tokens: int, seed: int
):
    """``num_samples`` responses ``y ~ π(·|x)``: each token from the softmax of the logits, nothing else.

    Returns token lists; a response that ended includes its stop token as its last token.
    """
    import torch

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    input_ids = torch.tensor([prompt_ids] * num_samples, device=device)
    responses = [[] for _ in range(num_samples)]
    finished = [False] * num_samples
    past = None
    with torch.no_grad():
        for _ in range(max_new_tokens):
            outputs = model(input_ids=input_ids, past_key_values=past, use_cache=True)
            past = outputs.past_key_values
            probs = torch.softmax(outputs.logits[:, -1].float(), dim=-1)
            tokens = torch.multinomial(probs, 1, generator=generator)
            for row, token in enumerate(tokens[:, 0].tolist()):
                if not finished[row]:
                    responses[row].append(token)
                    finished[row] = token in stop_ids
            if all(finished):
                break
            input_ids = tokens
    return responses


def run(args) -> int:
    try:
        return _run(args)
    except DriftSetError as error:
        print(f"minorsft drift-set: {error}", file=sys.stderr)
        return 2


def _run(args) -> int:
    for key in ("num_samples", "max_new_tokens"):
        if getattr(args, key) < 1:
            raise DriftSetError(f"--{key} must be at least 1, got {getattr(args, key)}.")
    if not args.dataset_name.replace("_", "").replace("-", "").isalnum():
        raise DriftSetError(f"--dataset_name {args.dataset_name!r}: use letters, digits, '_' and '-' only.")
    args.model_name_or_path = local_path_or_hub_id(args.model_name_or_path, "--model_name_or_path")
    if args.adapter_name_or_path:
        args.adapter_name_or_path = local_paths_or_hub_ids(args.adapter_name_or_path, "--adapter_name_or_path")
    prompts = read_prompts(local_path(args.prompts, "--prompts"))
    # The output folder is a dataset folder that may hold other datasets: the file this command writes is the unit
    # that --overwrite is about, and dataset_info.json gains (or replaces) one entry.
    args.output_dir = os.path.abspath(args.output_dir)
    file_name = f"{args.dataset_name}.json"
    data_path = checked_output_file(os.path.join(args.output_dir, file_name), args.overwrite, "--dataset_name")
    info_path = os.path.join(args.output_dir, "dataset_info.json")
    info = {}
    if os.path.isfile(info_path):
        try:
            with open(info_path, encoding="utf-8") as f:
                info = json.load(f)
        except json.JSONDecodeError as error:
            raise DriftSetError(
                f"{info_path} exists and is not valid JSON ({error}); it would be overwritten."
            ) from None
        if not isinstance(info, dict):
            raise DriftSetError(f"{info_path} exists and is not a JSON object.")

    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import get_infer_args
    from llamafactory.model import load_model, load_tokenizer

    infer_args = {"model_name_or_path": args.model_name_or_path, "template": args.template, "infer_dtype": "auto"}
    if args.adapter_name_or_path:
        infer_args.update(adapter_name_or_path=args.adapter_name_or_path, finetuning_type="lora")
    model_args, data_args, finetuning_args, _ = get_infer_args(infer_args)
    tokenizer = load_tokenizer(model_args)["tokenizer"]
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    model = load_model(tokenizer, model_args, finetuning_args, is_trainable=False)
    model.eval()
    stop_ids = set(template.get_stop_token_ids(tokenizer))

    rows, dropped = [], {"truncated": 0, "not_reencoded": 0}
    for index, prompt in enumerate(prompts):
        user = {"role": "user", "content": prompt_text(prompt)}
        prompt_ids, _ = template.encode_oneturn(tokenizer, [user, {"role": "assistant", "content": ""}])
        samples = sample_from_reference(
            model, prompt_ids, stop_ids, args.num_samples, args.max_new_tokens, _sampling_seed(args.seed, index)
        )
        for sample_index, tokens in enumerate(samples):
            ended = tokens[-1] in stop_ids
            if not ended and not args.keep_truncated:
                dropped["truncated"] += 1
                continue
            text = tokenizer.decode(tokens[:-1] if ended else tokens, skip_special_tokens=False)
            encoded_prompt, encoded_response = template.encode_oneturn(
                tokenizer, [user, {"role": "assistant", "content": text}]
            )
            if encoded_prompt != prompt_ids or encoded_response[: len(tokens)] != tokens:
                dropped["not_reencoded"] += 1
                continue
            rows.append({**prompt, "output": text, "prompt_index": index, "sample_index": sample_index, "ended": ended})

    if not rows:
        raise DriftSetError(
            f"no sample kept ({dropped['truncated']} reached --max_new_tokens {args.max_new_tokens}, "
            f"{dropped['not_reencoded']} did not re-encode to their tokens); raise --max_new_tokens or --num_samples."
        )
    os.makedirs(args.output_dir, exist_ok=True)
    write_text_atomically(data_path, json.dumps(rows, ensure_ascii=False, indent=1))
    info[args.dataset_name] = {"file_name": file_name, "columns": dict(COLUMNS), DRIFT_SET_KEY: True}
    write_text_atomically(info_path, json.dumps(info, ensure_ascii=False, indent=2) + "\n")
    total = len(prompts) * args.num_samples
    print(
        f"Wrote {len(rows)} of {total} samples from {args.model_name_or_path} to {args.output_dir}/{file_name} "
        f"(dataset `{args.dataset_name}`; dropped {dropped['truncated']} that reached --max_new_tokens and "
        f"{dropped['not_reencoded']} whose text does not re-encode to the sampled tokens)."
    )
    return 0
