"""Weight files people already have (../shared/formats): every fixture of the manifest loads to
exactly the expected official state dict; DiTs built from them run the parity cases within the
error their quantisation explains; damaged / foreign files fail with one sentence.

The fixture list, sizes and sources are read from `manifest.json` (INFINITETALK_FORMATS points
at another fixture set, e.g. the hidden one).

Forward bounds, per quantisation type (relative L2 errors on the parity cases):
* Per type (each GGUF type, fp8 e4m3, and the F16 / BF16 roundings of the other linears): every
  linear whose weight the file changes is compared, on the inputs the forward really gives it,
  with the same layer holding the official weights. Its own error is e = sqrt(e_w^2 + e_x^2):
  e_w = ||[dW db]|| / ||[W b]|| of its dequantised weights (from the expected files), e_x the
  relative rounding of its input (the fp8 path rounds each activation row to e4m3; 0 elsewhere;
  at most the e4m3 unit roundoff 2^-4). Bound: the type's output error over all its layers
  (root-sum-square, relative) is at most LAYER_GAIN times their own errors weighted the same way.
  Why LAYER_GAIN = 2: an error matrix E that is not aligned with the inputs gives
  E||x E^T||^2 = ||x||^2 ||E||^2 / in, as W does, so the ratio is about 1 (0.97-1.02 per type
  measured on the visible set); 2 leaves room for other inputs and weights. Each single layer
  stays within SINGLE_LAYER_GAIN = 4 of its own error: a layer with few outputs (the adapter's
  16-wide audio projections on 1-4 audio rows) is a small sample (0.65-1.34 measured). The numbers
  of each type are printed.
* The whole output: the GGUF layers dequantise exactly (bit for bit the expected tensor), so a DiT
  without fp8 layers equals a float32 DiT holding the dequantised weights: bound 1e-6 (float32
  summation order only). With fp8 layers the only other difference is the activation rounding,
  so the same argument bounds the output by LAYER_GAIN times the largest e_x of its layers
  (measured 1.2x of it on the visible set: 0.032 against a bound of 0.053, a margin like that of
  the former fixed bound 2^-4 = 0.0625, which had no derivation). The error against the official
  output is printed, not bounded as one number for the whole file: the per-type bounds above say
  where it comes from.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import SHARED
from infinitetalk.errors import CheckpointError, InfiniteTalkError, InputError

FORMATS = Path(os.environ.get("INFINITETALK_FORMATS", SHARED / "formats"))
MANIFEST = FORMATS / "manifest.json"
FIXTURES = json.loads(MANIFEST.read_text())["fixtures"] if MANIFEST.is_file() else []
E4M3_UNIT_ROUNDOFF = 2.0 ** -4
LAYER_GAIN = 2.0
SINGLE_LAYER_GAIN = 4.0
GGUF_BOUND = 1e-6

gguf = pytest.importorskip("gguf")


def _ids(fx):
    return fx["file"]


def _need_fixtures():
    if not FIXTURES:
        pytest.skip(f"{MANIFEST} is absent")


def _expected(fx) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for rel in fx["expected"]:
        out.update(load_file(str(FORMATS / rel)))
    return out


def _of(model: str) -> list[dict]:
    return [fx for fx in FIXTURES if fx["model"] == model]


def _source_path(fx) -> Path:
    return (FORMATS / fx["source"].split(" ")[0]).resolve()


# ---- 1. every fixture -> exactly the expected tensors ----------------------------------------
@pytest.mark.parametrize("fx", FIXTURES or [None], ids=lambda fx: _ids(fx) if fx else "no-manifest")
def test_fixture_loads_exactly(fx):
    from infinitetalk.weights.formats import read_state_dict

    if fx is None:
        _need_fixtures()
    expected = _expected(fx)
    got = read_state_dict(FORMATS / fx["file"], fx["model"])
    assert set(got) == set(expected), (sorted(set(got) - set(expected))[:5], sorted(set(expected) - set(got))[:5])
    for key, value in expected.items():
        assert tuple(got[key].shape) == tuple(value.shape), key
        assert torch.equal(got[key].to(torch.float32), value), key


def test_content_not_name_decides(tmp_path):
    """A fixture renamed to a misleading name loads the same; the format comes from the content."""
    from infinitetalk.weights.formats import inspect_file, read_state_dict

    _need_fixtures()
    for fx in FIXTURES[:: max(1, len(FIXTURES) // 4)]:
        fake = tmp_path / ("vae_model" + ("" if fx["file"].endswith(".gguf") else ".safetensors"))
        shutil.copyfile(FORMATS / fx["file"], fake)
        assert inspect_file(fake).detected.provides(fx["model"])
        expected = _expected(fx)
        got = read_state_dict(fake, fx["model"])
        assert all(torch.equal(got[k].float(), v) for k, v in expected.items())
        fake.unlink()


def test_safetensors_found_by_content_under_any_extension(tmp_path):
    """Every safetensors fixture copied to `.sft` (a recognised weight extension, found in a ComfyUI
    folder) and to a wrong one (`.pth`) loads to the same tensors, through the raw reader and the
    component readers; the container comes from the header bytes, not the name."""
    from infinitetalk.weights.formats import read_state_dict
    from infinitetalk.weights.locate import locate_components
    from infinitetalk.weights.materialize import container_of, open_weights

    fixtures = [fx for fx in FIXTURES if fx["format"].startswith("safetensors")]
    if not fixtures:
        pytest.skip("no safetensors fixture in the manifest")
    for fx in fixtures:
        original = FORMATS / fx["file"]
        expected = _expected(fx)
        raw = open_weights([original])
        for suffix in (".sft", ".pth"):
            copy = tmp_path / (Path(fx["file"]).stem + suffix)
            shutil.copyfile(original, copy)
            assert container_of(copy) == "safetensors", copy
            again = open_weights([copy])
            assert set(again.keys()) == set(raw.keys())
            assert all(torch.equal(again[k], raw[k]) and again[k].dtype == raw[k].dtype for k in raw.keys()), copy
            got = read_state_dict(copy, fx["model"])
            assert set(got) == set(expected), copy
            assert all(torch.equal(got[k].to(torch.float32), v) for k, v in expected.items()), copy
            copy.unlink()
    fx = next((f for f in fixtures if f["model"] == "vae"), fixtures[0])
    comfy = tmp_path / "ComfyUI" / "models" / COMFY_SUBDIR[fx["model"]]
    comfy.mkdir(parents=True)
    shutil.copyfile(FORMATS / fx["file"], comfy / "model.sft")
    assert locate_components(tmp_path / "ComfyUI").path(fx["model"]) == comfy / "model.sft"


@pytest.mark.parametrize("name", ["notes.safetensors", "model.sft", "model.pth", "model.gguf", "model"])
def test_a_file_that_is_no_weight_file_is_named(tmp_path, name):
    from infinitetalk.weights.formats import inspect_file, open_component
    from infinitetalk.weights.materialize import container_of, open_weights

    path = tmp_path / name
    path.write_text("These are my notes, not weights.\n" * 4)
    assert container_of(path) is None
    for call in (lambda: open_weights([path]), lambda: open_component(path, "vae")):
        with pytest.raises(CheckpointError) as err:
            call()
        text = _one_sentence(err.value, path)
        assert "not a weight file" in text or "GGUF" in text
    info = inspect_file(path)
    assert info.detected is None and str(path) in info.error


def test_comfy_quant_either_transport(tmp_path):
    """ComfyUI fp8 files list their quantised layers in the header or as .comfy_quant tensors: each alone works."""
    from infinitetalk.weights.formats import read_state_dict

    comfy = [fx for fx in FIXTURES if "header_metadata" in fx and "*.comfy_quant" in fx.get("extra_keys", [])]
    if not comfy:
        pytest.skip("no ComfyUI quant fixture in the manifest")
    fx = comfy[0]
    path = FORMATS / fx["file"]
    with safe_open(str(path), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        metadata = fh.metadata()
    expected = _expected(fx)
    variants = {
        "header-only": ({k: v for k, v in tensors.items() if not k.endswith(".comfy_quant")}, metadata),
        "tensors-only": (tensors, {k: v for k, v in metadata.items() if k != "_quantization_metadata"}),
    }
    for name, (state, meta) in variants.items():
        out = tmp_path / f"{name}.safetensors"
        save_file(state, str(out), metadata=meta)
        got = read_state_dict(out, fx["model"])
        assert set(got) == set(expected), name
        assert all(torch.equal(got[k].float(), v) for k, v in expected.items()), name


# ---- 2. GGUF dequantisation and the quantised linear -------------------------------------------
def test_dequant_bit_identical_to_gguf_py():
    import numpy as np

    from infinitetalk.quant.gguf_dequant import dequantize

    files = [fx for fx in FIXTURES if fx["file"].endswith(".gguf")]
    if not files:
        pytest.skip("no GGUF fixture")
    seen = set()
    for fx in files:
        for t in gguf.GGUFReader(str(FORMATS / fx["file"])).tensors:
            ref = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
            raw = torch.from_numpy(np.array(np.asarray(t.data).reshape(-1).view(np.uint8)))
            got = dequantize(raw, int(t.tensor_type), ref.shape)
            assert torch.equal(got, torch.from_numpy(np.array(ref))), (fx["file"], t.name)
            seen.add(t.tensor_type.name)
    listed = {q for fx in files for q in fx.get("tensor_types", {})}
    assert listed <= seen


def test_gguf_linear_keeps_blocks_and_matches_dequantised_weight():
    from infinitetalk.quant.gguf_linear import GGUFLinear
    from infinitetalk.weights.formats import open_component

    fx = next((f for f in _of("dit") if f["file"].endswith(".gguf")), None)
    if fx is None:
        pytest.skip("no GGUF DiT fixture")
    source = open_component(FORMATS / fx["file"], "dit")
    for key, qtype in fx["quantized_tensors"].items():
        if qtype in ("F16", "BF16", "F32"):
            continue
        out_f, in_f = source.shape(key)
        layer = GGUFLinear(in_f, out_f, qtype, bias=False)
        layer.weight = source.raw(key)
        x = torch.randn(3, in_f)
        assert torch.equal(layer.dequantized_weight(), source[key])
        assert torch.allclose(layer(x), x @ source[key].t(), rtol=1e-5, atol=1e-6)
        assert layer.weight.dtype == torch.uint8 and layer.weight.numel() < source[key].numel() * 4
        layer = layer.to(torch.bfloat16)  # a model-wide cast leaves the blocks alone
        assert layer.weight.dtype == torch.uint8


# ---- 3. DiT forwards on the parity cases --------------------------------------------------------
def _dit_config(fx):
    from infinitetalk.models.dit import WanDiTConfig

    return WanDiTConfig.from_official_json(_source_path(fx) / "config.json")


def _cases(fx):
    cases = sorted((_source_path(fx).parent / "cases").glob("*.safetensors"))
    assert cases, f"no parity cases beside {_source_path(fx)}"
    return [load_file(str(c)) for c in cases]


def _forward(model, case):
    with torch.inference_mode():
        return model(case["x"][None], case["t"], [case["context"]], case["clip_fea"], case["y"][None],
                     case["audio"][None], case.get("ref_target_masks"))


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def official_dit_weights():
    from infinitetalk.weights.dit_loader import find_dit_files
    from infinitetalk.weights.materialize import open_weights

    dits, adapters = _of("dit"), _of("adapter")
    if not dits or not adapters:
        pytest.skip("no DiT / adapter fixtures")
    src = open_weights(find_dit_files(_source_path(dits[0])) + [_source_path(adapters[0])])
    return {k: v.float() for k, v in src.items()}


def _layer_kind(module, key: str, fx: dict, adapter: dict) -> str:
    from infinitetalk.quant.fp8 import Fp8Linear
    from infinitetalk.quant.gguf_linear import GGUFLinear

    listed = {**adapter.get("quantized_tensors", {}), **fx.get("quantized_tensors", {})}
    if isinstance(module, GGUFLinear):
        assert listed.get(key, module.qtype) == module.qtype, key  # the type the manifest lists
        return module.qtype
    if isinstance(module, Fp8Linear):
        return "fp8-e4m3"
    return listed.get(key, "F16")  # a float layer: the base is the official DiT rounded to float16


def _layer_errors(model, official: dict, dequantised: dict, fx: dict, adapter: dict) -> tuple[dict, list]:
    """Hooks on every linear whose weight the file changes: per kind, (e_out, e_w, e_x, ||y||) per call."""
    from infinitetalk.quant.fp8 import Fp8Linear, quantize_activation_rowwise

    per_kind: dict[str, list] = {}
    handles = []
    for name, module in model.named_modules():
        key = name + ".weight"
        if not hasattr(module, "in_features") or key not in official or torch.equal(official[key], dequantised[key]):
            continue
        w, b = official[key].double(), official.get(name + ".bias")
        dw = dequantised[key].double() - w
        db = (dequantised[name + ".bias"].double() - b.double()) if b is not None else torch.zeros(0, dtype=torch.float64)
        norm = (w.norm() ** 2 + (b.double().norm() ** 2 if b is not None else 0)) ** 0.5
        e_w = ((dw.norm() ** 2 + db.norm() ** 2) ** 0.5 / norm).item()
        kind = _layer_kind(module, key, fx, adapter)

        def hook(mod, args, out, w=w, b=b, e_w=e_w, kind=kind):
            x = args[0].reshape(-1, args[0].shape[-1])
            ref = x.double() @ w.t() + (b.double() if b is not None else 0)
            e_out = ((out.reshape(ref.shape).double() - ref).norm() / ref.norm()).item()
            e_x = 0.0
            if isinstance(mod, Fp8Linear):
                q, scale = quantize_activation_rowwise(x)
                e_x = ((q.double() * scale.double() - x.double()).norm() / x.double().norm()).item()
            per_kind.setdefault(kind, []).append((e_out, e_w, e_x, ref.norm().item()))

        handles.append(module.register_forward_hook(hook))
    return per_kind, handles


@pytest.mark.parametrize("fx", _of("dit") or [None], ids=lambda fx: _ids(fx) if fx else "none")
def test_dit_forward_within_quantisation_bound(fx, official_dit_weights):
    from infinitetalk.models.dit import InfiniteTalkDiT
    from infinitetalk.quant.gguf_linear import GGUFLinear
    from infinitetalk.quant.fp8 import Fp8Linear
    from infinitetalk.weights.dit_loader import load_dit

    if fx is None:
        _need_fixtures()
    adapter = _of("adapter")[0]
    cfg = _dit_config(fx)
    model = load_dit(FORMATS / fx["file"], FORMATS / adapter["file"], config=cfg)
    kinds = {type(m).__name__ for m in model.modules()}
    dequantised = {**_expected(fx), **_expected(adapter)}
    reference = InfiniteTalkDiT(cfg).eval()
    reference.load_state_dict(dequantised)
    n_fp8 = sum(isinstance(m, Fp8Linear) for m in model.modules())
    n_gguf = sum(isinstance(m, GGUFLinear) for m in model.modules())
    assert n_gguf or n_fp8, f"{fx['file']}: no layer kept its quantised storage ({kinds})"
    per_kind, handles = _layer_errors(model, official_dit_weights, dequantised, fx, adapter)
    outputs = [(case, _forward(model, case)) for case in _cases(fx)]
    for h in handles:
        h.remove()
    assert per_kind, "no layer of the file differs from the official weights"
    for kind, calls in sorted(per_kind.items()):
        # the type's output error over all its layers against its own (weight and input) error
        out_err = sum((e_out * y) ** 2 for e_out, _, _, y in calls) ** 0.5
        own_err = sum((e_w * e_w + e_x * e_x) * y * y for _, e_w, e_x, y in calls) ** 0.5
        ratios = [e_out / max((e_w * e_w + e_x * e_x) ** 0.5, 1e-30) for e_out, e_w, e_x, _ in calls]
        e_ws = [c[1] for c in calls]
        print(f"{fx['file']} {kind:8s}: {len(calls):3d} layer calls, weight error {min(e_ws):.2e}..{max(e_ws):.2e}, "
              f"input rounding up to {max(c[2] for c in calls):.3f}; output/own error {out_err / own_err:.2f} "
              f"(bound {LAYER_GAIN:g}), per layer {min(ratios):.2f}..{max(ratios):.2f} (bound {SINGLE_LAYER_GAIN:g})")
        assert all(e_x <= E4M3_UNIT_ROUNDOFF for _, _, e_x, _ in calls), kind
        assert out_err <= LAYER_GAIN * own_err + GGUF_BOUND * sum(y * y for *_, y in calls) ** 0.5, kind
        assert all(e_out <= SINGLE_LAYER_GAIN * (e_w * e_w + e_x * e_x) ** 0.5 + GGUF_BOUND for e_out, e_w, e_x, _ in calls), kind
    rounding = max((e_x for calls in per_kind.values() for _, _, e_x, _ in calls), default=0.0)
    bound_deq = LAYER_GAIN * rounding + GGUF_BOUND if n_fp8 else GGUF_BOUND
    for case, out in outputs:
        vs_deq = _rel(out, _forward(reference, case))
        vs_official = _rel(out, case["out_cond"])
        print(f"{fx['file']}: {n_gguf} GGUF / {n_fp8} fp8 layers; vs dequantised weights {vs_deq:.2e} "
              f"(bound {bound_deq:.1e}), vs official output {vs_official:.3f}")
        assert vs_deq <= bound_deq


def test_lora_on_gguf_layers_is_a_side_path(tmp_path):
    from infinitetalk.models.dit import InfiniteTalkDiT
    from infinitetalk.quant.gguf_linear import GGUFLinear
    from infinitetalk.weights.dit_loader import load_dit

    fx = next((f for f in _of("dit") if f["file"].endswith(".gguf")), None)
    if fx is None or not _of("adapter"):
        pytest.skip("no GGUF DiT fixture")
    adapter = _of("adapter")[0]
    cfg = _dit_config(fx)
    expected = {**_expected(fx), **_expected(adapter)}
    quantised = [k for k, q in fx["quantized_tensors"].items() if k.startswith("blocks.") and q not in ("F16", "BF16")][:2]
    plain = "blocks.0.self_attn.q.weight" if "blocks.0.self_attn.q.weight" not in quantised else "blocks.1.cross_attn.q.weight"
    gen = torch.Generator().manual_seed(3)
    lora, merged = {}, dict(expected)
    scale, rank, alpha = 0.7, 4, 2.0
    for key in quantised + [plain]:
        out_f, in_f = expected[key].shape
        down, up = torch.randn(rank, in_f, generator=gen) * 0.05, torch.randn(out_f, rank, generator=gen) * 0.05
        module = key[: -len(".weight")]
        lora[f"diffusion_model.{module}.lora_down.weight"] = down
        lora[f"diffusion_model.{module}.lora_up.weight"] = up
        lora[f"diffusion_model.{module}.alpha"] = torch.tensor(alpha)
        merged[key] = expected[key] + scale * (alpha / rank) * (up @ down)
    path = tmp_path / "lora.safetensors"
    save_file(lora, str(path))
    model = load_dit(FORMATS / fx["file"], FORMATS / adapter["file"], config=cfg, loras=[(path, scale)])
    for key in quantised:
        layer = model.get_submodule(key[: -len(".weight")])
        assert isinstance(layer, GGUFLinear) and len(layer.lora_factors) == 1
    reference = InfiniteTalkDiT(cfg).eval()
    reference.load_state_dict(merged)
    case = _cases(fx)[0]
    assert _rel(_forward(model, case), _forward(reference, case)) <= 1e-5


# ---- 4. bad files: one sentence naming the file ---------------------------------------------------
def _one_sentence(err: Exception, path: Path) -> str:
    text = str(err)
    assert str(path) in text, text
    assert "\n" not in text and text.rstrip(".").count(". ") == 0, text
    return text


def test_truncated_gguf(tmp_path):
    from infinitetalk.weights.dit_loader import load_dit

    fx = next((f for f in _of("dit") if f["file"].endswith(".gguf")), None)
    if fx is None:
        pytest.skip("no GGUF DiT fixture")
    data = (FORMATS / fx["file"]).read_bytes()
    for cut in (len(data) // 2, 200):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as err:
            load_dit(bad, FORMATS / _of("adapter")[0]["file"], config=_dit_config(fx))
        assert "truncated" in _one_sentence(err.value, bad)


def test_gguf_of_another_architecture(tmp_path):
    from infinitetalk.weights.formats import open_component

    import numpy as np

    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "flux")
    writer.add_tensor("double_blocks.0.img_attn.qkv.weight", np.zeros((96, 32), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError) as err:
        open_component(path, "dit")
    assert "'flux'" in _one_sentence(err.value, path)


def test_fp8_file_without_scales(tmp_path):
    from infinitetalk.weights.dit_loader import load_dit

    fx = next((f for f in _of("dit") if "*.scale_weight" in f.get("extra_keys", [])), None)
    if fx is None:
        pytest.skip("no Kijai fp8 fixture")
    with safe_open(str(FORMATS / fx["file"]), "pt") as fh:
        state = {k: fh.get_tensor(k) for k in fh.keys() if not k.endswith(".scale_weight")}
    bad = tmp_path / "scaled_without_scales.safetensors"
    save_file(state, str(bad))
    with pytest.raises(CheckpointError) as err:
        load_dit(bad, FORMATS / _of("adapter")[0]["file"], config=_dit_config(fx))
    assert "no scale" in _one_sentence(err.value, bad)


@pytest.mark.parametrize("wanted", ["dit", "adapter", "t5", "vae", "clip", "wav2vec2"])
def test_file_of_the_wrong_component(wanted):
    from infinitetalk.weights.formats import DESCRIPTIONS, open_component

    others = [fx for fx in FIXTURES if fx["model"] != wanted]
    if not others:
        pytest.skip("no fixtures")
    for fx in others[:: max(1, len(others) // 3)]:
        path = FORMATS / fx["file"]
        with pytest.raises(CheckpointError) as err:
            open_component(path, wanted)
        text = _one_sentence(err.value, path)
        assert DESCRIPTIONS[wanted] in text or "GGUF" in text


# ---- 5. the loaders read the fixtures -------------------------------------------------------------
def test_component_loaders_read_every_fixture():
    from infinitetalk.models.image import CLIPVisionConfig
    from infinitetalk.models.text import UMT5Config
    from infinitetalk.weights.audio_loader import load_audio_encoder
    from infinitetalk.weights.clip_loader import load_clip_vision
    from infinitetalk.weights.t5_loader import load_umt5_encoder
    from infinitetalk.weights.vae_loader import load_vae

    _need_fixtures()
    for fx in _of("t5"):
        cfg = json.loads((_source_path(fx).parent / "config.json").read_text())
        config = UMT5Config(**{k: v for k, v in cfg.items() if k in UMT5Config.__dataclass_fields__})
        model = load_umt5_encoder(FORMATS / fx["file"], config, dtype=torch.float32)
        expected = _expected(fx)
        assert all(torch.equal(t, expected[k]) for k, t in model.state_dict().items()), fx["file"]
    for fx in _of("clip"):
        spec = json.loads((FORMATS / "clip" / "keys.json").read_text())
        config = CLIPVisionConfig(image_size=spec["image_size"], patch_size=spec["patch_size"], dim=spec["width"],
                                  mlp_ratio=spec["mlp_ratio"], num_heads=spec["heads"], num_layers=spec["layers"],
                                  num_used_layers=spec["layers"] - 1)
        model = load_clip_vision(FORMATS / fx["file"], config)
        expected = _expected(fx)
        assert all(torch.equal(t, expected["visual." + k]) for k, t in model.state_dict().items()), fx["file"]
    for fx in _of("vae"):
        model = load_vae(FORMATS / fx["file"])
        expected = _expected(fx)
        assert set(model.state_dict()) == set(expected)
        assert all(torch.equal(t, expected[k]) for k, t in model.state_dict().items()), fx["file"]
    for fx in _of("wav2vec2"):
        model = load_audio_encoder(FORMATS / fx["file"], config_dir=_source_path(fx).parent)
        expected = _expected(fx)
        conv = "wav2vec2.encoder.pos_conv_embed.conv."
        state = model.state_dict()
        assert torch.equal(state[conv + "parametrizations.weight.original0"], expected[conv + "weight_g"])
        assert torch.equal(state["wav2vec2.feature_projection.projection.weight"],
                           expected["wav2vec2.feature_projection.projection.weight"])


# ---- 6. finding the files of a ComfyUI folder ------------------------------------------------------
COMFY_SUBDIR = {"dit": "diffusion_models", "adapter": "model_patches", "t5": "text_encoders",
                "wav2vec2": "audio_encoders", "vae": "vae", "clip": "clip_vision"}


def _comfy_folder(tmp_path, skip=()) -> Path:
    models = tmp_path / "ComfyUI" / "models"
    for fx in FIXTURES:
        if fx["model"] in skip:
            continue
        folder = models / COMFY_SUBDIR[fx["model"]]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / Path(fx["file"]).name).symlink_to(FORMATS / fx["file"])
    (models / "loras").mkdir(parents=True, exist_ok=True)
    return tmp_path / "ComfyUI"


def test_locate_comfyui_folder(tmp_path):
    from infinitetalk.weights.formats import inspect_file
    from infinitetalk.weights.locate import describe, locate_components

    _need_fixtures()
    root = _comfy_folder(tmp_path, skip=("wav2vec2",))
    files = locate_components(root)
    for comp in ("dit", "adapter", "t5", "vae", "clip"):
        assert inspect_file(files.path(comp)).detected.provides(comp), comp
        assert files.origin[comp] == "comfyui"
    assert files.missing() == ["wav2vec2"]
    several = [c for c in COMFY_SUBDIR if len(_of(c)) > 1 and c != "wav2vec2"]
    assert all(any(n.startswith(f"{c}:") and "chose" in n for n in files.notes) for c in several)
    lines = "\n".join(describe(files))
    assert "wav2vec2 MISSING" in lines and lines.count("hf download") == 1 and "audio_encoders" in lines
    with pytest.raises(InfiniteTalkError) as err:
        files.require()
    assert "--audio-encoder" in str(err.value)


def test_overrides_are_checked_by_content(tmp_path):
    from infinitetalk.weights.locate import locate_components

    _need_fixtures()
    root = _comfy_folder(tmp_path)
    vae, dit = _of("vae")[0], _of("dit")[-1]
    files = locate_components(root, overrides={"dit": FORMATS / dit["file"]})
    assert files.dit == FORMATS / dit["file"] and files.origin["dit"] == "override" and not files.missing()
    with pytest.raises(InputError) as err:
        locate_components(root, overrides={"dit": FORMATS / vae["file"]})
    assert "--dit" in str(err.value) and "Wan VAE" in str(err.value)


def test_cli_info_lists_components(tmp_path, capsys):
    from infinitetalk.cli import main

    _need_fixtures()
    root = _comfy_folder(tmp_path, skip=("clip",))
    assert main(["info", "--weights", str(root)]) == 0
    out = capsys.readouterr().out
    assert "clip     MISSING" in out and "clip_vision_h.safetensors" in out
    assert "dit      " + str(root / "models" / "diffusion_models") in out
    # the download command for the missing part only: no official-layout lines for a ComfyUI folder
    assert out.count("hf download") == 1 and "infinitetalk download" not in out and "weights single" not in out


def test_cli_info_complete_folders_name_no_download(tmp_path, capsys):
    """Every component found (a ComfyUI folder, or the official layout): no download command at all."""
    from infinitetalk.cli import main
    from infinitetalk.weights.hub import WeightsLayout

    _need_fixtures()
    comfy = _comfy_folder(tmp_path / "c")
    official = WeightsLayout(tmp_path / "o")
    for path in (official.dit_dir / "config.json", official.dit_dir / "diffusion_pytorch_model.safetensors",
                 official.adapter, official.t5, official.vae, official.clip, official.wav2vec / "config.json",
                 official.wav2vec / "model.safetensors"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")  # `info` looks at which files exist, not into them
    for root in (comfy, official.root):
        assert main(["info", "--weights", str(root)]) == 0
        out = capsys.readouterr().out
        assert f"components for {root} (complete)" in out, out
        assert "download" not in out and "MISSING" not in out and "missing" not in out, out


def test_own_quantisers_write_what_gguf_py_reads():
    import numpy as np

    from infinitetalk.quant.gguf_dequant import dequantize
    from infinitetalk.quant.gguf_quantize import QUANTIZERS

    w = torch.randn(48, 512, generator=torch.Generator().manual_seed(0))
    for name, bound in (("Q8_0", 0.01), ("Q4_K", 0.12)):
        raw = QUANTIZERS[name](w)
        ref = gguf.quants.dequantize(raw.numpy().reshape(48, -1), getattr(gguf.GGMLQuantizationType, name))
        got = dequantize(raw, name, w.shape)
        assert torch.equal(got, torch.from_numpy(np.array(ref)))
        assert ((got - w).norm() / w.norm()).item() < bound
    gguf_q8 = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(gguf_q8.reshape(-1), QUANTIZERS["Q8_0"](w).numpy())
