"""The lm-eval bridge: one metric per task, the paper's choices, and a real run on a local task (offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from tiny import calibration, make_tiny
from tiny_tokenizer import char_tokenizer

import hf_slicegpt
from hf_slicegpt.workflows.zeroshot import (
    PAPER_TASKS,
    ZeroShotError,
    evaluate_tasks,
    format_table,
    parse_results,
    parse_tasks,
)

pytest.importorskip("lm_eval")

DOCS = [
    {"question": "Q: 1+1=", "choices": ["2", "three", "eleven"], "label": 0},
    {"question": "Q: the sky is", "choices": ["blue", "a", "green tea"], "label": 0},
    {"question": "Q: cats say", "choices": ["woof woof", "meow"], "label": 1},
    {"question": "Q: 10/2=", "choices": ["5", "20", "two hundred"], "label": 0},
    {"question": "Q: ice is", "choices": ["hot", "cold"], "label": 1},
    {"question": "Q: abc", "choices": ["d", "xyz", "ab"], "label": 2},
    {"question": "Q: python is a", "choices": ["language", "lake"], "label": 0},
    {"question": "Q: 3*3=", "choices": ["6", "9", "33"], "label": 1},
]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Two local lm-eval tasks on one local JSONL file: one reports acc, the other acc and acc_norm."""
    directory = tmp_path_factory.mktemp("tasks")
    data = directory / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS), encoding="utf-8")
    for name, metrics in (("tiny_acc", ["acc"]), ("tiny_norm", ["acc", "acc_norm"])):
        metric_list = "".join(
            f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n" for m in metrics
        )
        (directory / f"{name}.yaml").write_text(
            textwrap.dedent(
                f"""\
                task: {name}
                dataset_path: json
                dataset_kwargs:
                  data_files:
                    test: {data}
                test_split: test
                output_type: multiple_choice
                doc_to_text: "{{{{question}}}}"
                doc_to_target: label
                doc_to_choice: "{{{{choices}}}}"
                metadata:
                  version: 1.0
                metric_list:
                """
            )
            + metric_list,
            encoding="utf-8",
        )
    return directory


@pytest.fixture(scope="module")
def sliced():
    model = hf_slicegpt.slice_model(make_tiny("llama"), calibration(), 0.25, round_to=4, show_progress=False)
    return model.eval()


def _expected_accuracies(model, tokenizer) -> tuple[float, float]:
    """acc and acc_norm computed by hand: sum of continuation log-probs, normalised by characters for acc_norm."""
    acc = acc_norm = 0
    for doc in DOCS:
        scores = []
        for choice in doc["choices"]:
            context = tokenizer(doc["question"]).input_ids
            whole = tokenizer(doc["question"] + " " + choice).input_ids
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([whole])).logits[0].float()
            logprobs = F.log_softmax(logits[:-1], dim=-1)
            targets = torch.tensor(whole[1:])
            token_lp = logprobs[torch.arange(len(targets)), targets]
            scores.append(token_lp[len(context) - 1 :].sum().item())
        acc += max(range(len(scores)), key=scores.__getitem__) == doc["label"]
        normed = [s / len(c) for s, c in zip(scores, doc["choices"])]
        acc_norm += max(range(len(normed)), key=normed.__getitem__) == doc["label"]
    return acc / len(DOCS), acc_norm / len(DOCS)


def test_local_tasks_on_a_model_in_memory_match_a_hand_computation(sliced, task_dir):
    tokenizer = char_tokenizer()
    result = evaluate_tasks(
        sliced, tokenizer, "tiny_acc,tiny_norm", include_path=task_dir, include_defaults=False, batch_size=4
    )
    acc, acc_norm = _expected_accuracies(sliced, tokenizer)
    assert result["tasks"]["tiny_acc"]["metric"] == "acc"  # the only metric it reports
    assert result["tasks"]["tiny_norm"]["metric"] == "acc_norm"  # preferred when present
    assert result["tasks"]["tiny_acc"]["value"] == pytest.approx(acc)
    assert result["tasks"]["tiny_norm"]["value"] == pytest.approx(acc_norm)
    assert result["average"] == pytest.approx((acc + acc_norm) / 2)
    assert result["tasks"]["tiny_acc"]["samples"] == len(DOCS)
    assert result["tasks"]["tiny_acc"]["split"] == "test"
    assert result["num_fewshot"] == 0

    override = evaluate_tasks(
        sliced,
        tokenizer,
        ["tiny_norm"],
        include_path=task_dir,
        include_defaults=False,
        metrics={"tiny_norm": "acc"},
        limit=4,
    )
    assert override["tasks"]["tiny_norm"]["metric"] == "acc"
    assert override["tasks"]["tiny_norm"]["samples"] == 4


def test_a_saved_sliced_checkpoint_runs_through_lm_evals_own_loader(sliced, task_dir, tmp_path):
    tokenizer = char_tokenizer()
    sliced.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    in_memory = evaluate_tasks(sliced, tokenizer, "tiny_norm", include_path=task_dir, include_defaults=False)
    from_path = evaluate_tasks(
        str(tmp_path / "ckpt"), None, "tiny_norm", include_path=task_dir, include_defaults=False, device="cpu"
    )
    assert from_path["tasks"] == in_memory["tasks"]
    assert from_path["model"] == str(tmp_path / "ckpt")


@pytest.mark.slow  # a fresh interpreter imports torch, transformers and lm-eval: ~30 s on an idle 2-core CPU
def test_lm_eval_loads_a_sliced_checkpoint_without_the_plugin(sliced, tmp_path):
    """A fresh interpreter that never imports hf_slicegpt: `pretrained=DIR,trust_remote_code=True` is enough."""
    tokenizer = char_tokenizer()
    directory = tmp_path / "ckpt"
    sliced.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    context, continuation = "Q: 1+1=", " 2"
    script = textwrap.dedent(
        f"""
        import json, sys
        from lm_eval.models.huggingface import HFLM
        lm = HFLM(pretrained={str(directory)!r}, trust_remote_code=True, device="cpu", batch_size=1)
        class Request:
            args = ({context!r}, {continuation!r})
        (logprob, _), = lm.loglikelihood([Request()], disable_tqdm=True)
        print(json.dumps({{"module": type(lm.model).__module__, "logprob": logprob,
                          "plugin": "hf_slicegpt" in sys.modules}}))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not out["plugin"]
    assert out["module"].startswith("transformers_modules.")  # the modeling code shipped with the checkpoint

    ids = tokenizer(context + continuation).input_ids
    n_context = len(tokenizer(context).input_ids)
    with torch.no_grad():
        logprobs = F.log_softmax(sliced(input_ids=torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    expected = logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])][n_context - 1 :].sum().item()
    assert out["logprob"] == pytest.approx(expected, abs=1e-4)


def test_a_hub_task_offline_is_one_line_naming_include_path(sliced, task_dir, tmp_path, capsys):
    """piqa, the paper's tasks, ... read their data from the Hub: offline that must say what to do instead."""
    from hf_slicegpt.cli import main

    hub_task = tmp_path / "hub_tasks"
    hub_task.mkdir()
    local = (task_dir / "tiny_acc.yaml").read_text()
    # Same task, but its data lives on the Hub (like piqa's baber/piqa): unreachable here, as offline.
    (hub_task / "tiny_hub.yaml").write_text(
        local.replace("task: tiny_acc", "task: tiny_hub")
        .replace("dataset_path: json", "dataset_path: hf-slicegpt-tests/not-in-any-cache")
        .split("dataset_kwargs:")[0]
        + "test_split: test\n"
        + local.split("test_split: test\n")[1]
    )
    with pytest.raises(ZeroShotError, match="--include-path") as caught:
        evaluate_tasks(sliced, char_tokenizer(), "tiny_hub", include_path=hub_task, include_defaults=False)
    assert "tiny_hub" in str(caught.value) and "\n" not in str(caught.value)

    directory = tmp_path / "ckpt"
    sliced.save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    argv = ["eval", str(directory), "--tasks", "tiny_hub", "--include-path", str(hub_task), "--device", "cpu"]
    capsys.readouterr()  # the save's progress bars
    assert main([*argv, "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()  # lm-eval's own warnings may come first
    assert err[-1].startswith("hf-slicegpt: error: lm-eval tasks tiny_hub") and "--include-path" in err[-1]
    assert not any("Traceback" in line for line in err) and "Traceback" not in err


def test_cli_table_shows_acc_and_acc_norm_when_a_task_reports_both():
    raw = _raw({"piqa": {"acc,none": 0.875, "acc_stderr,none": 0.1, "acc_norm,none": 0.5}})
    result = parse_results(raw, ["piqa"])
    assert result["tasks"]["piqa"]["metric"] == "acc_norm"
    assert result["tasks"]["piqa"]["also"] == {"acc": {"value": 0.875, "stderr": 0.1}}
    assert result["average"] == 0.5  # the average keeps the paper's metric only
    table = format_table(result).splitlines()
    assert [line.split()[:3] for line in table if line.startswith("piqa")] == [
        ["piqa", "acc_norm*", "0.5000"],
        ["piqa", "acc", "0.8750"],
    ]
    assert table[-1].startswith("*")
    single = format_table(parse_results(_raw({"winogrande": {"acc,none": 0.5}}), ["winogrande"]))
    assert "*" not in single


def test_unknown_tasks_and_missing_tokenizers_are_refused(sliced, task_dir):
    with pytest.raises(ZeroShotError, match="unknown lm-eval task"):
        evaluate_tasks(sliced, char_tokenizer(), "tiny_nope", include_path=task_dir, include_defaults=False)
    with pytest.raises(ZeroShotError, match="tokenizer"):
        evaluate_tasks(sliced, None, "tiny_acc", include_path=task_dir, include_defaults=False)


def _raw(task_metrics: dict[str, dict[str, object]]) -> dict[str, object]:
    return {
        "results": {task: {"alias": task, **metrics} for task, metrics in task_metrics.items()},
        "configs": {
            task: {"dataset_path": f"org/{task}", "validation_split": "validation"} for task in task_metrics
        },
        "n-samples": {task: {"original": 100, "effective": 100} for task in task_metrics},
        "lm_eval_version": "0.4.13",
    }


def test_paper_tasks_report_the_papers_metrics_and_their_average():
    values = {"piqa": 0.6, "winogrande": 0.5, "hellaswag": 0.4, "arc_easy": 0.55, "arc_challenge": 0.3}
    raw = _raw(
        {
            task: {
                "acc,none": value - 0.05,
                "acc_stderr,none": 0.01,
                **({} if task == "winogrande" else {"acc_norm,none": value, "acc_norm_stderr,none": "N/A"}),
            }
            for task, value in values.items()
        }
    )
    raw["results"]["winogrande"]["acc,none"] = values["winogrande"]
    result = parse_results(raw, PAPER_TASKS)
    metrics = {task: score["metric"] for task, score in result["tasks"].items()}
    assert metrics == {
        "piqa": "acc_norm",
        "winogrande": "acc",
        "hellaswag": "acc_norm",
        "arc_easy": "acc_norm",
        "arc_challenge": "acc_norm",
    }
    assert {task: score["value"] for task, score in result["tasks"].items()} == pytest.approx(values)
    assert result["average"] == pytest.approx(sum(values.values()) / 5)
    assert result["tasks"]["piqa"]["stderr"] is None  # "N/A"
    assert result["tasks"]["winogrande"]["stderr"] == 0.01
    assert result["tasks"]["arc_easy"]["dataset_path"] == "org/arc_easy"

    table = format_table(result)
    assert "winogrande" in table and "acc_norm" in table and "average" in table
    assert f"{sum(values.values()) / 5:.4f}" in table


def test_a_paper_task_without_its_metric_is_an_error():
    with pytest.raises(ZeroShotError, match="no metric 'acc_norm'"):
        parse_results(_raw({"piqa": {"acc,none": 0.5}}), ["piqa"])


def test_parse_tasks():
    assert parse_tasks("paper") == list(PAPER_TASKS)
    assert parse_tasks("piqa, winogrande,piqa") == ["piqa", "winogrande"]
    assert parse_tasks(["arc_easy", "paper"])[:2] == ["arc_easy", "piqa"]
    with pytest.raises(ZeroShotError, match="no task names"):
        parse_tasks(" , ")


def test_cli_eval_tasks_prints_a_table_and_saves_results_for_the_card(sliced, task_dir, tmp_path, capsys):
    from hf_slicegpt.checkpoint.hub import build_model_card
    from hf_slicegpt.cli import main

    directory = tmp_path / "ckpt"
    sliced.save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    argv = ["eval", str(directory), "--tasks", "tiny_acc,tiny_norm", "--include-path", str(task_dir)]
    assert main([*argv, "--device", "cpu", "--save-results", "-q"]) == 0
    out = capsys.readouterr().out
    assert "tiny_acc" in out and "acc_norm" in out and "average" in out
    norm_rows = [line.split()[1] for line in out.splitlines() if line.startswith("tiny_norm")]
    assert norm_rows == ["acc_norm*", "acc"]  # both metrics of a task that reports both
    saved = json.loads((directory / "zeroshot_results.json").read_text())
    assert set(saved["tasks"]) == {"tiny_acc", "tiny_norm"}

    assert main([*argv, "--device", "cpu", "--json", "-q"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["model"] == str(directory) and row["zero_shot"]["tasks"] == saved["tasks"]

    card = build_model_card(directory)
    assert "acc_norm (0-shot)" in str(card) and "| tiny_norm | acc_norm |" in card.text

    # --limit and --num-fewshot reach lm-eval: 3 documents scored, each with one example in its context
    assert main([*argv, "--device", "cpu", "--json", "--limit", "3", "--num-fewshot", "1", "-q"]) == 0
    few = json.loads(capsys.readouterr().out)["zero_shot"]
    assert few["num_fewshot"] == 1 and {t["samples"] for t in few["tasks"].values()} == {3}

    assert main(["eval", str(directory), "-q"]) == 1  # neither --data nor --tasks
    assert "nothing to evaluate" in capsys.readouterr().err
