"""Key-scheme detection and conversion: every layout reads to the same canonical
weights, converts back exactly, and our encoder matches timm and open_clip."""

import torch

from wemoe.checkpoints.checkpoint import open_checkpoint
from wemoe.model.vit import build_vit
from wemoe.schemes import SCHEMES, detect_scheme

from factories import ARCH, hf_config, hf_state_from_open_clip, open_clip_vit, timm_vit, write


def _canonical(path, arch=ARCH):
    ck = open_checkpoint(path, arch)
    return ck, ck.state_dict()


def test_open_clip_prefixes_and_hf_read_to_the_same_canonical_weights(tmp_path):
    oc = {k: v.contiguous() for k, v in open_clip_vit().state_dict().items()}
    refs = []
    for prefix in ("", "visual.", "model.visual."):
        ck, sd = _canonical(write(tmp_path / f"oc{len(prefix)}.safetensors", {prefix + k: v for k, v in oc.items()}))
        assert ck.scheme == "open_clip" and ck.prefix == prefix
        refs.append(sd)
    hf_dir = tmp_path / "hf"
    write(hf_dir / "model.safetensors", hf_state_from_open_clip(oc))
    (hf_dir / "config.json").write_text(__import__("json").dumps(hf_config()))
    ck, sd = _canonical(hf_dir, None)
    assert ck.scheme == "hf_clip" and ck.arch.heads == 2 and ck.arch.embed_dim == 16
    assert ck.extras() == ("vision_model.embeddings.position_ids",)
    for other in refs[1:] + [sd]:
        assert other.keys() == refs[0].keys()
        for k in refs[0]:
            assert torch.equal(other[k], refs[0][k]), k


def test_full_clip_checkpoint_uses_only_the_image_tower(tmp_path):
    oc = {"visual." + k: v.contiguous() for k, v in open_clip_vit().state_dict().items()}
    # a text tower in the same file uses look-alike keys without the visual. prefix
    text = {"transformer.resblocks.0.mlp.c_fc.weight": torch.zeros(8, 4), "logit_scale": torch.tensor(4.6), "token_embedding.weight": torch.zeros(10, 4)}
    ck, _ = _canonical(write(tmp_path / "clip.safetensors", {**oc, **text}))
    assert ck.scheme == "open_clip" and ck.prefix == "visual."
    assert set(ck.match.ignored) == set(text)


def test_round_trip_through_all_three_schemes_is_exact(tmp_path):
    canonical = {k: v.contiguous() for k, v in timm_vit().state_dict().items()}
    canonical.pop("head.bias")
    current = canonical
    for name in ("open_clip", "hf_clip", "timm", "hf_clip", "open_clip", "timm"):
        scheme = SCHEMES[name]
        native = {}
        for k, v in current.items():
            native.update(scheme.to_native(k, v, "visual." if name == "open_clip" else ""))
        match = detect_scheme(list(native))
        assert match.scheme.name == name
        current = {k: scheme.rule_for(k).conversion.to_canonical([native[n] for n in names]) for k, names in match.native_of.items()}
        assert current.keys() == canonical.keys()
        for k in canonical:
            assert torch.equal(current[k], canonical[k]), (name, k)


def test_encoder_matches_timm_and_open_clip(tmp_path):
    x = torch.randn(3, 3, 32, 32)
    t = timm_vit(act="quick_gelu")
    ck, sd = _canonical(write(tmp_path / "t.safetensors", {k: v.contiguous() for k, v in t.state_dict().items()}), {**ARCH, "activation": "quick_gelu"})
    assert ck.scheme == "timm"
    assert torch.allclose(build_vit(ck.arch, sd)(x), t(x), atol=1e-5)
    o = open_clip_vit()
    ck, sd = _canonical(write(tmp_path / "o.safetensors", {"visual." + k: v.contiguous() for k, v in o.state_dict().items()}))
    ref = o(x)
    assert torch.allclose(build_vit(ck.arch, sd)(x), ref[0] if isinstance(ref, tuple) else ref, atol=1e-5)


def test_torch_state_dict_files_and_nested_state_dicts(tmp_path):
    o = {"visual." + k: v for k, v in open_clip_vit().state_dict().items()}
    torch.save({"state_dict": o, "epoch": 3}, tmp_path / "ckpt.pt")
    ck, sd = _canonical(tmp_path / "ckpt.pt")
    assert ck.scheme == "open_clip"
    assert torch.equal(sd["blocks.1.mlp.fc2.weight"], o["visual.transformer.resblocks.1.mlp.c_proj.weight"])


def test_architecture_inference_and_known_names(tmp_path):
    path = write(tmp_path / "o.safetensors", {"visual." + k: v.contiguous() for k, v in open_clip_vit().state_dict().items()})
    ck = open_checkpoint(path)
    a = ck.arch
    assert (a.width, a.depth, a.heads, a.patch_size, a.image_size, a.mlp_width, a.embed_dim) == (64, 2, 1, 8, 32, 256, 16)
    assert "inferred" in a.source
    import pytest

    from wemoe.errors import WemoeError

    with pytest.raises(WemoeError, match="width=768"):
        open_checkpoint(path, "ViT-B-32-quickgelu")
