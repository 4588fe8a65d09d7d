"""Recovery fine-tuning on tiny sliced models: PEFT defaults, Trainer runs, merged and adapter outputs, resume."""

from __future__ import annotations

import json

import pytest
import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from tiny import FAMILIES, calibration, make_tiny
from tiny_tokenizer import char_tokenizer
from torch import nn
from transformers import AutoModelForCausalLM, TrainerCallback

import hf_slicegpt
from hf_slicegpt.checkpoint.hub import checkpoint_kind
from hf_slicegpt.checkpoint.io import OutputExistsError
from hf_slicegpt.workflows.rft import (
    PEFT_TARGET_PATTERN,
    REPORT_NAME,
    RFTConfig,
    RFTError,
    default_target_modules,
    rft,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # Two busy cores: torch's intra-op threads then spin against each other (tiny forwards take 50x longer).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sliced(family: str = "llama", seed: int = 0):
    return hf_slicegpt.slice_model(
        make_tiny(family, seed=seed), calibration(), 0.25, round_to=4, show_progress=False
    )


def _pattern_windows(n: int, seq_len: int, offset: int = 0) -> torch.LongTensor:
    """Periodic token streams: learnable in a few steps, unlike the random calibration tokens."""
    base = torch.arange(seq_len) + offset
    return torch.stack([(base + 3 * i) % 7 + 10 for i in range(n)])


@pytest.fixture
def sliced_dir(tmp_path):
    model = _sliced("llama_tied")
    directory = tmp_path / "sliced"
    model.save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory


def _config(**overrides) -> RFTConfig:
    settings = dict(
        r=4, max_steps=4, batch_size=4, learning_rate=2e-2, save_steps=2, logging_steps=1, seq_len=16
    )
    settings.update(overrides)
    return RFTConfig(**settings)


def _logits(model: nn.Module, ids: torch.LongTensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_config_without_targets_adapts_every_attention_and_mlp_linear(family):
    model = _sliced(family)
    linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    expected = {name for name in linears if ".self_attn." in name or ".mlp." in name}
    assert expected, "the sliced model has attention/MLP linears"
    assert {n.rsplit(".", 1)[-1] for n in expected} == set(default_target_modules(model))

    peft_model = get_peft_model(model, LoraConfig(r=2))  # no target_modules: PEFT's default for "slicegpt"
    assert peft_model.peft_config["default"].target_modules == PEFT_TARGET_PATTERN
    wrapped = {
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A")
    }
    assert wrapped == expected  # never the embeddings, their projections, the shortcuts or the head


def test_shortcuts_are_targets_only_on_request():
    model = _sliced("llama")
    assert not {"attn_shortcut", "mlp_shortcut"} & set(default_target_modules(model))
    targets = default_target_modules(model, shortcuts=True)
    assert {"attn_shortcut", "mlp_shortcut"} <= set(targets)
    peft_model = get_peft_model(model, RFTConfig().lora_config(targets))
    assert isinstance(peft_model.base_model.model.model.layers[0].attn_shortcut.lora_A, nn.ModuleDict)


def test_merged_output_is_a_sliced_checkpoint_equal_to_the_trained_model(sliced_dir, tmp_path):
    train, held_out = _pattern_windows(16, 16), _pattern_windows(4, 16, offset=5)
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(sliced_dir), held_out)
    out = tmp_path / "rft"
    result = rft(sliced_dir, None, train, out, _config(), eval_data=held_out, show_progress=False)

    report = json.loads((out / REPORT_NAME).read_text())
    assert report["training"]["global_step"] == 4
    assert [row["step"] for row in report["training"]["log"]] == [1, 2, 3, 4]
    assert report["perplexity"]["after"] < report["perplexity"]["before"]  # it learned the pattern
    assert report["merged"] is True
    assert checkpoint_kind(out) == "sliced"
    assert (out / "README.md").is_file() and (out / "tokenizer.json").is_file()
    assert not (tmp_path / "rft.rft-checkpoints").exists()  # removed after success

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded) is hf_slicegpt.SlicedModelForCausalLM
    assert "use_cache" not in json.loads((out / "config.json").read_text())  # training's False is not saved
    reloaded_logits = _logits(reloaded, held_out)
    assert torch.allclose(reloaded_logits, _logits(result.model, held_out), atol=1e-5)
    assert (reloaded_logits - base_logits).abs().max() > 1e-3  # the LoRA update is really in the weights
    assert not any("lora" in name for name, _ in reloaded.named_parameters())


def test_adapter_output_loads_with_peft_and_merges_to_the_same_logits(sliced_dir, tmp_path):
    train, held_out = _pattern_windows(8, 16), _pattern_windows(2, 16, offset=3)
    out = tmp_path / "adapter"
    result = rft(
        sliced_dir, None, train, out, _config(max_steps=2, merge=False), evaluate=False, show_progress=False
    )
    assert isinstance(result.model, PeftModel)
    assert checkpoint_kind(out) == "adapter"
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(sliced_dir.absolute())
    peft_logits = _logits(result.model, held_out)

    via_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sliced_dir), out)
    assert torch.allclose(_logits(via_peft, held_out), peft_logits, atol=1e-5)
    via_auto = AutoPeftModelForCausalLM.from_pretrained(out)
    assert torch.allclose(_logits(via_auto, held_out), peft_logits, atol=1e-5)

    merged = result.model.merge_and_unload()
    assert type(merged) is hf_slicegpt.SlicedModelForCausalLM
    assert torch.allclose(_logits(merged, held_out), peft_logits, atol=1e-5)
    untrained = _logits(AutoModelForCausalLM.from_pretrained(sliced_dir), held_out)
    assert (peft_logits - untrained).abs().max() > 1e-3


def test_transformers_adapter_api_loads_an_rft_adapter_into_a_sliced_model(sliced_dir, tmp_path):
    # transformers' own adapter API (PeftAdapterMixin) needs a PEFT new enough for the pinned transformers:
    # with transformers 5.24 and PEFT 0.21 both calls raise "use a version >= 0.22.0".
    train, held_out = _pattern_windows(8, 16), _pattern_windows(2, 16, offset=3)
    out = tmp_path / "adapter"
    result = rft(
        sliced_dir, None, train, out, _config(max_steps=2, merge=False), evaluate=False, show_progress=False
    )
    trained = _logits(result.model, held_out)

    model = AutoModelForCausalLM.from_pretrained(sliced_dir)
    untrained = _logits(model, held_out)
    model.load_adapter(str(out), adapter_name="rft")
    assert model.active_adapters() == ["rft"]
    assert torch.allclose(_logits(model, held_out), trained, atol=1e-5)
    model.disable_adapters()
    assert torch.allclose(_logits(model, held_out), untrained, atol=1e-6)

    fresh = AutoModelForCausalLM.from_pretrained(sliced_dir)
    fresh.add_adapter(LoraConfig(r=4), adapter_name="new")  # default targets: the sliced model's linears
    trainable = [name for name, p in fresh.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert any("self_attn.q_proj.lora_A.new" in name for name in trainable)
    assert any("mlp.down_proj.lora_B.new" in name for name in trainable)
    # LoRA B starts at zero: a fresh adapter leaves the function unchanged.
    assert torch.allclose(_logits(fresh, held_out), untrained, atol=1e-6)


class _Interrupt(TrainerCallback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise KeyboardInterrupt


def test_an_interrupted_run_resumes_from_its_last_checkpoint(sliced_dir, tmp_path):
    train, held_out = _pattern_windows(16, 16), _pattern_windows(2, 16, offset=1)
    config = _config(lora_dropout=0.0)
    out = tmp_path / "out"
    checkpoints = tmp_path / "out.rft-checkpoints"
    with pytest.raises(KeyboardInterrupt):
        rft(
            sliced_dir,
            None,
            train,
            out,
            config,
            evaluate=False,
            callbacks=[_Interrupt(3)],
            show_progress=False,
        )
    assert not out.exists()  # nothing half-written
    assert (checkpoints / "checkpoint-2").is_dir()

    with pytest.raises(RFTError, match="--resume"):
        rft(sliced_dir, None, train, out, config, evaluate=False, show_progress=False)
    resumed = rft(sliced_dir, None, train, out, config, evaluate=False, resume=True, show_progress=False)
    assert resumed.report["training"]["resumed_from"] == "checkpoint-2"
    assert resumed.report["training"]["global_step"] == 4

    straight = rft(
        sliced_dir, None, train, tmp_path / "straight", config, evaluate=False, show_progress=False
    )
    assert torch.allclose(_logits(resumed.model, held_out), _logits(straight.model, held_out), atol=1e-4)


def test_rft_on_a_text_source_evaluates_its_held_out_part(sliced_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    paragraphs = [
        f"Paragraph {i}: the quick brown fox jumps over {i * 7 % 13} lazy dogs." for i in range(200)
    ]
    corpus.write_text("\n\n".join(paragraphs), encoding="utf-8")
    result = rft(
        sliced_dir,
        None,
        str(corpus),
        None,
        _config(num_samples=8, max_steps=2, eval_max_tokens=64),
        checkpoint_dir=tmp_path / "ckpt",
        show_progress=False,
    )
    ppl = result.report["perplexity"]
    assert ppl["data"] == str(corpus) and ppl["tokens"] == 4 * 15
    assert result.report["training"]["sequences"] == 8 and result.report["training"]["seq_len"] == 16
    assert result.output_dir is None


def test_refusals_come_before_training(sliced_dir, tmp_path):
    train = _pattern_windows(4, 16)
    in_memory = _sliced("llama")
    with pytest.raises(RFTError, match="base_model_path"):
        rft(in_memory, None, train, tmp_path / "a", _config(merge=False), show_progress=False)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="overwrite"):
        rft(sliced_dir, None, train, tmp_path / "taken", _config(), show_progress=False)
    with pytest.raises(RFTError, match="token ids outside"):
        rft(sliced_dir, None, train + 1000, tmp_path / "b", _config(), show_progress=False)
    with pytest.raises(RFTError, match="tokenizer"):
        rft(in_memory, None, "pydocs", tmp_path / "c", _config(), show_progress=False)


def _tree(directory):
    return sorted((p.relative_to(directory).as_posix(), p.stat().st_size) for p in directory.rglob("*"))


def test_the_checkpoint_directory_must_be_its_own_and_nothing_else_is_ever_deleted(sliced_dir, tmp_path):
    """The checkpoints are emptied after training: an input, the output or a folder of the user's is refused,
    before training, and left as it was."""
    train = _pattern_windows(4, 16)
    model_files = _tree(sliced_dir)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "a_file").write_text("keep me too")
    refused = {
        sliced_dir: "is or contains the input",
        tmp_path: "contains",
        tmp_path / "out": "the output",
        tmp_path / "out" / "ckpt": "the output",
        tmp_path / "mine": r"holds files other than Trainer checkpoints \(notes.txt\)",
        tmp_path / "a_file": "is not a directory",
    }
    for checkpoint_dir, message in refused.items():
        with pytest.raises(RFTError, match=message):
            rft(
                sliced_dir,
                None,
                train,
                tmp_path / "out",
                _config(),
                checkpoint_dir=checkpoint_dir,
                show_progress=False,
            )
    assert _tree(sliced_dir) == model_files and not (tmp_path / "out").exists()
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "a_file").read_text() == "keep me too"
    # its own directory: used, then removed after success
    result = rft(
        sliced_dir,
        None,
        train,
        tmp_path / "out",
        _config(),
        checkpoint_dir=tmp_path / "ckpt",
        show_progress=False,
    )
    assert result.output_dir is not None and not (tmp_path / "ckpt").exists()


def test_a_dense_model_is_refused_before_training_naming_it(tmp_path):
    dense = make_tiny("llama")
    with pytest.raises(RFTError, match="'llama' model, not a sliced one.*hf-slicegpt slice"):
        rft(dense, None, _pattern_windows(4, 16), tmp_path / "out", _config(), show_progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.rft-checkpoints").exists()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("r", 0, "r must be"),
        ("lora_dropout", 1.0, "lora_dropout"),
        ("seq_len", 1, "seq_len"),
        ("max_steps", 0, "max_steps"),
        ("learning_rate", -1.0, "learning_rate"),
        ("warmup_steps", 2.5, "warmup_steps"),
        ("target_modules", [], "target_modules"),
    ],
)
def test_config_rejects_bad_values(field, value, message):
    with pytest.raises(RFTError, match=message):
        RFTConfig(**{field: value})


def test_config_defaults_follow_the_paper():
    config = RFTConfig()
    assert (config.r, config.lora_alpha, config.lora_dropout, config.seq_len) == (32, 10.0, 0.05, 1024)
    assert config.merge and config.target_modules is None and not config.target_shortcuts


def test_cli_defaults_match_the_library():
    from hf_slicegpt.cli.rft import DEFAULTS

    config = RFTConfig()
    assert {name: getattr(config, name) for name in DEFAULTS} == DEFAULTS


def test_cli_rft_with_gradient_checkpointing_and_bf16(sliced_dir, tmp_path, capsys):
    from hf_slicegpt.cli import main
    from hf_slicegpt.cli.rft import format_summary

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Line {i} of a small corpus, number {i * 3 % 11}." for i in range(150)))
    out = tmp_path / "cli-out"
    argv = ["rft", str(sliced_dir), "--data", str(corpus), "--output", str(out), "--max-steps", "2"]
    argv += [
        "--seq-len",
        "16",
        "--num-samples",
        "8",
        "--batch-size",
        "4",
        "--lora-r",
        "4",
        "--eval-max-tokens",
        "64",
    ]
    argv += ["--gradient-checkpointing", "--bf16", "--device", "cpu", "--no-merge", "--logging-steps", "1"]
    assert main([*argv, "--json"]) == 0  # progress bars and loss lines on: stdout must still be pure JSON
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report == json.loads((out / REPORT_NAME).read_text())
    assert "step 2/2: loss" in captured.err
    assert report["settings"]["gradient_checkpointing"] and report["settings"]["bf16"]
    assert checkpoint_kind(out) == "adapter"
    summary = format_summary(report, out)
    assert "2 steps" in summary and "perplexity" in summary and "PEFT adapter" in summary
    assert main([*argv[:6], "-q"]) == 1  # the output exists now: refused, one line on stderr
    assert "--overwrite" in capsys.readouterr().err
