"""The whole generation loop against the official `generate_infinitetalk` (../shared/parity/pipeline).

Every case file in `pipeline/cases/` (found by reading the folder) runs through the public API:
`InfiniteTalk.from_components` over the tiny official-layout models (the DiT of ../dit, the narrow
VAE of pipeline/vae and the CLIP tower of ../clip, weights made with ../genweights.py), the
case's precomputed prompt contexts (`PromptEmbeddings`) and audio features, the official bbox
dict and the case's size-bucket tables; `stream(float_video=True)` gives the float video. The
check is the fixture README's: max|ours - official| <= 1e-3 x max|official| and relative L2 <=
1e-4 on `video`; on failure the message names the first recorded intermediate (`dbg_*`) that
diverges, in the order the loop computes them.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from infinitetalk.config import GenerationConfig
from infinitetalk.generation.embeddings import PromptEmbeddings
from infinitetalk.generation.pipeline import InfiniteTalk
from infinitetalk.models.image import CLIPVisionConfig, CLIPVisionEncoder
from infinitetalk.progress import WindowStarted
from infinitetalk.weights.dit_loader import load_dit
from infinitetalk.weights.vae_loader import load_vae

MAX_REL = 1e-3
L2_REL = 1e-4
SIZES = {"infinitetalk-480": 480, "infinitetalk-720": 720}
TABLES = {480: "ASPECT_RATIO_627", 720: "ASPECT_RATIO_960"}


def _case_names(parity_dir: Path) -> list[str]:
    folder = parity_dir / "pipeline" / "cases"
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def pytest_generate_tests(metafunc):
    if "case_name" in metafunc.fixturenames:
        from conftest import SHARED

        names = _case_names(SHARED / "parity")
        metafunc.parametrize("case_name", names or ["<no cases: ../shared absent>"])


def _genweights(parity_dir: Path):
    sys.path.insert(0, str(parity_dir))
    try:
        from genweights import generate, load_keys
    finally:
        sys.path.remove(str(parity_dir))
    return generate, load_keys


class _Recorder:
    """Intermediates of our loop under the fixture's dbg_* names (window from the events)."""

    def __init__(self, frame_num: int):
        self.frame_num = frame_num
        self.window = 0
        self.values: dict[str, torch.Tensor] = {}
        self._steps: dict[int, list[torch.Tensor]] = {}

    def on_event(self, event) -> None:
        if isinstance(event, WindowStarted):
            self.window = event.index

    def put(self, name: str, value: torch.Tensor) -> None:
        self.values[f"{name}_w{self.window}"] = value.detach().float().cpu().clone()

    def clip_call(self, image: torch.Tensor, out: torch.Tensor) -> None:
        self.put("dbg_cond_image", image)
        self.put("dbg_clip_head", out[:, :4])

    def dit_input(self, x: torch.Tensor) -> None:
        steps = self._steps.setdefault(self.window, [])
        x = x[0].detach().float().cpu()
        if not steps or not torch.equal(steps[-1], x):
            steps.append(x.clone())
            self.values[f"dbg_latent_w{self.window}_s{len(steps) - 1}"] = steps[-1]


class _RecordingVAE(torch.nn.Module):
    """The VAE, recording the encodes (y: a frame_num-frame input; motion: the others) and decodes."""

    def __init__(self, vae: torch.nn.Module, recorder: _Recorder):
        super().__init__()
        self.inner = vae
        self.recorder = recorder

    def encode(self, video, **kwargs):
        out = self.inner.encode(video, **kwargs)
        self.recorder.put("dbg_ylat" if video.shape[2] == self.recorder.frame_num else "dbg_motion", out[0])
        return out

    def decode(self, latent, **kwargs):
        self.recorder.put("dbg_x0", latent[0])
        return self.inner.decode(latent, **kwargs)


@pytest.fixture(scope="module")
def models(parity_dir: Path, tmp_path_factory):
    pipe_dir = parity_dir / "pipeline"
    if not (pipe_dir / "cases").is_dir():
        pytest.skip(f"{pipe_dir / 'cases'} is absent")
    generate, load_keys = _genweights(parity_dir)
    cpu0 = time.process_time()
    dit = load_dit(parity_dir / "dit" / "checkpoint", parity_dir / "dit" / "infinitetalk.safetensors",
                   device="cpu", dtype=torch.float32).eval()
    vae_info = json.loads((pipe_dir / "vae" / "vae.json").read_text())
    vae_path = tmp_path_factory.mktemp("loop_vae") / "vae_tiny.pth"
    torch.save(generate(load_keys(pipe_dir / "vae" / "keys.json"), vae_info["seed"]), vae_path)
    vae = load_vae(vae_path, device="cpu", dtype=torch.float32).eval()  # width and blocks from the shapes
    clip_case = json.loads((parity_dir / "clip" / "case.json").read_text())
    keys = load_keys(parity_dir / "clip" / "keys.json")
    heads = re.search(r"\bheads=(\d+)", clip_case.get("model", ""))
    cfg = CLIPVisionConfig.from_shapes(dict(keys), num_heads=int(heads.group(1)) if heads else None)
    with torch.device("meta"):
        clip = CLIPVisionEncoder(cfg)
    wanted = set(clip.state_dict())
    state = {k[len("visual."):]: v for k, v in generate(keys, clip_case["seed"]).items()
             if k.startswith("visual.") and k[len("visual."):] in wanted}
    clip.load_state_dict(state, strict=True, assign=True)
    del state
    clip = clip.eval().requires_grad_(False)
    print(f"\n[time] loop-parity models built in {time.process_time() - cpu0:.1f} s CPU")
    return dit, vae, clip


def _config(case: dict) -> GenerationConfig:
    kw, extra = case["kwargs"], case["extra_args"]
    frame_num, max_frames = int(kw["frame_num"]), int(kw["max_frames_num"])
    clip_mode = max_frames <= frame_num
    return GenerationConfig(
        size=SIZES[kw["size_buckget"]], mode="clip" if clip_mode else "streaming", frame_num=frame_num,
        motion_frame=int(kw["motion_frame"]), sample_steps=int(kw["sampling_steps"]), shift=float(kw["shift"]),
        text_guide_scale=float(kw["text_guide_scale"]), audio_guide_scale=float(kw["audio_guide_scale"]),
        seed=int(kw["seed"]), color_correction_strength=float(kw["color_correction_strength"]),
        max_frames=None if clip_mode else max_frames, use_apg=bool(extra["use_apg"]),
        apg_momentum=float(extra["apg_momentum"]), apg_norm_threshold=float(extra["apg_norm_threshold"]),
        negative_prompt=case["n_prompt_used"],
    )


def _distance(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    scale = want.abs().max().item() or 1.0
    diff = (got - want).abs().max().item() / scale
    l2 = ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()
    return diff, l2


def _first_divergence(recorded: dict, expected: dict) -> str:
    def order(name: str):
        m = re.match(r"dbg_(\w+?)_w(\d+)(?:_s(\d+))?$", name)
        stage = ["cond_image", "clip_head", "y", "motion", "latent", "x0"]
        kind = m.group(1) if m else name
        return (int(m.group(2)) if m else 99, stage.index(kind) if kind in stage else 9, int(m.group(3) or 0) if m else 0)

    for name in sorted((k for k in expected if k.startswith("dbg_") and not k.startswith(("dbg_noise", "dbg_pred"))),
                       key=order):
        want = expected[name]
        if name.startswith("dbg_y_w"):
            window = int(name.rsplit("w", 1)[1])
            cands = [recorded[f"dbg_ylat_w{w}"] for w in range(window, -1, -1) if f"dbg_ylat_w{w}" in recorded]
            got, want = (cands[0] if cands else None), want[4:]
        else:
            got = recorded.get(name)
        if got is None:
            continue
        got = got.reshape(want.shape) if got.numel() == want.numel() else got
        if got.shape != want.shape:
            return f"{name}: shape {tuple(got.shape)} != official {tuple(want.shape)}"
        diff, l2 = _distance(got, want)
        if diff > MAX_REL:
            return f"{name} (max rel {diff:.2e}, rel L2 {l2:.2e})"
    return "no recorded intermediate diverges (the difference starts after the last one)"


@pytest.mark.slow
def test_loop_matches_official(case_name: str, models, parity_dir: Path):
    pipe_dir = parity_dir / "pipeline"
    case = json.loads((pipe_dir / "cases" / f"{case_name}.json").read_text())
    expected = load_file(str(pipe_dir / "cases" / f"{case_name}.safetensors"))
    dit, vae, clip = models
    cfg = _config(case)
    recorder = _Recorder(cfg.frame_num)
    tables = case["aspect_ratio_tables"]
    pipe = InfiniteTalk.from_components(
        dit=dit, vae=_RecordingVAE(vae, recorder), clip=clip, device="cpu", dtype=torch.float32,
        text_encoder=PromptEmbeddings({case["input_data"]["prompt"]: expected["context"],
                                       case["n_prompt_used"]: expected["context_null"]}),
        size_buckets={size: tables[name] for size, name in TABLES.items() if name in tables},
    )
    audio = load_file(str(pipe_dir / case["audio"]["file"]))
    frames = int(case["audio"]["F"])
    features = [audio[name][:frames].float() for name in case["audio"]["tensors"][: case["speakers"]]]
    cond = pipe_dir / case["input_data"]["cond_video"]
    source = {"video": cond} if case["kind"] == "v2v" else {"image": cond}
    extra = {"bbox": case["input_data"]["bbox"]} if "bbox" in case["input_data"] else {}

    hooks = [
        dit.register_forward_pre_hook(lambda m, args, kw: recorder.dit_input(args[0] if args else kw["x"]), with_kwargs=True),
        clip.register_forward_hook(lambda m, args, out: recorder.clip_call(args[0], out)),
    ]
    t0 = time.perf_counter()
    try:
        chunks = list(pipe.stream(config=cfg, features=features, prompt=case["input_data"]["prompt"],
                                  progress=recorder.on_event, float_video=True, **source, **extra))
    finally:
        for h in hooks:
            h.remove()
    video = torch.cat([c.video for c in chunks], dim=1)
    want = expected["video"]
    assert len(chunks) == len(case["run"]["windows"]), f"{len(chunks)} windows, official {len(case['run']['windows'])}"
    assert tuple(video.shape) == tuple(want.shape), f"video {tuple(video.shape)} != official {tuple(want.shape)}"
    diff, l2 = _distance(video, want)
    print(f"\n[parity] loop {case_name}: video max|d|/max {diff:.2e}, rel L2 {l2:.2e} "
          f"({len(chunks)} windows, {time.perf_counter() - t0:.1f} s)")
    if not (diff <= MAX_REL and l2 <= L2_REL):
        pytest.fail(f"{case_name}: video max rel {diff:.2e} (bound {MAX_REL}), rel L2 {l2:.2e} (bound {L2_REL}); "
                    f"first divergence: {_first_divergence(recorder.values, expected)}")
