"""The resume key covers the whole job description: every JobSpec / RuntimeOptions field that
changes the video changes the key, the cosmetic ones (output path, weights folder, resume flag,
where the input files lie) do not. Model files (located components, LoRAs) enter by name and
size, so another DiT file changes the key and a moved weights folder does not.

The fields are read from the dataclasses, so a new field without a decision below fails the test.
Keys come from `JobService.check` (inputs decoded, nothing loaded).
"""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from infinitetalk.generation.job_state import settings_hash
from infinitetalk.service import JobService, JobSpec, RuntimeOptions, resume_key
from infinitetalk.weights.hub import VARIANTS, WeightsLayout

from test_e2e_tiny import cut_wav

# field -> (changes the video?, the changed value(s), base job: "one" | "two" speakers | "14b")
SPEC_FIELDS = {
    "output": (False, {"output": "elsewhere/other.mp4"}, "one"),
    "audio": (True, {"audio": "@audio_b"}, "one"),
    "image": (True, {"image": "@image_b"}, "one"),
    "video": (True, {"image": None, "video": "@video"}, "one"),
    "audio2": (True, {"audio2": "@audio_b"}, "one"),
    "audio_type": (True, {"audio_type": "add"}, "two"),
    "bbox1": (True, {"bbox1": (0, 0, 400, 600)}, "two"),
    "bbox2": (True, {"bbox2": (300, 0, 1024, 700)}, "two"),
    "prompt": (True, {"prompt": "Another person talks."}, "one"),
    "negative_prompt": (True, {"negative_prompt": "blurry"}, "one"),
    "input_json": (True, {"input_json": "@json"}, "one"),
    "preset": (True, {"preset": "teacache"}, "one"),
    "size": (True, {"size": 720}, "one"),
    "mode": (True, {"mode": "clip"}, "one"),
    "steps": (True, {"steps": 3}, "one"),
    "seed": (True, {"seed": 8}, "one"),
    "shift": (True, {"shift": 3.0}, "one"),
    "text_guide_scale": (True, {"text_guide_scale": 1.0}, "one"),
    "audio_guide_scale": (True, {"audio_guide_scale": 2.0}, "one"),
    "color_correction": (True, {"color_correction": 0.5}, "one"),
    "frame_num": (True, {"frame_num": 41}, "one"),
    "motion_frame": (True, {"motion_frame": 5}, "one"),
    "teacache": (True, {"teacache": True}, "one"),
    "teacache_thresh": (True, {"teacache": True, "teacache_thresh": 0.3}, "one"),
    "use_apg": (True, {"use_apg": True}, "one"),
    "apg_momentum": (True, {"use_apg": True, "apg_momentum": -0.5}, "one"),
    "apg_norm_threshold": (True, {"use_apg": True, "apg_norm_threshold": 20.0}, "one"),
    "max_seconds": (True, {"max_seconds": 0.5}, "one"),
    "resume": (False, {"resume": True}, "one"),
    "restart": (False, {"restart": True}, "one"),
    # the sound track is muxed from the inputs at the end: a resumed job may choose either
    "official_sound": (False, {"official_sound": True}, "one"),
    # speech from text: the synthesised tracks enter the key by their checksums like any audio
    # file ("audio" above); test_tts.py checks that the same text gives the same tracks
    "text": (True, None, "one"),
    "text_file": (True, None, "one"),
    "voice": (True, None, "one"),
    "voice2": (True, None, "one"),
    "lang": (True, None, "one"),
    "speed": (True, None, "one"),
    "save_audio": (False, None, "one"),
}
RUNTIME_FIELDS = {
    "model": (True, {"model": "infinitetalk-14b", "weights": "@weights"}, "one"),
    "weights": (False, {"weights": "/somewhere/else/weights"}, "one"),
    "variant": (True, {"variant": "multi"}, "one"),
    "device": (True, None, "one"),  # only "cpu" exists here: checked through ModelSettings below
    "dtype": (True, {"dtype": "bfloat16"}, "one"),
    "fast": (True, {"fast": True}, "one"),
    "fp8": (True, {"fp8": True}, "one"),
    "fp8_attention": (True, {"fp8_attention": True}, "one"),
    "loras": (True, {"loras": (("@lora", 0.5),)}, "14b"),
    "files": (True, {"files": (("vae", "@vae_file"),)}, "14b"),  # a single-file component of another format
    "vram": (False, {"vram": 8.0}, "one"),  # streaming and placement give the same numbers
}


def test_every_field_has_a_decision():
    spec_fields = {f.name for f in dataclasses.fields(JobSpec)} - {"runtime"}
    runtime_fields = {f.name for f in dataclasses.fields(RuntimeOptions)}
    assert spec_fields == set(SPEC_FIELDS), f"decide for: {sorted(spec_fields ^ set(SPEC_FIELDS))}"
    assert runtime_fields == set(RUNTIME_FIELDS), f"decide for: {sorted(runtime_fields ^ set(RUNTIME_FIELDS))}"


@pytest.fixture(scope="module")
def files(media_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("key")
    image_b = folder / "portrait_b.png"
    pixels = np.array(Image.open(media_dir / "portrait.png").convert("RGB"))
    pixels[0, 0] = 255 - pixels[0, 0]  # one pixel differs
    Image.fromarray(pixels).save(image_b)
    prompt = "A person talks."
    (folder / "job.json").write_text(json.dumps({"prompt": "Someone else talks.", "cond_video": "portrait.png",
                                                 "cond_audio": {"person1": "a.wav"}}))
    shutil.copy(media_dir / "portrait.png", folder / "portrait.png")
    (folder / "lora.safetensors").write_bytes(b"its name, size and scale enter the key")
    audio = cut_wav(media_dir, folder, 1.0, "a.wav")
    weights = folder / "weights"  # the official layout with placeholder files: `check` only looks for them
    for variant in VARIANTS:
        layout = WeightsLayout(weights, variant)
        (layout.dit_dir / "diffusion_pytorch_model.safetensors").parent.mkdir(parents=True, exist_ok=True)
        (layout.dit_dir / "diffusion_pytorch_model.safetensors").write_bytes(b"placeholder")
        for path in layout.required_files():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"placeholder")
    manifest = json.loads((media_dir.parent / "formats" / "manifest.json").read_text())
    vae_file = next(media_dir.parent / "formats" / fx["file"] for fx in manifest["fixtures"] if fx["model"] == "vae")
    return {
        "weights": weights, "@weights": weights, "@vae_file": vae_file,
        "folder": folder, "image": media_dir / "portrait.png", "two": media_dir / "two_people.png", "audio": audio,
        "prompt": prompt, "@audio_b": cut_wav(media_dir, folder, 0.8, "b.wav"), "@image_b": image_b,
        "@video": media_dir / "talking_458px_25fps.mp4", "@json": folder / "job.json",
        "@lora": folder / "lora.safetensors",
    }


def _base(files, kind: str) -> JobSpec:
    rt = RuntimeOptions(model="infinitetalk-14b" if kind == "14b" else "tiny", device="cpu",
                        weights=str(files["weights"]) if kind == "14b" else None)
    spec = JobSpec(output=str(files["folder"] / "out.mp4"), image=str(files["image"]), audio=str(files["audio"]),
                   prompt=files["prompt"], runtime=rt)
    if kind == "two":
        spec = spec.with_(image=str(files["two"]), audio2=str(files["@audio_b"]), audio_type="para",
                          bbox1=(0, 0, 500, 700), bbox2=(500, 0, 1000, 700))
    return spec


def _value(files, value):
    if isinstance(value, str) and value.startswith("@"):
        return str(files[value])
    if isinstance(value, tuple) and value and isinstance(value[0], tuple):
        return tuple((_value(files, a), _value(files, b)) for a, b in value)
    return value


def _key(spec: JobSpec) -> str:
    return settings_hash(JobService().check(spec).key)


@pytest.mark.parametrize("name", sorted(SPEC_FIELDS))
def test_job_field(name, files):
    changes_video, change, kind = SPEC_FIELDS[name]
    if change is None:
        pytest.skip(f"{name}: decided through the audio it produces (see SPEC_FIELDS)")
    base = _base(files, kind)
    changed = base.with_(**{k: _value(files, v) for k, v in change.items()})
    if name == "input_json":  # the JSON brings the image, audio and a prompt of its own
        changed = changed.with_(image=None, audio=None, prompt=None)
    assert (_key(changed) != _key(base)) == changes_video, f"{name}: {change}"


@pytest.mark.parametrize("name", sorted(RUNTIME_FIELDS))
def test_runtime_field(name, files):
    changes_video, change, kind = RUNTIME_FIELDS[name]
    base = _base(files, kind)
    if change is None:  # device: the key of the same job on another device
        prepared = JobService().check(base)
        moved = dataclasses.replace(prepared.model, device="cuda:0")
        assert (settings_hash(resume_key(prepared.inputs, prepared.config, moved)) != _key(base)) == changes_video
        return
    changed = base.with_(runtime=base.runtime.with_(**{k: _value(files, v) for k, v in change.items()}))
    assert (_key(changed) != _key(base)) == changes_video, f"runtime.{name}: {change}"


def test_input_files_enter_by_content_not_by_path(files):
    base = _base(files, "one")
    copy = files["folder"] / "same_speech.wav"
    shutil.copy(files["audio"], copy)
    assert _key(base.with_(audio=str(copy))) == _key(base)
    assert _key(base.with_(image=str(files["folder"] / "portrait.png"))) == _key(base)


def _spec_with_weights(files, weights) -> JobSpec:
    base = _base(files, "14b")
    return base.with_(runtime=base.runtime.with_(weights=str(weights)))


def test_model_files_enter_by_name_and_size_not_by_folder(files, tmp_path):
    base = _base(files, "14b")
    moved = tmp_path / "moved" / "weights"
    shutil.copytree(files["weights"], moved)
    assert _key(_spec_with_weights(files, moved)) == _key(base)  # the same files elsewhere: same key

    other = tmp_path / "other" / "weights"
    shutil.copytree(files["weights"], other)
    dit = WeightsLayout(other, "single").dit_dir / "diffusion_pytorch_model.safetensors"
    dit.write_bytes(b"another DiT of another size")
    assert _key(_spec_with_weights(files, other)) != _key(base)


def test_lora_enters_by_name_and_size(files, tmp_path):
    lora = tmp_path / files["@lora"].name  # the same name, other content and size
    lora.write_bytes(b"another LoRA, the same file name")
    base = _base(files, "14b")
    with_lora = base.with_(runtime=base.runtime.with_(loras=((str(files["@lora"]), 0.5),)))
    other_lora = base.with_(runtime=base.runtime.with_(loras=((str(lora), 0.5),)))
    assert _key(other_lora) != _key(with_lora)
    moved = tmp_path / "moved" / files["@lora"].name
    moved.parent.mkdir()
    shutil.copy(files["@lora"], moved)
    assert _key(base.with_(runtime=base.runtime.with_(loras=((str(moved), 0.5),)))) == _key(with_lora)
