#!/usr/bin/env bash
# Reproduce the MinorSFT paper's sweep (arXiv 2408.10642 §4): train every method at every grid point with
# llamafactory-cli, evaluate each result and the base model with `minorsft eval`, and build the report with
# `minorsft report`. The sweep is `minorsft sweep` (plugin/sweep.py); this runs it with this checkout's
# Python ($PYTHON, default python3). Run `bash reproduce.sh --help`.
exec "${PYTHON:-python3}" -m llamafactory_minorsft.cli sweep "$@"
