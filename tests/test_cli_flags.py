"""Every CLI flag is exercised, and every flag reaches what it controls.

- A check lists every option of every sub-command's parser and fails for any that no test names (in a test file
  that also names the sub-command).
- A table drives ``hf-slicegpt slice`` through its options and checks, per option, the field of the saved
  ``config.json`` / ``slicing_report.json`` it controls. The slicing settings are read from ``config.slicing``,
  which the slicer writes from what it actually used, so an option that is parsed and then dropped fails.
- ``rft``: the saved ``adapter_config.json`` and the Trainer's own state must show the requested LoRA and
  training settings (the report copies the config, so it alone could claim values training never used).
- ``push`` flags reach the Hub calls; ``generate`` really samples; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import save_tiny_checkpoint, single_thread, write_corpus

from hf_slicegpt import cli
from hf_slicegpt.workflows import evaluation as evaluation_module
from hf_slicegpt.workflows.data import evaluation_tokens

TESTS = Path(__file__).parent
HIDDEN = 32  # tests/tiny.py's hidden size


# ------------------------------------------------------------------------------------------ every flag named


def _subcommand_options() -> dict[str, list[str]]:
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {
        name: sorted(
            {opt for action in sub._actions for opt in action.option_strings if opt.startswith("--")}
        )
        for name, sub in subparsers.choices.items()
    }


# Options every sub-command gets from one shared helper (argparse's --help, add_logging_options): the same code
# for all, exercised for every sub-command by test_cli.py (help) and for several by the CLI tests.
SHARED_OPTIONS = ("--help", "--quiet", "--verbose")


def test_every_cli_flag_is_exercised_by_a_test() -> None:
    """Static: each ``--flag`` of each sub-command appears in a test file that also names that sub-command.

    Names only; the tests below check that each flag does what it says.
    """
    sources = [path.read_text(encoding="utf-8") for path in TESTS.glob("test_*.py")]
    missing = []
    for command, options in _subcommand_options().items():
        files = [text for text in sources if re.search(rf"[\"']{command}[\"']", text)]
        for option in options:
            pattern = re.compile(rf"[\"']{re.escape(option)}(?:[\"'=])")
            if not any(pattern.search(text) for text in (sources if option in SHARED_OPTIONS else files)):
                missing.append(f"{command} {option}")
    assert not missing, f"CLI flags no test exercises: {missing}"


def test_the_flag_check_sees_every_subcommand() -> None:
    """The listing is complete (its names are built here, so that this file does not count as exercising them)."""
    options = _subcommand_options()
    assert set(options) == set(cli.SUBCOMMANDS)
    for command, name in [
        ("slice", "vocab-prior"),
        ("rft", "lora-alpha"),
        ("push", "keep-card"),
        ("eval", "limit"),
    ]:
        assert "--" + name in options[command]
    assert all(set(SHARED_OPTIONS) <= set(found) for found in options.values())


# ------------------------------------------------------------------------------------------ slice: a table


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flags")
    return {
        "root": root,
        "dense": save_tiny_checkpoint(root / "dense"),
        "corpus": write_corpus(root / "corpus.txt", chars=8_000),
    }


@dataclass
class SliceRun:
    report: dict[str, Any]
    config: dict[str, Any]
    output: Path
    eval_batch_sizes: list[int] = field(default_factory=list)

    @property
    def slicing(self) -> dict[str, Any]:
        return self.config["slicing"]


BASE = ["--calibration", "CORPUS", "--num-samples", "4", "--seq-len", "32", "--device", "cpu", "-q"]
# One slicing run per group of flags that go together; every flag's value differs from its default.
RUNS: dict[str, list[str]] = {
    "layer": [
        "--sparsity", "0.3", "--round-to", "4", "--no-slice-head", "--mid-basis", "own",
        "--tied-embeddings", "untie", "--vocab-prior", "0.5", "--rotation", "layer", "--batch-size", "3",
        "--seed", "7", "--dtype", "float32", "--offload", "cpu", "--eval-data", "CORPUS", "--eval-split", "all",
        "--eval-batch-size", "2",
    ],
    "shared": [
        "--sparsity", "0.25", "--mid-basis", "shared", "--tied-embeddings", "project", "--eval-data", "CORPUS",
        "--eval-max-tokens", "96", "--correction-fraction", "0.5", "--broad-mix", "0.125", "--correction-basis", "dense",
        "--correction-shortcuts", "--num-samples", "8",  # 8 windows: the mix keeps 5 of them (4 would be too few)
    ],
    "global": ["--sparsity", "0.25", "--rotation", "global", "--tied-embeddings", "slice", "--schedule", "const"],
    "variance": ["--sparsity", "0.25", "--schedule", "variance", "--correction", "none", "--broad-mix", "0"],
}  # fmt: skip


def _slice(work: dict[str, Path], name: str) -> SliceRun:
    out = work["root"] / f"sliced-{name}"
    argv = ["slice", str(work["dense"]), "--output", str(out), *BASE, *RUNS[name]]
    argv = [str(work["corpus"]) if a == "CORPUS" else a for a in argv]
    seen: list[int] = []
    original = evaluation_module.perplexity

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("batch_size", 1))
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluation_module, "perplexity", spy)
        assert cli.main(argv) == 0, argv
    return SliceRun(
        report=json.loads((out / "slicing_report.json").read_text()),
        config=json.loads((out / "config.json").read_text()),
        output=out,
        eval_batch_sizes=seen,
    )


@pytest.fixture(scope="module")
def slice_runs(work: dict[str, Path]) -> Callable[[str], SliceRun]:
    cache: dict[str, SliceRun] = {}

    def get(name: str) -> SliceRun:
        if name not in cache:
            cache[name] = _slice(work, name)
        return cache[name]

    return get


def _held_out_tokens(work: dict[str, Path], **kwargs: Any) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(work["dense"])
    windows = evaluation_tokens(tokenizer, str(work["corpus"]), seq_len=32, **kwargs)
    return windows.shape[0] * (windows.shape[1] - 1)


# (flag, run, check): the check reads the field the flag controls; `w` is the work dict.
SLICE_FLAGS: list[tuple[str, str, Callable[[SliceRun, dict[str, Path]], bool]]] = [
    ("--sparsity", "layer", lambda r, w: r.slicing["sparsity"] == 0.3),
    ("--round-to", "layer", lambda r, w: r.slicing["round_to"] == 4 and r.config["attn_input_dims"] == [20, 20]),
    ("--no-slice-head", "layer", lambda r, w: r.slicing["slice_head"] is False and r.config["head_input_dim"] == HIDDEN),
    ("--mid-basis", "layer", lambda r, w: r.slicing["mid_basis"] == "own" and r.config["attn_shortcuts"] == [True, True]),
    ("--mid-basis", "shared", lambda r, w: r.slicing["mid_basis"] == "shared" and r.config["attn_shortcuts"] == [False, False]),
    ("--tied-embeddings", "layer", lambda r, w: r.slicing["tied_embeddings"] == "untie" and not r.config["tie_word_embeddings"] and not r.config["head_proj"]),
    ("--tied-embeddings", "shared", lambda r, w: r.slicing["tied_embeddings"] == "project" and r.config["embed_proj"] and r.config["head_proj"]),
    ("--tied-embeddings", "global", lambda r, w: r.slicing["tied_embeddings"] == "slice" and not r.config["embed_proj"] and r.config["head_proj"]),
    ("--vocab-prior", "layer", lambda r, w: r.slicing["vocab_prior"] == 0.5),
    ("--rotation", "global", lambda r, w: r.slicing["rotation"] == "global" and not any(r.config["attn_shortcuts"])),
    ("--schedule", "variance", lambda r, w: r.slicing["schedule"] == "variance" and "variance_fraction" in r.slicing),
    ("--correction", "variance", lambda r, w: r.slicing["correction"] == {"method": "none"} and r.slicing["config"]["correction"] == "none"),
    ("--correction-fraction", "shared", lambda r, w: r.slicing["correction"]["method"] == "ridge" and r.slicing["correction"]["fraction"] == 0.5),
    ("--correction-basis", "shared", lambda r, w: r.slicing["config"]["correction_basis"] == "dense"),
    ("--correction-shortcuts", "shared", lambda r, w: r.slicing["correction"]["shortcuts"] is True),
    ("--broad-mix", "variance", lambda r, w: r.report["settings"]["broad_mix"] == 0 and "broad_mix_kinds" not in r.report["settings"] and "broad mix" not in (Path(r.output) / "README.md").read_text()),
    ("--broad-mix", "shared", lambda r, w: r.report["settings"]["broad_mix"] == 0.125 and "0.125 of the windows per kind (code, structured, prose)" in (Path(r.output) / "README.md").read_text()),
    ("--num-samples", "layer", lambda r, w: r.report["settings"]["broad_mix"] == 0 and "too few windows" in r.report["settings"]["broad_mix_skipped"] and "broad_mix_kinds" not in r.report["settings"] and "skipped (too few calibration windows" in (Path(r.output) / "README.md").read_text()),
    ("--batch-size", "layer", lambda r, w: r.report["settings"]["batch_size"] == 3),
    ("--seed", "layer", lambda r, w: r.report["settings"]["seed"] == 7),
    ("--dtype", "layer", lambda r, w: r.report["settings"]["dtype"] == "float32" and r.config["dtype"] == "float32"),
    ("--offload", "layer", lambda r, w: r.report["settings"]["offload"] == "cpu"),
    ("--num-samples", "layer", lambda r, w: r.slicing["calibration_sequences"] == 4),
    ("--seq-len", "layer", lambda r, w: r.slicing["calibration_tokens"] == 4 * 32),
    ("--calibration", "layer", lambda r, w: r.report["settings"]["calibration"] == w["corpus"].name),  # no paths
    # evaluation: the whole text with --eval-split all (else its held-out tail); capped by --eval-max-tokens
    ("--eval-data", "layer", lambda r, w: r.report["perplexity"]["data"] == str(w["corpus"])),
    ("--eval-split", "layer", lambda r, w: r.report["perplexity"]["tokens"] == _held_out_tokens(w, split="all")),
    ("--eval-max-tokens", "shared", lambda r, w: r.report["perplexity"]["tokens"] == 3 * 31),
    ("--eval-batch-size", "layer", lambda r, w: r.eval_batch_sizes == [2, 2]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("flag", "run", "check"), SLICE_FLAGS, ids=[f"{flag}-{run}" for flag, run, _ in SLICE_FLAGS]
)
def test_slice_flag_reaches_the_field_it_controls(slice_runs, work, flag: str, run: str, check) -> None:
    result = slice_runs(run)
    assert flag in RUNS[run] or flag in BASE
    assert check(result, work), (flag, result.slicing, result.report["settings"])


def test_the_slice_table_covers_every_model_option() -> None:
    from hf_slicegpt.cli.slice import SLICE_MODEL_OPTIONS

    assert {flag for flag, _ in SLICE_MODEL_OPTIONS} <= {flag for flag, _, _ in SLICE_FLAGS}


def test_eval_split_changes_what_is_evaluated(work) -> None:
    """The premise of the --eval-split row: the whole text is more tokens than its held-out tail."""
    assert _held_out_tokens(work, split="all") > 5 * _held_out_tokens(work)


def test_no_slice_head_checkpoint_works(slice_runs) -> None:
    """slice_head=False: the head reads the full width; the checkpoint loads, validates and generates."""
    from transformers import AutoModelForCausalLM

    from hf_slicegpt.checkpoint.validation import validate_checkpoint

    result = slice_runs("layer")
    assert validate_checkpoint(result.output).sliced
    model = AutoModelForCausalLM.from_pretrained(result.output)
    assert model.lm_head.in_features == HIDDEN and model.config.attn_input_dims == [20, 20]
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    generated = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 16)


def test_no_slice_head_in_python_is_exact_at_zero_and_round_trips(tmp_path) -> None:
    from tiny import calibration, make_tiny
    from transformers import AutoModelForCausalLM

    import hf_slicegpt

    for sparsity in (0.0, 0.25):
        dense = make_tiny("llama")
        ids = calibration(n=2, seq_len=10, seed=3)
        with torch.no_grad():
            expected = dense(input_ids=ids).logits
        sliced = hf_slicegpt.slice_model(
            dense, calibration(), sparsity, slice_head=False, show_progress=False
        )
        assert sliced.config.head_input_dim == HIDDEN and sliced.config.slicing["slice_head"] is False
        with torch.no_grad():
            got = sliced(input_ids=ids).logits
        if sparsity == 0:
            assert (got - expected).abs().max() < 1e-4
        sliced.save_pretrained(tmp_path / str(sparsity))
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / str(sparsity))
        with torch.no_grad():
            assert torch.equal(reloaded(input_ids=ids).logits, got)


# ------------------------------------------------------------------------------------------ rft


def test_rft_flags_reach_peft_and_the_trainer(work, tmp_path, capsys) -> None:
    """Every rft option, checked against what PEFT saved and what the Trainer did (not the report's copy)."""
    import hf_slicegpt

    sliced = tmp_path / "sliced"
    base = [str(work["corpus"]) if a == "CORPUS" else a for a in BASE]
    assert cli.main(["slice", str(work["dense"]), "--sparsity", "0.25", "-o", str(sliced), *base]) == 0
    capsys.readouterr()
    corpus = tmp_path / "train.txt"
    corpus.write_text("\n\n".join(f"Line {i} of a small corpus, number {i * 3 % 11}." for i in range(150)))
    checkpoints = tmp_path / "ckpts"
    out = tmp_path / "adapter"
    argv = [
        "rft", str(sliced), "--data", str(corpus), "--output", str(out), "--no-merge", "--json",
        "--seq-len", "16", "--num-samples", "8", "--batch-size", "2", "--grad-accum", "2", "--epochs", "2",
        "--lr", "0.004", "--lr-scheduler", "constant_with_warmup", "--warmup-steps", "2",
        "--lora-r", "4", "--lora-alpha", "7", "--lora-dropout", "0.2",
        "--target-modules", "q_proj,down_proj", "--target-shortcuts",
        "--checkpoint-dir", str(checkpoints), "--save-steps", "2", "--keep-checkpoints",
        "--eval-data", str(corpus), "--eval-seq-len", "8", "--eval-max-tokens", "64",
        "--seed", "3", "--logging-steps", "1", "--device", "cpu",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)

    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 7 and adapter["lora_dropout"] == 0.2
    assert set(adapter["target_modules"]) == {"q_proj", "down_proj", "attn_shortcut", "mlp_shortcut"}
    # 8 sequences / (2 per batch x 2 accumulated) = 2 steps per epoch, 2 epochs
    assert report["training"]["global_step"] == 4 and report["training"]["seq_len"] == 16
    assert report["training"]["sequences"] == 8
    assert report["perplexity"]["seq_len"] == 8 and report["perplexity"]["tokens"] == 8 * 7
    kept = sorted(p.name for p in checkpoints.iterdir())
    assert kept == ["checkpoint-2", "checkpoint-4"]  # --save-steps 2, --keep-checkpoints
    state = json.loads((checkpoints / "checkpoint-4" / "trainer_state.json").read_text())
    rates = [row["learning_rate"] for row in state["log_history"] if "learning_rate" in row]
    assert len(rates) >= 4  # --logging-steps 1
    assert rates[0] < 0.004 and rates[-1] == pytest.approx(0.004)  # warmup, then constant at --lr
    assert report["settings"]["seed"] == 3
    args = torch.load(checkpoints / "checkpoint-4" / "training_args.bin", weights_only=False)
    assert args.seed == 3 and args.use_cpu and args.gradient_accumulation_steps == 2

    # --resume continues from the kept checkpoint; --merge (the default, explicit) writes a sliced model;
    # --no-eval skips perplexity; --overwrite replaces the output.
    # The same text as a .jsonl whose column is "body": --text-column must reach the reader (no "text" column).
    rows = tmp_path / "train.jsonl"
    lines = corpus.read_text().split("\n\n")
    rows.write_text("".join(json.dumps({"body": line}) + "\n" for line in lines))
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "old").write_text("x")
    (merged / "rft_report.json").write_text("{}")  # an earlier RFT output: --overwrite may replace ours only
    resume = [
        "rft", str(sliced), "--data", str(rows), "--text-column", "body", "--split", "train", "--subset", "en",
        "--output", str(merged), "--merge", "--no-eval", "--json",
        "--seq-len", "16", "--num-samples", "8", "--batch-size", "2", "--grad-accum", "2", "--max-steps", "6",
        "--lr", "0.004", "--lr-scheduler", "constant_with_warmup", "--warmup-steps", "2",
        "--lora-r", "4", "--lora-alpha", "7", "--lora-dropout", "0.2",
        "--target-modules", "q_proj,down_proj", "--target-shortcuts", "--checkpoint-dir", str(checkpoints),
        "--save-steps", "2", "--resume", "--overwrite", "--seed", "3", "--device", "cpu",
    ]  # fmt: skip
    assert cli.main(resume) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["training"]["resumed_from"] == "checkpoint-4" and report["training"]["global_step"] == 6
    assert report["perplexity"] is None and report["merged"] is True
    assert not (merged / "old").exists()
    assert (
        type(hf_slicegpt.SlicedModelForCausalLM.from_pretrained(merged)).__name__ == "SlicedModelForCausalLM"
    )
    assert not checkpoints.exists()  # removed after success without --keep-checkpoints
    assert report["data"]["train"] == str(rows)


def test_demo_flags_reach_the_slice(work, tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    argv = ["demo", "--model", str(work["dense"]), "--output", str(out), "--calibration", str(work["corpus"]),
            "--sparsity", "0.5", "--num-samples", "4", "--seq-len", "32", "--batch-size", "3",
            "--prompt", "The list", "--max-new-tokens", "2", "-q"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    report = json.loads((out / "slicing_report.json").read_text())
    assert report["settings"]["batch_size"] == 3 and report["settings"]["num_samples"] == 4
    assert report["slicing"]["sparsity"] == 0.5 and [r["attn_input_dim"] for r in report["layers"]] == [
        16,
        16,
    ]
    assert "The list" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ push


def test_push_flags_reach_the_hub_calls(slice_runs, monkeypatch, capsys) -> None:
    from test_hub import FakeHfApi

    from hf_slicegpt.checkpoint import hub

    directory = slice_runs("shared").output
    capsys.readouterr()  # the slice prints its summary when this test is the first to need the run
    card = (directory / "README.md").read_text()
    apis: list[FakeHfApi] = []
    monkeypatch.setattr(hub, "HfApi", lambda token=None: apis.append(FakeHfApi(token)) or apis[-1])
    argv = ["push", str(directory), "--repo-id", "org/tiny", "--private", "--revision", "v2", "--token", "hf_t",
            "--commit-message", "tiny model", "--json"]  # fmt: skip
    assert cli.main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    (create, created), (branch, branched), (upload, uploaded) = apis[0].calls
    assert (create, branch, upload) == ("create_repo", "create_branch", "upload_folder")
    assert created["private"] is True and apis[0].token == "hf_t"
    assert branched["branch"] == "v2" and uploaded["revision"] == "v2"
    assert uploaded["commit_message"] == "tiny model" and not uploaded["create_pr"]
    assert plan["card_refreshed"] and apis[0].uploaded["README.md"].decode() != card

    # --create-pr opens a pull request; --keep-card uploads the README as it is
    (directory / "README.md").write_text(card + "\nHand-written note.\n")
    assert (
        cli.main(["push", str(directory), "--repo-id", "org/tiny", "--create-pr", "--keep-card", "-q"]) == 0
    )
    calls = dict(apis[1].calls)
    assert calls["upload_folder"]["create_pr"] is True
    assert apis[1].uploaded["README.md"].decode().endswith("Hand-written note.\n")
    assert "pull request" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ generate


def _generate(work: dict[str, Path], capsys, *flags: str) -> str:
    argv = ["generate", str(work["dense"]), "--prompt", "The list", "--max-new-tokens", "12", *flags, "-q"]
    assert cli.main([*argv, "--device", "cpu"]) == 0
    return capsys.readouterr().out


def test_generate_samples_with_temperature_and_top_p(work, capsys) -> None:
    greedy = _generate(work, capsys)
    assert _generate(work, capsys, "--temperature", "0") == greedy
    samples = {_generate(work, capsys, "--temperature", "1.5", "--seed", str(seed)) for seed in range(3)}
    assert len(samples) == 3  # it samples: seeds give different texts (a random tiny model: near-uniform)
    assert _generate(work, capsys, "--temperature", "1.5", "--seed", "2") == _generate(
        work, capsys, "--temperature", "1.5", "--seed", "2"
    )  # ... reproducibly
    # top-p keeps only the likeliest token when tiny; a temperature near 0 sharpens to the argmax: both greedy
    assert _generate(work, capsys, "--temperature", "1.5", "--top-p", "1e-9", "--seed", "1") == greedy
    assert _generate(work, capsys, "--temperature", "1e-4", "--seed", "1") == greedy


def test_generate_repetition_penalty_and_chat(work, tmp_path, capsys) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(work["dense"])
    text = _generate(work, capsys, "--repetition-penalty", "1000")
    ids = tokenizer(text.rstrip("\n")).input_ids
    new = ids[len(tokenizer("The list").input_ids) :]
    assert len(new) >= 8 and len(set(new)) == len(new)  # no generated token repeats

    assert cli.main(["generate", str(work["dense"]), "--prompt", "hi", "--chat", "-q"]) == 1
    assert "chat template" in capsys.readouterr().err
    chat = tmp_path / "chat"
    save_tiny_checkpoint(chat)
    tokenizer = AutoTokenizer.from_pretrained(chat)
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    )
    tokenizer.save_pretrained(chat)
    argv = [
        "generate",
        str(chat),
        "--prompt",
        "hi",
        "--chat",
        "--max-new-tokens",
        "3",
        "--device",
        "cpu",
        "-q",
    ]
    assert cli.main(argv) == 0
    assert "hi" not in capsys.readouterr().out  # --chat prints the reply only


# ------------------------------------------------------------------------------------------ Ctrl-C


def test_ctrl_c_exits_130_with_one_line(work, monkeypatch, capsys) -> None:
    from hf_slicegpt.workflows import loading

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(loading, "load_model_and_tokenizer", interrupted)
    code = cli.main(["generate", str(work["dense"]), "--prompt", "x", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 130
    assert err.strip() == "hf-slicegpt: interrupted" and "Traceback" not in err
