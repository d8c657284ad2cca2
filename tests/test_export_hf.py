"""`python -m clipforge.export RUN --format hf` loads in transformers 5.24.0 and gives our numbers.

    .venv/bin/python -m pytest tests/test_export_hf.py -q

A tiny ViT run (every parameter random, LayerNorms and biases included, so a swapped or
misplaced tensor shows; a sentencepiece model trained on COCO captions; mean/std that are not
CLIP's) is exported by the CLI; tests/hf_load.py then loads it with transformers in a process
where clipforge cannot be imported, and its ids, pixels and embeddings are compared with
clipforge.embed's on real COCO photos and captions, and with our tokenizer on hard captions.

Tolerances (measured on these 159 photos at 32 px, std 0.2-0.3, plus a half-transparent PNG):
text embeddings agree to 0.0 (same ops); image embeddings to ~1e-7 with the "pil" backend and
< 5e-5 with the default torchvision one, whose uint8 resize differs from PIL's by at most one
level (1/255/std). That holds for every photo, the 35 where torchvision's half-to-even crop
offset would differ from transformers' floor included (our eval crop rounds down too).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import torch
from omegaconf import OmegaConf
from PIL import Image

from clipforge import embed
from clipforge.checkpoint import export_weights
from clipforge.config import AugmentConfig, Config, ModelConfig
from clipforge.data.tokenizer import Tokenizer
from clipforge.data.transforms import eval_transform
from clipforge.eval.exported import load_run
from clipforge.export import main as export_main
from clipforge.export_hf import read_spm, tokenizer_config, tokenizer_json
from clipforge.model import build_model
from data_tools.tokenizer import SPECIAL_IDS, train_model

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
HARD = [
    "",
    "   ",
    "a photo of a cat",
    "  leading, trailing   and   repeated spaces  ",
    "tabs\tand\nnewlines",
    "\u2581starts with sentencepiece's own space mark \u2581",
    " \u2581 inner \u2581 marks and trailing ones \u2581\u2581 ",
    "Ünïcödé café naïve façade",
    "東京の猫と犬",
    "emoji 🐱😀😀 and ✨",
    "ＦＵＬＬＷＩＤＴＨ ｶﾀｶﾅ ①②③ ﬁ ligature",
    "ǅ ß ẞ İstanbul ΣΑΣ",
    "zero\u200bwidth, no\u00a0break, ideographic\u3000space",
    "literal <s> and </s> and <pad> and <unk> in a caption",
    "x" * 400,
    " ".join(["word"] * 200),
]


def coco_captions(shared: Path) -> dict[str, list[str]]:
    """COCO val2017 file stem -> its human captions."""
    ann = json.loads((shared / "coco-mini/annotations/captions_val2017.json").read_text())
    names = {im["id"]: Path(im["file_name"]).stem for im in ann["images"]}
    caps: dict[str, list[str]] = {}
    for a in ann["annotations"]:
        caps.setdefault(names[a["image_id"]], []).append(a["caption"])
    return caps


def all_coco_captions(shared: Path) -> list[str]:
    return [
        a["caption"]
        for split in ("train", "val")
        for a in json.loads(
            (shared / f"coco-mini/annotations/captions_{split}2017.json").read_text()
        )["annotations"]
    ]


def hard_captions(shared: Path) -> list[str]:
    """HARD plus real captions: CC3M validation and img2dataset's (597 non-ASCII ones)."""
    with open(shared / "formats/cc3m/Validation_GCC-1.1.0-Validation.tsv", encoding="utf-8") as f:
        cc3m = [row[0] for row in csv.reader(f, delimiter="\t")][:3000]
    table = pq.read_table(shared / "formats/img2dataset_input/test_10000.parquet")
    web = [t for t in table.column("TEXT").to_pylist() if t and not t.isascii()]
    return HARD + cc3m + web


def write_run(run: Path, model_yaml: str, proto: bytes, **model_overrides) -> Path:
    """A run directory as training leaves it: weights, resolved config, tokenizer.model."""
    cfg = OmegaConf.structured(Config)
    merged = OmegaConf.merge(
        OmegaConf.structured(ModelConfig), OmegaConf.load(REPO / "conf/model" / model_yaml)
    )
    for key, value in model_overrides.items():
        OmegaConf.update(merged, key, value)
    cfg.model = merged
    cfg.data.augment.mean, cfg.data.augment.std = MEAN, STD
    model_cfg: ModelConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    run.mkdir(parents=True)
    (run / "tokenizer.model").write_bytes(proto)
    vocab = Tokenizer(str(run / "tokenizer.model")).vocab_size
    torch.manual_seed(0)
    model = build_model(model_cfg, vocab_size=vocab)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name != "logit_scale":  # LayerNorms and biases start at 1 / 0
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
        model.logit_scale.fill_(2.9)
    export_weights(run, {f"model.{k}": v for k, v in model.state_dict().items()}, step=1)
    OmegaConf.save(cfg, run / "config.yaml", resolve=True)
    return run


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def proto(shared_data: Path) -> bytes:
    return train_model(all_coco_captions(shared_data), vocab_size=800)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, shared_data: Path, proto: bytes) -> dict:
    """The run, its export through the CLI, a shard of the COCO photos with their captions
    (and HARD), and what transformers made of the export (tests/hf_load.py)."""
    work = tmp_path_factory.mktemp("hf")
    run = write_run(work / "run", "tiny.yaml", proto)
    out = work / "export"
    proc = cli("-m", "clipforge.export", str(run), "--format", "hf", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    caps = coco_captions(shared_data)
    photos = sorted((shared_data / "coco-mini/val2017").glob("*.jpg"))
    photos.append(half_transparent_png(photos[0], work / "zz_alpha.png"))
    shards = work / "shards"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tar:
        for i, photo in enumerate(photos):
            texts = caps.get(photo.stem, []) + (HARD if i == 0 else [])
            for ext, data in (
                (photo.suffix[1:], photo.read_bytes()),
                ("json", json.dumps({"captions": texts}).encode()),
            ):
                if ext == "json" and not texts:
                    continue
                info = tarfile.TarInfo(f"{photo.stem}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    for kind, name in (("image", "img.npy"), ("text", "txt.parquet")):
        assert embed.main(["--checkpoint", str(run), "--input", str(shards), "--kind", kind,
                           "--out", str(work / name), "--workers", "0", "--device", "cpu"]) == 0  # fmt: skip
    texts = pq.read_table(work / "txt.parquet").to_pydict()
    hard = hard_captions(shared_data)
    spec = {"captions": texts["caption"] + hard, "images": [str(p) for p in photos]}
    (work / "inputs.json").write_text(json.dumps(spec))
    proc = cli(
        str(REPO / "tests/hf_load.py"), str(out), str(work / "inputs.json"), str(work / "hf.npz")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {
        "run": run,
        "out": out,
        "photos": photos,
        "keys": (work / "img.keys.txt").read_text().split(),
        "ours_image": np.load(work / "img.npy"),
        "ours_text": np.asarray(texts["embedding"], dtype=np.float32),
        "n_text": len(texts["caption"]),
        "hard": hard,
        "hf": dict(np.load(work / "hf.npz")),
        "meta": json.loads((work / "hf.json").read_text()),
    }


def crop_rule_matters(img: Image.Image, size: int) -> bool:
    """True where rounding the center crop's offset half to even (torchvision's CenterCrop)
    and down (transformers', and ours) differ: resized long side - size = 3 mod 4."""
    w, h = img.size
    extra = int(size * max(w, h) / min(w, h)) - size
    return round(extra / 2) != extra // 2


def half_transparent_png(photo: Path, out: Path) -> Path:
    """A photo transparent on its left half, an alpha ramp to opaque over the right half, its
    colour kept under the transparent part: dropping alpha and compositing on white differ."""
    rgb = np.asarray(Image.open(photo).convert("RGB"))
    w = rgb.shape[1]
    ramp = np.concatenate([np.zeros(w // 2), np.linspace(0, 255, w - w // 2)]).astype(np.uint8)
    alpha = np.broadcast_to(ramp, rgb.shape[:2])
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(out)
    return out


def test_export_loads_offline_without_our_code(exported) -> None:
    meta = exported["meta"]
    assert meta["loading"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [],
                               "error_msgs": []}  # fmt: skip
    assert meta["model_max_length"] == 32
    assert meta["processor"] == ["CLIPProcessor", "TokenizersBackend"]
    assert meta["image_processors"] == {
        "torchvision": "CLIPImageProcessor",
        "pil": "CLIPImageProcessorPil",
    }
    files = sorted(p.name for p in exported["out"].iterdir())
    assert files == ["config.json", "model.safetensors", "preprocessor_config.json",
                     "tokenizer.json", "tokenizer_config.json"]  # fmt: skip
    assert float(exported["hf"]["logit_scale"]) == pytest.approx(math.exp(2.9), rel=1e-6)
    # Too small a difference for the embeddings to show at this size, so checked here.
    ours = load_run(exported["run"]).model
    for tower, module in (("vision", ours.visual), ("text", ours.text)):
        eps = sorted({m.eps for m in module.modules() if isinstance(m, torch.nn.LayerNorm)})
        assert meta["layer_norm_eps"][tower] == eps, tower


def test_token_ids_equal_ours_on_hard_and_real_captions(exported) -> None:
    hf, n = exported["hf"], exported["n_text"]
    captions = exported["hard"]
    ours = Tokenizer(str(exported["run"] / "tokenizer.model"), 32)(captions).numpy()
    for name in ("ids", "processor_ids"):
        theirs = hf[name][n:]
        bad = [captions[i] for i in np.nonzero((theirs != ours).any(1))[0]]
        assert not bad, (name, len(bad), bad[:5])
    # The cases the list is there for did occur: truncation, unknown pieces (id 1), padding.
    assert (ours[:, -1] == 3).any() and (ours == 1).any() and (ours[:, -1] == 0).any()


def test_text_embeddings_equal_clipforge_embed(exported) -> None:
    hf, n = exported["hf"], exported["n_text"]
    assert n >= 395  # every COCO val caption, plus HARD
    diff = np.abs(hf["text"][:n] - exported["ours_text"]).max()
    assert diff <= TOL, diff


def test_image_processor_and_embeddings_equal_clipforge_embed(exported) -> None:
    hf, size = exported["hf"], 32
    keys = [p.stem for p in exported["photos"]]
    assert exported["keys"] == keys
    tf = eval_transform(size, AugmentConfig(mean=MEAN, std=STD))
    images = [Image.open(p) for p in exported["photos"]]
    # Grayscale photos and a transparent PNG go through convert_rgb; the crop rule matters.
    assert {im.mode for im in images} == {"RGB", "L", "RGBA"}
    assert 0 < sum(crop_rule_matters(im, size) for im in images) < len(images) / 2
    ours = torch.stack([tf(im) for im in images]).numpy()
    one_level = 1 / 255 / min(STD) + 1e-6
    np.testing.assert_array_equal(hf["processor_pixels"], hf["pixels_torchvision"])
    for backend, pixel_tol in (("pil", 1e-6), ("torchvision", one_level)):
        assert np.abs(hf[f"pixels_{backend}"] - ours).max() <= pixel_tol, backend
        emb = np.abs(hf[f"image_{backend}"] - exported["ours_image"]).max()
        assert emb <= TOL, (backend, emb)
    # The transparent part is white on both sides, not the photo's hidden colour.
    white = (1 - np.asarray(MEAN)) / np.asarray(STD)
    np.testing.assert_allclose(ours[-1][:, :, 0], white[:, None].repeat(size, 1), atol=1e-5)


def identity_bpe(captions: list[str]) -> bytes:
    """A BPE model without normalization (a caption's own "▁" survives), as a user may bring."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=out, model_type="bpe", vocab_size=800,
        hard_vocab_limit=False, normalization_rule_name="identity", minloglevel=2, **SPECIAL_IDS,
    )  # fmt: skip
    return out.getvalue()


@pytest.mark.parametrize("kind", ["unigram", "identity_bpe"])
def test_other_sentencepiece_models_give_our_ids(tmp_path: Path, shared_data: Path, kind) -> None:
    """data_tools.tokenizer --model-type unigram (the Unigram pipeline), and a BPE model
    without the NFKC map (no Precompiled step; a leading "▁" kept): same ids as ours."""
    captions = all_coco_captions(shared_data)
    if kind == "unigram":
        proto = train_model(captions, vocab_size=800, model_type="unigram")
    else:
        proto = identity_bpe(captions)
    assert read_spm(proto)["model_type"] == (1 if kind == "unigram" else 2)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_json(proto)))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(proto, 32)))
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    captions = hard_captions(shared_data)
    (tmp_path / "sp.model").write_bytes(proto)
    ours = Tokenizer(str(tmp_path / "sp.model"), 32)
    theirs = tok(captions, padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
    mine = ours(captions)
    bad = [captions[i] for i in (theirs != mine).any(1).nonzero().flatten().tolist()]
    assert not bad, (len(bad), bad[:5])


def test_spm_reader_agrees_with_sentencepiece_proto(proto: bytes) -> None:
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(proto)
    mine = read_spm(proto)
    assert mine["pieces"] == [(p.piece, pytest.approx(p.score), p.type) for p in m.pieces]
    assert mine["charsmap"] == m.normalizer_spec.precompiled_charsmap
    assert (mine["model_type"], mine["byte_fallback"]) == (
        m.trainer_spec.model_type,
        m.trainer_spec.byte_fallback,
    )
    assert mine["add_dummy_prefix"] == m.normalizer_spec.add_dummy_prefix
    assert mine["remove_extra_whitespaces"] == m.normalizer_spec.remove_extra_whitespaces


# CLIP's ResNet-50 layout (resnet50_clip: bottlenecks 3-4-6-3, attention pool) at 1/8 width.
RN50_SMALL = {"image.timm_kwargs": {"width_factor": 0.125, "stem_chs": [8, 8, 16]},
              "image.image_size": 64, "embed_dim": 64, "text.width": 64, "text.layers": 1,
              "text.heads": 2, "text.context_length": 16}  # fmt: skip
SIGLIP = {"init_logit_bias": -10.0, "init_logit_scale": math.log(10)}


@pytest.mark.parametrize(
    "model_yaml,overrides,reason",
    [("rn50.yaml", RN50_SMALL, "CLIP ResNet"), ("tiny.yaml", SIGLIP, "SigLIP")],
    ids=["rn50", "siglip"],
)
def test_unmappable_runs_are_refused_in_one_line(tmp_path, proto, model_yaml, overrides, reason):
    """No CLIPModel for them: exit 2, one `error:` line saying why, nothing written; the
    open_clip export of the same run still works."""
    run = write_run(tmp_path / "run", model_yaml, proto, **overrides)
    proc = cli("-m", "clipforge.export", str(run), "--format", "hf")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and reason in lines[0] and "open_clip" in lines[0]
    assert not (run / "hf").exists()
    assert export_main([str(run)]) == 0
    assert (run / "open_clip" / "open_clip_model.safetensors").is_file()


def test_other_image_towers_are_refused(tmp_path, proto, capsys) -> None:
    run = write_run(tmp_path / "run", "resnet_tiny.yaml", proto)  # timm's plain resnet18
    assert export_main([str(run), "--format", "hf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vit_*_clip_*" in err[0], err
