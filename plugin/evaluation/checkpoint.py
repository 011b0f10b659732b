"""Loading a checkpoint the LLaMA-Factory way, so any checkpoint it trains (full, LoRA adapters, quantised) loads
here as it does for ``llamafactory-cli chat``, with the template it was trained with."""

import argparse

from ..errors import Unreachable, UsageError
from .data import hub_unreachable

DTYPES = ["auto", "bfloat16", "float16", "float32"]


def add_device_and_dtype_arguments(parser: argparse.ArgumentParser, dtype_help: str) -> None:
    """``--device`` and ``--dtype``, read by ``load_tokenizer_and_template``."""
    parser.add_argument("--device", default="auto", help="auto (accelerate places the model), cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help=dtype_help)


def check_hub_model(repo_id: str, flag: str, filename: str = "config.json") -> None:
    """A model (or adapter: ``adapter_config.json``) given as a Hub id: it is in the Hugging Face cache, or the Hub
    has it. One request, no retries: loading it would retry for about a minute before failing on an unreachable Hub
    (huggingface_hub's download retries), and then name neither the model nor the Hub."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RemoteEntryNotFoundError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(repo_id, filename), str):
        return
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename))
    except (RemoteEntryNotFoundError, GatedRepoError):  # the repository is there; loading it says the rest
        return
    except RepositoryNotFoundError:
        raise UsageError(f"{flag} {repo_id}: not a local folder, and the Hugging Face Hub has no such model") from None
    except Exception as error:  # noqa: BLE001 - what the Hub client raises when it gets no answer
        if hub_unreachable(error):
            raise Unreachable(
                f"{flag} {repo_id}: not a local folder nor in the Hugging Face cache, and the Hugging Face Hub "
                f"cannot be reached ({type(error).__name__})"
            ) from None
        raise


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
