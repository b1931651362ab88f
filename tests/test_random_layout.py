"""benchmarks/random_layout.py: the official weights layout with random weights.

The tiny scale is written into tmp_path and then used through the official-layout code paths
(`infinitetalk info --weights DIR`, `infinitetalk generate --weights DIR --vram 10 --preset fast`);
the real scale is only planned (shapes on the meta device, nothing allocated).
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def random_layout():
    spec = importlib.util.spec_from_file_location("random_layout", REPO / "benchmarks" / "random_layout.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_tiny_layout_runs_generate(tmp_path, media_dir, random_layout, capsys):
    import av

    from infinitetalk.cli import main
    from infinitetalk.weights.hub import WeightsLayout

    weights = tmp_path / "weights"
    assert random_layout.main(["--out", str(weights), "--scale", "tiny", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "diffusion_pytorch_model-00007-of-00007.safetensors" in printed and "total" in printed
    assert WeightsLayout(weights).missing_files() == []
    index = json.loads((weights / "Wan2.1-I2V-14B-480P" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 7

    assert main(["info", "--weights", str(weights)]) == 0
    info = capsys.readouterr().out
    assert "(complete)" in info and "MISSING" not in info
    for component in ("dit", "adapter", "t5", "wav2vec2", "vae", "clip", "tokenizer"):
        assert f"  {component} " in info

    out = tmp_path / "out.mp4"
    # (10 GB: on the CPU the VAE runs in float32, and a budget plans the 14B VAE's activations, 9.2 GB at 480p)
    argv = ["generate", "--weights", str(weights), "--vram", "10", "--device", "cpu",
            "--image", str(media_dir / "portrait.png"), "--audio", str(media_dir / "speaker1.wav"),
            "--preset", "fast", "--output", str(out), "--mode", "clip", "--frame-num", "5", "--motion-frame", "1",
            "--steps", "1", "--max-seconds", "0.2"]
    assert main(argv) == 0
    with av.open(str(out)) as container:
        frames = sum(1 for _ in container.decode(video=0))
    assert frames == 5

    # never overwrites: a non-empty folder is refused with exit code 2 and one sentence
    assert random_layout.main(["--out", str(weights), "--scale", "tiny", "--device", "cpu"]) == 2
    assert "not empty" in capsys.readouterr().err


def test_real_scale_plan_has_the_official_sizes(random_layout):
    scale = random_layout.scale_configs("real")
    files = random_layout.plan_files(scale, ["single", "multi"], loras=True)
    by_name = {Path(f.path).name: f for f in files}
    shards = [f for f in files if "diffusion_pytorch_model-" in f.path]
    assert [Path(f.path).name for f in shards] == [f"diffusion_pytorch_model-{i:05d}-of-00007.safetensors" for i in range(1, 8)]
    dit = sum(f.params for f in shards)
    adapter = by_name["infinitetalk.safetensors"].params
    assert dit + adapter == 18_882_046_784  # tests/test_dit_params.py: the official count
    assert all(4.5e9 < f.nbytes < 4.8e9 for f in shards)  # bf16, about equal
    assert 5.6e9 < by_name["models_t5_umt5-xxl-enc-bf16.pth"].params < 5.8e9
    assert by_name["Wan2.1_VAE.pth"].nbytes == pytest.approx(0.508e9, rel=0.01)
    assert sum(f.nbytes for f in files) < 60e9  # fits the 64 GB disk of the GPU machine
    assert scale.dit_json["dim"] == 5120 and scale.dit_json["_class_name"] == "WanModel"
