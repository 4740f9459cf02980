"""A merged model inside open_clip and timm pipelines: the same embeddings as ``wemoe.load``, CLIP's own
zero-shot predictions equal to the zero-shot head's, and pipelines that would feed it wrong inputs refused."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import wemoe
from wemoe.cli import main
from wemoe.errors import WemoeError
from wemoe.integrations.open_clip import use_merged_visual
from wemoe.integrations.timm import use_merged_weights
from wemoe.model.heads import load_head

from clip_factories import CONTEXT, TEXT_DEPTH, TEXT_WIDTH, image_folder, open_clip_clip, visual_tasks, write_clip
from factories import DEPTH, EMBED, HEADS, IMAGE, PATCH, WIDTH, timm_vit

CLASSES = ["circle", "square", "triangle"]


def cli(*args) -> None:
    """The real CLI in-process, for module-scoped fixtures (capsys is per test)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            assert not exc.code, stderr.getvalue()


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """A full open_clip CLIP, two fine-tune-like image towers, zero-shot heads, a static and a WEMoE merge."""
    tmp = tmp_path_factory.mktemp("integrations")
    model, oc_path, _ = write_clip(tmp)
    tasks = visual_tasks(tmp, model.state_dict(), 2)
    data = image_folder(tmp / "shapes", CLASSES)
    common = ["--base", oc_path, "--tasks", f"shapes={tasks[0]}", f"other={tasks[1]}", "--heads", f"clip:{oc_path}", "-q"]
    common += ["--data", f"shapes={data}", f"other={data}"]
    outs = {"static": tmp / "static", "wemoe": tmp / "wemoe"}
    cli("merge", *common, "--method", "adamerging", "--steps", "0", "--out", outs["static"])
    cli("merge", *common, "--method", "wemoe", "--steps", "2", "--batch-size", "2", "--out", outs["wemoe"])
    cli("heads", "--clip", oc_path, "--task", f"shapes={data}", "--out", tmp / "heads", "-q")
    return tmp, oc_path, outs, load_head(tmp / "heads" / "shapes.safetensors")


def images(n=5, seed=0):
    return torch.randn(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["static", "wemoe"])
def test_open_clip_encode_image_is_the_merged_model(merged, kind):
    tmp, oc_path, outs, head = merged
    clip = open_clip_clip()  # the same weights as the CLIP file (seeded)
    x = images()
    tokens = torch.randint(1, 49000, (2, CONTEXT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text_before = clip.encode_text(tokens)
    assert use_merged_visual(clip, outs[kind]) is clip
    reference = wemoe.load(outs[kind])
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(clip.encode_image(x), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(clip.encode_image(x, normalize=True), torch.nn.functional.normalize(expected, dim=-1), atol=1e-6, rtol=0)
        assert torch.equal(clip.encode_text(tokens), text_before)  # the text tower is untouched
    assert not torch.allclose(expected, open_clip_clip().encode_image(x).detach(), atol=1e-3)  # and the image tower did change
    assert clip.visual.image_size == (IMAGE, IMAGE) and tuple(clip.visual.image_mean) == tuple(reference.arch.mean)


@pytest.mark.parametrize("kind", ["static", "wemoe"])
def test_zero_shot_with_the_text_tower_equals_the_head(merged, kind):
    import open_clip
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    from wemoe.clip.templates import BUILTIN

    tmp, oc_path, outs, head = merged
    clip = use_merged_visual(open_clip_clip(), outs[kind])
    x = images(8, seed=1)
    with torch.no_grad():
        classifier = build_zero_shot_classifier(clip, open_clip.get_tokenizer("ViT-B-32"), CLASSES, list(BUILTIN["openai"]), num_classes_per_batch=None)
        clip_logits = clip.logit_scale.exp() * clip.encode_image(x, normalize=True) @ classifier
        head_logits = head.logits(wemoe.load(outs[kind])(x))
    torch.testing.assert_close(clip_logits, head_logits, atol=1e-4, rtol=1e-5)
    assert torch.equal(clip_logits.argmax(-1), head_logits.argmax(-1))


def test_open_clip_transforms_feed_the_merged_encoder(merged, tmp_path):
    """create_model_and_transforms from a model config: its preprocess makes exactly the merged encoder's input size."""
    import open_clip

    tmp, oc_path, outs, _ = merged
    config = {
        "embed_dim": EMBED,
        "vision_cfg": {"image_size": IMAGE, "layers": DEPTH, "width": WIDTH, "head_width": WIDTH // HEADS, "patch_size": PATCH},
        "text_cfg": {"context_length": CONTEXT, "vocab_size": 49408, "width": TEXT_WIDTH, "heads": TEXT_WIDTH // 64, "layers": TEXT_DEPTH},
    }
    (tmp_path / "wemoe-test-tiny.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "wemoe-test-tiny.json")
    clip, _, preprocess = open_clip.create_model_and_transforms("wemoe-test-tiny", pretrained=str(oc_path))
    use_merged_visual(clip, outs["wemoe"])
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 40, 3), dtype=np.uint8))
    batch = preprocess(picture).unsqueeze(0)
    assert batch.shape == (1, 3, IMAGE, IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(batch), wemoe.load(outs["wemoe"])(batch), atol=1e-6, rtol=0)


def test_open_clip_refuses_other_preprocessing_or_embedding(merged):
    _, _, outs, _ = merged
    clip = open_clip_clip()
    clip.visual.preprocess_cfg = {"size": IMAGE, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    with pytest.raises(WemoeError, match=r"normalises with mean \(0.5, 0.5, 0.5\)"):
        use_merged_visual(clip, outs["static"])
    clip.visual.preprocess_cfg = {"size": 224}
    with pytest.raises(WemoeError, match="feeds 224x224 images but the merged encoder takes 32x32"):
        use_merged_visual(clip, outs["static"])
    other = open_clip_clip()
    other.text_projection = torch.nn.Parameter(torch.randn(TEXT_WIDTH, 24))
    with pytest.raises(WemoeError, match="text embeddings have 24 dimensions but the merged encoder's 16"):
        use_merged_visual(other, outs["static"])
    with pytest.raises(WemoeError, match="not an open_clip CLIP model"):
        use_merged_visual(timm_vit(), outs["static"])


def test_timm_takes_a_static_merge(merged):
    _, _, outs, _ = merged
    model = use_merged_weights(timm_vit(), outs["static"])
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), wemoe.load(outs["static"])(x), atol=1e-5, rtol=0)
    with pytest.raises(WemoeError, match="routes each image through its experts"):
        use_merged_weights(timm_vit(), outs["wemoe"])
    with pytest.raises(WemoeError, match="the timm model uses quick_gelu but the merge was made with gelu"):
        use_merged_weights(timm_vit(act="quick_gelu"), outs["static"])
