"""The CLIs on a tiny run trained through the real tools: predict, embed, and the standalone
eval with 1 process and with 2 under torchrun (same numbers); plus training-time eval."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from eval_data import CLASSNAMES, run, square, trained_run

from clipforge import embed, predict
from clipforge.eval import __main__ as eval_cli


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory.getbasetemp() / "eval_run")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for colour in CLASSNAMES:
        square(colour, 999).save(folder / f"{colour}.png")
        paths.append(str(folder / f"{colour}.png"))
    return paths


def test_training_time_eval_logs_both_sets(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "zeroshot/set/top1" in r]
    assert [r["step"] for r in evals] == [30, 60]
    assert any("retrieval/set/text_to_image_R@5" in r for r in rows)
    figs = {p.name for p in (run_dir / "eval" / "figures").iterdir()}
    assert "zeroshot_set_confusion_step00000060.png" in figs
    assert "retrieval_set_retrieval_step00000060.png" in figs


def test_predict_cli_round_trip(run_dir, images, capsys):
    # In process (the CLI's main with its argv): a subprocess would only add imports' time.
    assert predict.main(["--checkpoint", str(run_dir), "--labels", ",".join(CLASSNAMES),
                         "--json", *images]) == 0  # fmt: skip
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in rows] == images
    for row, colour in zip(rows, CLASSNAMES):
        probs = [x["prob"] for x in row["labels"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True)
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        # 60 steps on coloured squares are enough to tell the colours apart.
        assert row["labels"][0]["label"] == colour, row


def test_predict_text_output_templates_and_errors(run_dir, images, tmp_path, capsys):
    tpl = tmp_path / "t.txt"
    tpl.write_text("a {} square.\na picture of something {}.\n")
    code = predict.main(["--checkpoint", str(run_dir), "--labels", "red, blue", "--top", "1",
                         "--templates", str(tpl), images[0], str(tmp_path / "missing.png")])  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert code == 1  # one image could not be read
    assert out[0].startswith(f"{images[0]}: red ") and "error" in out[1]
    assert predict.parse_templates("a {}.|the {}") == ["a {}.", "the {}"]
    with pytest.raises(ValueError):
        predict.parse_templates("no placeholder")
    # CLIP_benchmark's files write {c}: the same prompts, so the same probabilities.
    tpl_c = tmp_path / "zeroshot_classification_templates.txt"
    tpl_c.write_text("a {c} square.\na picture of something {c}.\n")
    outs = []
    for t in (tpl, tpl_c):
        assert predict.main(["--checkpoint", str(run_dir), "--labels", "red, blue", "--json",
                             "--templates", str(t), images[0]]) == 0  # fmt: skip
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and '"red"' in outs[0]


@pytest.mark.parametrize("kind,suffix", [("image", ".npy"), ("text", ".parquet")])
def test_embed_export(run_dir, tmp_path, kind, suffix, capsys):
    out = tmp_path / f"emb{suffix}"
    evalset = run_dir.parent / "set"
    assert embed.main(["--checkpoint", str(run_dir), "--input", str(evalset), "--kind", kind,
                       "--out", str(out), "--batch-size", "5"]) == 0  # fmt: skip
    if kind == "image":
        arr = np.load(out)
        keys = out.with_suffix(".keys.txt").read_text().split()
        assert arr.shape == (12, 128) and keys[:2] == ["000_red", "001_green"]
        assert np.allclose(np.linalg.norm(arr, axis=1), 1, atol=1e-5)
    else:
        table = pq.read_table(out).to_pylist()
        assert len(table) == 30 and table[0]["key"] == "000_red#0"
        assert table[0]["caption"] == "a red square." and len(table[0]["embedding"]) == 128


def test_eval_cli_rejects_bad_arguments(run_dir, capsys):
    assert eval_cli.main([f"checkpoint={run_dir}", "eval.zeroshott=x"]) == 2
    assert "zeroshott" in capsys.readouterr().err
    assert eval_cli.main(["--checkpoint", str(run_dir)]) == 2
    capsys.readouterr()
    assert eval_cli.main([f"checkpoint={run_dir}", "eval.zeroshot=[a,'']"]) == 2
    assert "eval.zeroshot must be a shard source or a list" in capsys.readouterr().err
    args = [f"checkpoint={run_dir}", "eval.zeroshot=null", "eval.retrieval=null"]
    assert eval_cli.main(args) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert eval_cli.main([f"checkpoint={run_dir / 'nope'}", "eval.zeroshot=x"]) == 2
    assert "no tokenizer.model" in capsys.readouterr().err


def test_eval_cli_takes_a_list_of_sets(run_dir, tmp_path, capsys):
    evalset = run_dir.parent / "set"
    other = tmp_path / "other" / "set"
    shutil.copytree(evalset, other)
    args = [f"checkpoint={run_dir}", f"eval.zeroshot=[{evalset},{other}]", "eval.retrieval=null",
            "eval.batch_size=6", f"out={tmp_path / 'out'}"]  # fmt: skip
    assert eval_cli.main(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["set"] for r in lines] == [f"{run_dir.parent.name}_set", "other_set"]
    assert lines[0]["top1"] == lines[1]["top1"] == 1.0
    assert (tmp_path / "out" / "zeroshot_other_set.json").is_file()


@pytest.mark.multiproc
@pytest.mark.slow
def test_standalone_eval_same_numbers_with_one_and_two_processes(run_dir, tmp_path, capsys):
    evalset = run_dir.parent / "set"
    args = [f"checkpoint={run_dir}", f"eval.zeroshot={evalset}", f"eval.retrieval={evalset}",
            "eval.batch_size=5"]  # fmt: skip
    assert eval_cli.main([*args, f"out={tmp_path / 'one'}"]) == 0
    one = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    proc = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "clipforge.eval", *args, f"out={tmp_path / 'two'}")  # fmt: skip
    two = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["kind"] for r in one] == ["zeroshot", "retrieval"]
    assert one == two
    assert one[0]["top1"] == 1.0  # the colours are learnt
    saved = json.loads((tmp_path / "two" / "zeroshot_set.json").read_text())
    assert sum(map(sum, saved["confusion"])) == 12
    assert (tmp_path / "one" / "retrieval_set_retrieval.png").is_file()
