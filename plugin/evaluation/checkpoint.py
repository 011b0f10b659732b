"""Loading a checkpoint the LLaMA-Factory way, so any checkpoint it trains (full, LoRA adapters, quantised) loads
here as it does for ``llamafactory-cli chat``, with the template it was trained with."""

import argparse

DTYPES = ["auto", "bfloat16", "float16", "float32"]


def add_device_and_dtype_arguments(parser: argparse.ArgumentParser, dtype_help: str) -> None:
    """``--device`` and ``--dtype``, read by ``load_tokenizer_and_template``."""
    parser.add_argument("--device", default="auto", help="auto (accelerate places the model), cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help=dtype_help)


def load_tokenizer_and_template(
    model_name_or_path: str, adapter_name_or_path: str | None, template: str | None, dtype: str, device: str
) -> tuple:
    """Tokenizer, template, and the parsed arguments that ``load_checkpoint`` needs; ``dtype`` and ``device`` as
    ``--dtype`` and ``--device`` take them."""
    import torch
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import get_infer_args
    from llamafactory.model import load_tokenizer

    infer_args = {"model_name_or_path": model_name_or_path, "template": template, "infer_dtype": dtype}
    if adapter_name_or_path:
        infer_args.update(adapter_name_or_path=adapter_name_or_path, finetuning_type="lora")
    model_args, data_args, finetuning_args, _ = get_infer_args(infer_args)
    if device != "auto":
        model_args.device_map = {"": torch.device(device)}
    tokenizer = load_tokenizer(model_args)["tokenizer"]
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    return tokenizer, template, (model_args, finetuning_args)


def load_checkpoint(tokenizer, loader_args: tuple):
    from llamafactory.model import load_model

    model_args, finetuning_args = loader_args
    model = load_model(tokenizer, model_args, finetuning_args)
    # LLaMA-Factory 0.9.5 loads weights in the checkpoint's dtype and only records the one it chose
    # (bf16 checkpoints would then run in bf16 on a CPU, which is several times slower than fp32).
    if not getattr(model, "is_quantized", False) and model.dtype != model_args.compute_dtype:
        model.to(model_args.compute_dtype)
    return model
