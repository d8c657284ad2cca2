"""python -m data_tools.inspect on img2dataset's real output and on ours, valid and broken.

.venv/bin/python -m pytest tests/test_inspect.py -q
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from data_tools import convert, inspect, shards


def run_json(source: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:
    code = inspect.main([str(source), "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_img2dataset_output(shared_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, summary = run_json(shared_data / "formats" / "img2dataset_webdataset_output", capsys)
    assert code == 0
    assert (summary["samples"], summary["shards"], summary["invalid"]) == (159, 3, 0)
    assert summary["extensions"] == {"jpg": 159, "json": 159, "txt": 159}
    assert summary["examples"][0]["size"] == [256, 256]


def jpeg(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="JPEG")
    return buf.getvalue()


def test_our_output_valid_then_broken(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.jpg").write_bytes(jpeg((i * 50, 0, 0)))
        (folder / f"{i}.txt").write_text(f"caption {i}")
    out = tmp_path / "out"
    argv = ["--input", str(folder), "--output", str(out), "--samples-per-shard", "2"]
    assert convert.main([*argv, "--image-size", "16", "--no-progress"]) == 0
    capsys.readouterr()
    code, summary = run_json(out, capsys)
    assert code == 0 and (summary["samples"], summary["shards"], summary["invalid"]) == (5, 3, 0)
    assert summary["examples"][0] == {
        "key": "000000000",
        "members": ["jpg", "json", "txt"],
        "caption": "caption 0",
        "size": [16, 16],
    }
    # A shard rewritten with a truncated image and bad JSON: both members are found, and the
    # manifest's checksum no longer matches.
    with shards.ShardWriter(out / "00001.tar") as writer:
        writer.add("000000002", {"jpg": jpeg((1, 2, 3))[:200], "json": b"{oops", "txt": b"x"})
        writer.add("000000003", {"jpg": jpeg((1, 2, 3)), "txt": b"y"})
        writer.close()
    code, summary = run_json(out, capsys)
    assert code == 1 and summary["invalid"] == 2
    problems = "\n".join(summary["problems"])
    assert "000000002.jpg" in problems and "000000002.json" in problems
    assert "sha256" in problems


def test_a_gif_member_is_not_trainable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The trainer reads jpg/jpeg/png/webp members only: a sample whose image is a .gif (a
    valid image, and an input format the converter reads) makes the shard fail inspection."""
    gif = io.BytesIO()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(gif, format="GIF")
    with shards.ShardWriter(tmp_path / "00000.tar") as writer:
        writer.add("000000000", {"jpg": jpeg((1, 2, 3)), "txt": b"fine"})
        writer.add("000000001", {"gif": gif.getvalue(), "txt": b"a gif"})
        writer.close()
    code, summary = run_json(tmp_path, capsys)
    assert code == 1 and (summary["samples"], summary["invalid"]) == (2, 1)
    assert summary["problems"] == [
        f"{tmp_path / '00000.tar'}: 000000001: not trainable, no image member the trainer reads "
        "(jpg/jpeg/png/webp); members: gif, txt"
    ]


def test_missing_folder_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert inspect.main([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith("error:")
