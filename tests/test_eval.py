"""Zero-shot and retrieval maths on inputs whose answers are known, and the eval pictures."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from eval_data import CLASSNAMES, TEMPLATES, write_eval_set
from omegaconf import OmegaConf
from PIL import Image

from clipforge.config import Config, ConfigError, validate
from clipforge.data.shards import SourceError
from clipforge.eval import figures, retrieval, suite, zeroshot
from clipforge.logging import JsonlLogger, NullLogger

N_CLS = 4


def one_hot_tokenizer(classnames):
    """Prompt -> the index of the class name it contains (as a 1-token 'sequence')."""

    def tok(prompts: list[str]) -> torch.Tensor:
        return torch.tensor(
            [[next(i for i, c in enumerate(classnames) if c in p)] for p in prompts]
        )

    return tok


def one_hot(idx: torch.Tensor, n: int = N_CLS) -> torch.Tensor:
    return F.one_hot(idx.flatten(), n).float()


def batches_of(targets: list[int], preds: list[int], size: int = 3) -> list[dict]:
    """Batches whose 'image' is the class the fake image encoder will 'see' (pred)."""
    out = []
    for s in range(0, len(targets), size):
        out.append(
            {
                "image": torch.tensor(preds[s : s + size]),
                "cls": torch.tensor(targets[s : s + size]),
                "pad": False,
            }
        )
    return out


CLASSES = ["cat", "dog", "ship", "frog"]


def classifier() -> torch.Tensor:
    return zeroshot.build_classifier(
        one_hot, one_hot_tokenizer(CLASSES), CLASSES, ["a photo of a {}.", "a {}."]
    )


def test_one_hot_features_are_classified_perfectly():
    targets = [0, 1, 2, 3, 0, 1, 2, 3, 3]
    res = zeroshot.evaluate(one_hot, batches_of(targets, targets), classifier())
    assert res["top1"] == 1.0 and res["top4"] == 1.0 and res["mean_per_class_recall"] == 1.0
    assert res["samples"] == 9
    assert res["confusion"] == torch.diag(torch.tensor([2, 2, 2, 3])).tolist()


def test_known_confusions_give_known_numbers():
    # class 3 (3 images) is always called class 1; class 0 once called class 2.
    targets = [0, 0, 1, 2, 3, 3, 3]
    preds = [0, 2, 1, 2, 1, 1, 1]
    res = zeroshot.evaluate(one_hot, batches_of(targets, preds), classifier())
    assert res["top1"] == pytest.approx(3 / 7)
    # recalls: class0 1/2, class1 1, class2 1, class3 0 -> mean 0.625 (top1 would hide class 3)
    assert res["mean_per_class_recall"] == pytest.approx(0.625)
    assert res["per_class_recall"] == pytest.approx([0.5, 1.0, 1.0, 0.0])
    assert res["confusion"][3] == [0, 3, 0, 0] and res["confusion"][0] == [1, 0, 1, 0]


def test_top5_counts_a_hit_anywhere_in_the_top_k():
    # 6 classes; the image encoder ranks the true class second: top1 0, top5 1.
    cls = torch.eye(6)

    def second_best(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * one_hot(x, 6) + one_hot((x + 1) % 6, 6)

    batches = [{"image": torch.arange(6), "cls": torch.arange(6)}]
    res = zeroshot.evaluate(second_best, batches, cls)
    assert res["top1"] == 0.0 and res["top5"] == 1.0


def test_padding_batches_are_encoded_but_not_counted():
    seen = []

    def enc(x):
        seen.append(len(x))
        return one_hot(x)

    batches = batches_of([0, 1, 2], [0, 1, 2]) + [{**batches_of([0], [3])[0], "pad": True}]
    res = zeroshot.evaluate(enc, batches, classifier())
    assert res["samples"] == 3 and res["top1"] == 1.0 and seen == [3, 1]


def test_classifier_averages_normalised_template_embeddings():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(2, 3, 8, generator=g)  # [class, template, dim]
    names, templates = ["a", "b"], ["x {}", "y {}", "z {}"]
    prompts = [t.format(n) for n in names for t in templates]

    def tok(ps):
        return torch.tensor([prompts.index(p) for p in ps])

    def enc(ids):
        return table.view(6, 8)[ids] * 3.0  # unnormalised on purpose

    got = zeroshot.build_classifier(enc, tok, names, templates, batch_size=4)
    want = F.normalize(F.normalize(table, dim=-1).mean(1), dim=-1).T
    assert torch.allclose(got, want, atol=1e-6)


# -- retrieval ---------------------------------------------------------------------------------
def test_recall_at_k_with_several_captions_per_image():
    # 3 images (identity features), 5 captions: image 0 owns 0,1; image 1 owns 2; image 2 owns 3,4.
    owner = torch.tensor([0, 0, 1, 2, 2])
    # sims[t, i]: what caption t scores against image i.
    sims = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # own image first
            [0.2, 0.8, 0.1],  # own image second
            [0.1, 0.3, 0.5],  # own image second
            [0.5, 0.4, 0.3],  # own image last
            [0.0, 0.1, 0.7],  # own image first
        ]
    )
    res = retrieval.recall_at_k(torch.eye(3), sims, owner, ks=(1, 2, 3))
    assert res["text_to_image_R@1"] == pytest.approx(2 / 5)
    assert res["text_to_image_R@2"] == pytest.approx(4 / 5)
    assert res["text_to_image_R@3"] == 1.0
    # image -> text, columns of sims: image 0 ranks captions 0(.9),3(.5),1(.2): hit at 1.
    # image 1: 1(.8),3(.4),2(.3): its caption 2 comes third. image 2: 4(.7),2(.5),3(.3): hit at 1.
    assert res["image_to_text_R@1"] == pytest.approx(2 / 3)
    assert res["image_to_text_R@2"] == pytest.approx(2 / 3)
    assert res["image_to_text_R@3"] == 1.0
    assert res["mean_recall"] == pytest.approx(sum(v for k, v in res.items() if "@" in k) / 6)


def test_recall_k_above_the_candidates_is_capped():
    res = retrieval.recall_at_k(torch.eye(2), torch.eye(2), torch.tensor([0, 1]), ks=(1, 10))
    assert res["text_to_image_R@10"] == 1.0 and res["image_to_text_R@1"] == 1.0


def test_captions_come_from_json_list_else_txt():
    assert retrieval.captions_of({"json": b'{"captions": ["a", "b"]}', "txt": b"c"}) == ["a", "b"]
    assert retrieval.captions_of({"json": b"{}", "txt": b"c"}) == ["c"]
    assert retrieval.captions_of({"json": b"not json"}) == []


def test_text_chunks_are_split_evenly_over_ranks():
    calls = []

    def enc(t):
        calls.append(t.shape[0])
        return torch.ones(t.shape[0], 2)

    def tok(texts):
        return torch.zeros(len(texts), 1)

    # 5 chunks of 2 for rank 1 of 2 (no process group: gather returns this rank's own part):
    # chunks 1 and 3 and a repeat of chunk 4 that is dropped, so ranks run equal forwards.
    out = retrieval.embed_texts(enc, tok, [str(i) for i in range(9)], 2, rank=1, world=2)
    assert calls == [2, 2, 1] and out.shape == (4, 2)


# -- the suite on a real shard folder ----------------------------------------------------------
def colour_encoders() -> suite.Encoders:
    """Image -> mean RGB; text -> the RGB of the colour word it names: a perfect 'model'."""
    from eval_data import COLOURS

    from clipforge.config import AugmentConfig
    from clipforge.data.transforms import eval_transform

    rgb = torch.tensor(list(COLOURS.values())).float() / 255 - 0.5
    return suite.Encoders(
        lambda x: x.mean(dim=(2, 3)) - x.mean(dim=(1, 2, 3))[:, None],
        lambda t: rgb[t[:, 0]] - rgb[t[:, 0]].mean(dim=1, keepdim=True),
        one_hot_tokenizer(CLASSNAMES),
        eval_transform(32, AugmentConfig(mean=[0, 0, 0], std=[1, 1, 1])),
    )


def test_suite_runs_both_sets_and_writes_results(tmp_path):
    sset = write_eval_set(tmp_path / "colours")
    cfg = OmegaConf.to_object(OmegaConf.structured(Config)).eval
    cfg.zeroshot = cfg.retrieval = str(sset)
    cfg.batch_size = 5
    results = suite.run_sets(colour_encoders(), cfg, draw=True)
    zs, rt = results
    assert zs.set == "colours" and zs.metrics["top1"] == 1.0 and zs.metrics["samples"] == 12
    assert zs.details["templates"] == TEMPLATES  # the set's own templates file wins
    assert rt.metrics["images"] == 12 and rt.metrics["captions"] == 30
    # Each colour class has 4 look-alike images: top-1 is luck, but top-4 images of the
    # right colour always include the caption's own.
    assert rt.metrics["text_to_image_R@5"] == 1.0
    assert isinstance(zs.figures["confusion"], Image.Image)
    assert isinstance(rt.figures["retrieval"], Image.Image)
    written = suite.write_results(results, tmp_path / "out")
    assert {p.name for p in written} == {
        "zeroshot_colours.json",
        "zeroshot_colours_confusion.png",
        "retrieval_colours.json",
        "retrieval_colours_retrieval.png",
    }
    saved = json.loads((tmp_path / "out" / "zeroshot_colours.json").read_text())
    assert saved["confusion"] == [[4, 0, 0], [0, 4, 0], [0, 0, 4]]
    assert "zero-shot step 7: top1 1.0000" in suite.summary(zs, 7)


def test_set_name():
    assert suite.set_name("/data/cifar10_test/") == "cifar10_test"
    assert suite.set_name("s3://b/coco/manifest.json") == "coco"
    assert suite.set_name("/d/val/{00000..00003}.tar") == "val"
    assert suite.set_name("/a/x::/b/y") == "x"


def test_set_names_are_distinct():
    assert suite.set_names(["/d/cifar10/test", "s3://b/stl10/test/", "/d/coco"]) == [
        "cifar10_test",
        "stl10_test",
        "coco",
    ]
    assert suite.set_names(["/a/b", "/a/b"]) == ["a_b_0", "a_b_1"]
    assert suite.sources(None) == [] and suite.sources("x") == ["x"]


def test_several_sets_of_a_kind_each_report(tmp_path):
    """eval.zeroshot=[A,B]: each set is scored and named by its own folder; here the second
    set holds other samples (per_class=2), so its numbers are its own, not the first's."""
    big = write_eval_set(tmp_path / "a" / "test")
    small = write_eval_set(tmp_path / "b" / "test", per_class=2)
    cfg = OmegaConf.to_object(OmegaConf.structured(Config)).eval
    cfg.zeroshot = [str(big), str(small)]
    cfg.retrieval = str(small)
    cfg.batch_size = 5
    results = suite.run_sets(colour_encoders(), cfg)
    assert [
        (r.kind, r.set, r.metrics.get("samples", r.metrics.get("images"))) for r in results
    ] == [
        ("zeroshot", "a_test", 12),
        ("zeroshot", "b_test", 6),
        ("retrieval", "test", 6),
    ]
    written = suite.write_results(results, tmp_path / "out")
    assert len({p.name for p in written}) == len(written)


@pytest.mark.parametrize("value", [3, ["ok", ""], {"a": "b"}])
def test_eval_sources_are_validated(value):
    cfg = Config()
    cfg.data.train = "x"
    cfg.eval.zeroshot = value
    with pytest.raises(ConfigError, match="eval.zeroshot must be a shard source or a list"):
        validate(cfg)


# -- figures -----------------------------------------------------------------------------------
def test_confusion_image_shades_by_row_recall():
    img = figures.confusion_image([[9, 1], [0, 5]], ["cat", "dog"], title="t")
    assert img.mode == "RGB" and img.width > 80 and img.height > 80
    # The darkest cell is the perfect row's diagonal; an empty cell stays white.
    px = img.load()
    colours = {px[x, y] for x in range(img.width) for y in range(img.height)}
    assert (30, 70, 180) in colours and (255, 255, 255) in colours


def test_confusion_image_of_many_classes_drops_labels():
    img = figures.confusion_image(torch.eye(200, dtype=torch.long).tolist(), [])
    assert img.width < 1000 and img.height < 1000
    with pytest.raises(ValueError):
        figures.confusion_image([[1, 2]], ["a"])


def test_retrieval_strip_frames_the_right_image_green():
    red, blue = Image.new("RGB", (10, 10), "red"), Image.new("RGB", (10, 10), "blue")
    img = figures.retrieval_strip(
        ["a red one", "a blue one"],
        [[red, blue], [red, blue]],
        [[True, False], [False, True]],
        thumb=32,
    )
    px = img.load()
    # Frames start at x=240 (text panel), rows at y=6; each thumb cell is 32 + 2*4 wide + 6 gap.
    assert px[241, 7] == figures._RIGHT and px[241 + 46, 7] == figures._WRONG
    assert px[241 + 46, 7 + 46] == figures._RIGHT


# -- config and logger -------------------------------------------------------------------------
def test_eval_fields_are_validated():
    cfg = Config()
    cfg.data.train = "x"
    cfg.eval.recall_at = [0, 5]
    cfg.eval.templates = ["nope"]
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert "eval.recall_at" in str(err.value) and "eval.templates" in str(err.value)


def test_loggers_take_images(tmp_path):
    img = Image.new("RGB", (4, 4))
    NullLogger().log_images(3, {"a/b": img})
    logger = JsonlLogger(tmp_path)
    logger.log_images(3, {"zeroshot/set/confusion": img})
    logger.close()
    assert (tmp_path / "eval" / "figures" / "zeroshot_set_confusion_step00000003.png").is_file()


def test_training_skips_an_unusable_set_but_standalone_fails(tmp_path):
    sset = write_eval_set(tmp_path / "colours")
    (sset / "classnames.txt").unlink()
    cfg = OmegaConf.to_object(OmegaConf.structured(Config)).eval
    cfg.zeroshot = cfg.retrieval = str(sset)
    results = suite.run_sets(colour_encoders(), cfg, strict=False)
    assert [r.kind for r in results] == ["retrieval"]
    with pytest.raises(SourceError, match="classnames"):
        suite.run_sets(colour_encoders(), cfg)
