#!/usr/bin/env bash
# Reproduce the MinorSFT paper's sweep (arXiv 2408.10642 §4): train every method at every grid point with
# llamafactory-cli, evaluate each result and the base model with `minorsft eval`, and build the report with
# `minorsft report`. The sweep is `minorsft sweep` (plugin/sweep/); this runs it with $PYTHON (default python3)
# on the files of the checkout this script is in: its recipes, data/, models/ and saves/ (--repo_root, which a
# later --repo_root overrides). Run `bash reproduce.sh --help`.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python3}" -m llamafactory_minorsft.cli sweep --repo_root "$here" "$@"
