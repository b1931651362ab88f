"""Locating the official weights folder and the download error path (no network here)."""
import json

import pytest

from infinitetalk.errors import HubError, MissingWeightsError
from infinitetalk.weights.hub import WeightsLayout, download_plan, download_weights, locate_weights


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_missing_weights_lists_files_and_command(tmp_path):
    with pytest.raises(MissingWeightsError) as info:
        locate_weights(tmp_path, "single")
    msg = str(info.value)
    assert "infinitetalk download --variant single --dir" in msg
    assert "Wan2.1_VAE.pth" in msg and "infinitetalk.safetensors" in msg
    assert info.value.missing


def test_complete_layout_is_found(tmp_path):
    layout = WeightsLayout(tmp_path, "multi")
    dit = layout.dit_dir
    dit.mkdir(parents=True)
    shards = [f"diffusion_pytorch_model-0000{i}-of-00007.safetensors" for i in range(1, 8)]
    (dit / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {f"k{i}": s for i, s in enumerate(shards)}})
    )
    for f in [dit / s for s in shards] + [dit / "config.json", layout.adapter, layout.vae, layout.t5, layout.clip,
                                          layout.t5_tokenizer / "tokenizer_config.json",
                                          layout.wav2vec / "config.json", layout.wav2vec / "preprocessor_config.json",
                                          layout.wav2vec / "model.safetensors"]:
        _touch(f)
    assert locate_weights(tmp_path, "multi").adapter.name == "infinitetalk.safetensors"
    (dit / shards[3]).unlink()
    with pytest.raises(MissingWeightsError, match="00004-of-00007"):
        locate_weights(tmp_path, "multi")


def test_download_plan_only_needed_files():
    repos = {item.repo: item for item in download_plan("multi")}
    assert repos["MeiGen-AI/InfiniteTalk"].patterns == ("multi/infinitetalk.safetensors",)


def test_unreachable_hub_gives_sentence(tmp_path):
    with pytest.raises(HubError, match="Could not download"):
        download_weights(tmp_path, "single", endpoint="http://127.0.0.1:9")


def test_from_pretrained_hub_id_downloads_local_path_is_used_as_is(tmp_path):
    """The official hub id fetches into the default folder (here: a clean HubError, the hub is
    unreachable); a local folder of the same name is read as it is, without any download."""
    import os
    import subprocess
    import sys

    script = (
        "import os\n"
        "from infinitetalk import InfiniteTalk, HubError, MissingWeightsError\n"
        "try:\n"
        "    InfiniteTalk.from_pretrained('MeiGen-AI/InfiniteTalk', device='cpu')\n"
        "except HubError as err:\n"
        "    print('HUB', err)\n"
        "os.makedirs('MeiGen-AI/InfiniteTalk')\n"
        "try:\n"
        "    InfiniteTalk.from_pretrained('MeiGen-AI/InfiniteTalk', device='cpu')\n"
        "except MissingWeightsError as err:\n"
        "    print('LOCAL', err)\n"
    )
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="0", HF_HUB_ETAG_TIMEOUT="2",
               HF_HUB_DOWNLOAD_TIMEOUT="2", INFINITETALK_WEIGHTS=str(tmp_path / "default"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    hub = [ln for ln in proc.stdout.splitlines() if ln.startswith("HUB ")]
    assert hub and "Could not download" in hub[0], proc.stdout
    assert (tmp_path / "default").is_dir()  # the download went to the default weights folder
    local = proc.stdout[proc.stdout.index("LOCAL "):]
    assert "Model weights not found in MeiGen-AI/InfiniteTalk" in local, proc.stdout
    assert proc.stderr.count("fetching the missing") == 1, proc.stderr  # the local path downloaded nothing
