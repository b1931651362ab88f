"""The `infinitetalk` command: generate, download, info.

Every InfiniteTalkError (bad input, missing weights, ...) is printed as its sentence, without a
traceback, with exit code 2. Inputs are checked before any model is loaded, and a failed job
never leaves a file at the output path.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Optional, TextIO

from .errors import DeviceOutOfMemoryError, InfiniteTalkError, InputError

GENERATE_EXAMPLES = """\
examples:
  # a talking portrait (official weights, downloaded once with `infinitetalk download`)
  infinitetalk generate --image face.png --audio speech.wav --output talk.mp4 \\
      --prompt "A woman is talking to the camera in a bright studio."

  # dub a video (the reference frame of each window comes from the video at that time)
  infinitetalk generate --video clip.mp4 --audio new_speech.mp3 --output dubbed.mp4

  # two speakers, one after the other, with boxes (x_min,y_min,x_max,y_max; x horizontal)
  infinitetalk generate --image two.png --audio left.wav --audio2 right.wav --audio-type add \\
      --bbox1 0,0,640,720 --bbox2 640,0,1280,720 --variant multi --output duo.mp4

  # the official input JSON (prompt, cond_video, cond_audio, audio_type, bbox)
  infinitetalk generate --input-json examples/single_example_image.json --output out.mp4

  # try everything in seconds without weights: small RANDOM models (output is noise)
  infinitetalk generate --model tiny --image face.png --audio speech.wav --output test.mp4

  # continue a job that was interrupted (same command plus --resume)
  infinitetalk generate --image face.png --audio speech.wav --output talk.mp4 --resume

The tiny model uses the official aspect-ratio buckets scaled to a longest side of 128 px; a
10-second portrait video takes well under a minute on a 2-core CPU with the default 40 steps.
"""

MAIN_EXAMPLES = """\
examples:
  infinitetalk download                 # fetch the official weights (single speaker)
  infinitetalk info                     # versions, device, where the weights are
  infinitetalk generate --image face.png --audio speech.wav --output talk.mp4
  infinitetalk generate --help          # every generation option, with more examples
"""

DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "float32": "float32", "fp32": "float32"}


def _add_generate(sub) -> None:
    from .config import PRESETS

    p = sub.add_parser(
        "generate",
        help="make a talking video from an image or video and speech",
        description="Make a talking video of any length from a portrait (or a video to dub) and speech.",
        epilog=GENERATE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("inputs")
    cond = src.add_mutually_exclusive_group()
    cond.add_argument("--image", metavar="PATH", help="portrait image (image-to-video)")
    cond.add_argument("--video", metavar="PATH", help="video to dub (video-to-video)")
    src.add_argument("--audio", metavar="PATH", help="speech of speaker 1 (any audio file, or a video with sound)")
    src.add_argument("--audio2", metavar="PATH", help="speech of speaker 2 (two-speaker video)")
    src.add_argument("--audio-type", choices=("para", "add"), default=None,
                     help="two speakers: 'para' talk at the same time, 'add' one after the other (default para)")
    src.add_argument("--bbox1", metavar="X0,Y0,X1,Y1", help="pixel box of speaker 1 in the image (x horizontal)")
    src.add_argument("--bbox2", metavar="X0,Y0,X1,Y1", help="pixel box of speaker 2")
    src.add_argument("--input-json", metavar="PATH",
                     help="official input JSON (prompt, cond_video, cond_audio, audio_type, bbox); flags override it")
    src.add_argument("--prompt", default=None, help="what the video shows (changes motion and style, not identity)")
    src.add_argument("--negative-prompt", default=None, help="what to avoid (default: the official negative prompt)")

    out = p.add_argument_group("output")
    out.add_argument("--output", "-o", metavar="PATH", required=True, help="the MP4 file to write")
    out.add_argument("--resume", action="store_true", help="continue an interrupted job writing the same output")
    out.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")

    gen = p.add_argument_group("generation")
    gen.add_argument("--preset", choices=sorted(PRESETS), default=None,
                     help=" ".join(f"[{k}] {v['about']}" for k, v in PRESETS.items()))
    gen.add_argument("--size", type=int, choices=(480, 720), default=None, help="size bucket set (default 480)")
    gen.add_argument("--mode", choices=("clip", "streaming"), default=None,
                     help="streaming: any length (default); clip: one window of 81 frames")
    gen.add_argument("--steps", type=int, default=None, help="sampling steps (default 40)")
    gen.add_argument("--seed", type=int, default=None, help="random seed (default 42)")
    gen.add_argument("--max-seconds", type=float, default=None, help="cut the video after this many seconds")
    gen.add_argument("--text-guide-scale", type=float, default=None, help="text guidance (default 5; 1 = two passes)")
    gen.add_argument("--audio-guide-scale", type=float, default=None, help="audio guidance (default 4)")
    gen.add_argument("--shift", type=float, default=None, help="flow shift (default 7 at 480, 11 at 720)")
    gen.add_argument("--color-correction", type=float, default=None, metavar="STRENGTH",
                     help="colour correction towards the reference, 0..1 (default 1)")
    gen.add_argument("--teacache", action="store_true", help="skip some model evaluations (TeaCache, threshold 0.2)")

    model = p.add_argument_group("model")
    model.add_argument("--model", choices=("infinitetalk-14b", "tiny"), default="infinitetalk-14b",
                       help="infinitetalk-14b (official weights) or tiny (small RANDOM models, no download)")
    model.add_argument("--weights", metavar="DIR", default=None,
                       help="weights folder (default $INFINITETALK_WEIGHTS or ~/.cache/infinitetalk/weights)")
    model.add_argument("--variant", choices=("single", "multi"), default=None,
                       help="audio adapter: single (one speaker) or multi (two); default follows the speaker count")
    model.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    model.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="model dtype (default bf16 on GPU, fp32 on CPU)")
    model.add_argument("--fp8", action="store_true",
                       help="DiT block layers in fp8 (half the weight memory, ~30%% faster on H100; needs a GPU "
                            "with fp8 tensor cores for speed)")
    model.add_argument("--fp8-attention", action="store_true",
                       help="DiT self-attention in fp8 through cuDNN (Hopper or newer, pip install "
                            "'infinitetalk[fp8]'): another ~12%% faster per step, at twice the numeric error "
                            "of --fp8 alone")
    model.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                       help="merge a LoRA into the DiT at load (repeatable; scale default 1); works with --fp8")
    model.add_argument("--no-fast", dest="fast", action="store_false", default=None,
                       help="use the reference kernels instead of the fast GPU path (for comparisons)")
    par = p.add_argument_group("several GPUs")
    par.add_argument("--gpus", type=int, default=None, metavar="N",
                     help="share each step over N GPUs (cuda:0..N-1; with --device cpu: N CPU processes, for "
                          "tests); torchrun -m infinitetalk generate ... works too")
    par.add_argument("--branch-groups", type=int, default=None, metavar="G",
                     help="run the guidance branches on G groups of GPUs (default: chosen from N and the branches)")
    p.set_defaults(func=cmd_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infinitetalk",
        description="Talking videos of any length from a portrait (or a video) and speech.",
        epilog=MAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_generate(sub)
    dl = sub.add_parser("download", help="fetch the official weights from the Hugging Face hub (resumable)",
                        description="Fetch only the files InfiniteTalk needs (about 80 GB); an interrupted "
                                    "download continues where it stopped.")
    dl.add_argument("--variant", choices=("single", "multi"), default="single",
                    help="adapter for one speaker (single) or two (multi)")
    dl.add_argument("--dir", metavar="DIR", default=None,
                    help="weights folder (default $INFINITETALK_WEIGHTS or ~/.cache/infinitetalk/weights)")
    dl.add_argument("--lora", choices=("fast", "fusionx"), default=None,
                    help="fetch only the LoRA of this preset into DIR/loras (for --preset fast / fusionx)")
    dl.set_defaults(func=cmd_download)
    info = sub.add_parser("info", help="versions, device, and where weights are found")
    info.add_argument("--weights", metavar="DIR", default=None, help="also check this weights folder")
    info.set_defaults(func=cmd_info)
    return parser


# ---- progress ------------------------------------------------------------------------------


def _clock(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "--:--"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ConsolePrinter:
    """Progress events -> lines on stderr: per window, per step (with elapsed time and ETA).

    On a terminal the step line is rewritten in place; otherwise one line per step is printed.
    """

    def __init__(self, stream: TextIO = sys.stderr):
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.window = 0
        self.windows = 0
        self.first_window: Optional[int] = None
        self.started: Optional[float] = None
        self._open_line = False

    def _line(self, text: str, transient: bool = False) -> None:
        if self.tty and transient:
            self.stream.write("\r\x1b[2K" + text)
            self._open_line = True
        else:
            if self._open_line:
                self.stream.write("\n")
                self._open_line = False
            self.stream.write(text + "\n")
        self.stream.flush()

    def _eta(self, step: int, steps: int) -> Optional[float]:
        if self.started is None or self.first_window is None or not self.windows:
            return None
        done = (self.window - self.first_window) + (step / steps if steps else 0.0)
        todo = self.windows - self.first_window
        if done <= 0:
            return None
        elapsed = time.monotonic() - self.started
        return elapsed / done * (todo - done)

    def __call__(self, event) -> None:
        if event.stage == "window" and event.message.startswith("window"):
            self.window, self.windows = event.current, event.total
            if self.first_window is None:
                self.first_window = event.current
                self.started = time.monotonic()
            self._line(f"window {event.current + 1}/{event.total}  elapsed {_clock(event.elapsed_s)}  "
                       f"eta {_clock(self._eta(0, 1))}")
        elif event.stage == "step":
            eta = self._eta(event.current, event.total)
            self._line(f"  window {self.window + 1}/{self.windows} step {event.current}/{event.total}  "
                       f"elapsed {_clock(event.elapsed_s)}  eta {_clock(eta)}", transient=True)
        elif event.stage in ("encode", "write", "resume", "done"):
            self._line(event.message)


# ---- commands ------------------------------------------------------------------------------


def _request_and_config(args: argparse.Namespace):
    from .generation.inputs import GenerationRequest, parse_box, read_input_json
    from .generation.pipeline import config_for

    fields: dict = read_input_json(args.input_json) if args.input_json else {}
    if args.image or args.video:
        fields.pop("image", None)
        fields.pop("video", None)
        fields["image" if args.image else "video"] = args.image or args.video
    for key in ("audio", "audio2", "prompt", "negative_prompt", "audio_type"):
        value = getattr(args, key)
        if value is not None:
            fields[key] = value
    boxes = (parse_box(args.bbox1, "speaker 1"), parse_box(args.bbox2, "speaker 2"))
    if any(b is not None for b in boxes):
        fields["boxes"] = boxes
    if "audio" not in fields:
        raise InputError("Give the speech with --audio PATH (or cond_audio.person1 in --input-json).")
    if "image" not in fields and "video" not in fields:
        raise InputError("Give a portrait with --image PATH or a video to dub with --video PATH.")
    request = GenerationRequest(**fields)

    settings: dict = {}
    if args.preset:
        from .config import PRESETS

        settings.update(PRESETS[args.preset]["settings"])
    flag_map = {"size": "size", "mode": "mode", "steps": "sample_steps", "seed": "seed", "shift": "shift",
                "text_guide_scale": "text_guide_scale", "audio_guide_scale": "audio_guide_scale",
                "color_correction": "color_correction_strength"}
    for flag, name in flag_map.items():
        value = getattr(args, flag)
        if value is not None:
            settings[name] = value
    if args.teacache:
        settings["use_teacache"] = True
    if args.max_seconds is not None:
        if not args.max_seconds > 0:
            raise InputError(f"--max-seconds must be positive, got {args.max_seconds}.")
        settings["max_frames"] = max(1, int(args.max_seconds * 25 + 1e-6))
    return request, config_for(args.model, None, **settings)


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .generation.inputs import prepare_inputs
    from .generation.job_state import JobDir
    from .generation.pipeline import InfiniteTalk, job_settings, runtime_settings

    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    request, cfg = _request_and_config(args)
    output = Path(args.output).expanduser()
    if output.is_dir():
        raise InputError(f"--output {output} is a folder; give a file name such as {output / 'talk.mp4'}.")
    inputs = prepare_inputs(request, cfg)  # every input is checked before a model is loaded
    variant = args.variant or ("multi" if request.speakers == 2 else "single")
    if args.model == "tiny":
        say("note: --model tiny uses small RANDOM models of every component: the video is noise, not a face "
            "(for trying the tool and for tests).")
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    if args.resume:  # refuse a mismatching job before spending time on the models
        JobDir(output).check_resumable(
            job_settings(inputs, cfg, args.model, variant, args.device, dtype, runtime_settings(args.fp8, _loras(args), args.fp8_attention))
        )
    loras = _loras(args)
    device, parallel = args.device, None
    world = _parallel_world(args, cfg)
    if world > 1:  # several ranks: start them (this process returns their result) or be one of them
        from .runtime.parallel import ParallelContext
        from .runtime.parallel_launch import rank_device, start_or_join

        device_type = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")).type
        launched = start_or_join(cmd_generate, args, world, device_type)
        if launched is not None:
            return launched
        device, parallel = str(rank_device(device_type)), ParallelContext(branch_groups=args.branch_groups)
        if not parallel.is_leader:
            say, args.quiet = (lambda *a: None), True
    say(f"loading {args.model} ({variant}) ...")
    pipe = InfiniteTalk.from_pretrained(
        args.weights, device=device, dtype=dtype, variant=variant, model=args.model,
        fast=args.fast, fp8=args.fp8, loras=loras, fp8_attention=args.fp8_attention, parallel=parallel,
    )
    plan = pipe.plan(inputs, cfg)
    h, w = inputs.target_hw
    say(f"{plan.total_frames} frames ({plan.duration_s:.2f} s) at {w}x{h}, {len(plan)} window(s) of "
        f"{cfg.sample_steps} steps, seed {cfg.seed}")
    progress = None if args.quiet else ConsolePrinter(sys.stderr)
    try:
        path = pipe.generate(output, inputs=inputs, config=cfg, progress=progress, resume=args.resume)
    except torch.cuda.OutOfMemoryError as err:
        raise DeviceOutOfMemoryError(
            f"The GPU ran out of memory ({err}). Use a smaller --size, fewer speakers, or a GPU with more memory; "
            "the finished windows are kept: add --resume to continue."
        ) from err
    say(f"wrote {path}")
    return 0


def _parallel_world(args: argparse.Namespace, cfg) -> int:
    """The job's rank count (--gpus or torchrun), its layout checked before anything starts."""
    from .runtime.parallel_launch import requested_world

    world = requested_world(getattr(args, "gpus", None))
    if world > 1 or getattr(args, "branch_groups", None):
        from .generation.guidance import branches_for
        from .runtime.parallel import model_heads, plan_layout

        plan_layout(world, len(branches_for(cfg.text_guide_scale)), model_heads(args.model), cfg.latent_frames,
                    args.branch_groups)
    return world


def _loras(args: argparse.Namespace) -> list:
    """--lora PATH[:SCALE] values, plus the LoRA a preset needs (official model only)."""
    loras = []
    for value in args.lora:
        path, sep, scale = value.rpartition(":")
        if not sep or not path or "/" in scale or "\\" in scale:
            path, scale = value, "1"
        try:
            loras.append((Path(path).expanduser(), float(scale)))
        except ValueError:
            raise InputError(f"--lora {value}: the scale after ':' must be a number, e.g. --lora file.safetensors:0.8.")
        if not loras[-1][0].is_file():
            raise InputError(f"--lora {value}: the file {loras[-1][0]} does not exist.")
    if args.preset and not loras and args.model != "tiny":
        from .weights.hub import preset_lora

        found = preset_lora(args.weights, args.preset)
        if found is not None:
            loras.append(found)
    return loras


def cmd_download(args: argparse.Namespace) -> int:
    from .weights.hub import default_weights_dir, download_preset_lora, download_weights

    root = Path(args.dir).expanduser() if args.dir else default_weights_dir()
    if args.lora:
        path = download_preset_lora(root, args.lora)
        print(f"wrote {path}; use it with: infinitetalk generate --preset {args.lora} --weights {root} ...")
        return 0
    print(f"downloading the {args.variant} weights into {root} (resumable; about 80 GB)", file=sys.stderr)
    layout = download_weights(root, args.variant, log_fn=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"all files present in {layout.root}")
    print(f"run: infinitetalk generate --weights {layout.root} --image face.png --audio speech.wav --output talk.mp4")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import platform

    import av
    import numpy
    import torch

    from . import __version__
    from .weights.hub import VARIANTS, WeightsLayout, default_weights_dir

    print(f"infinitetalk {__version__}")
    print(f"python {platform.python_version()} ({platform.system()} {platform.machine()})")
    print(f"torch {torch.__version__}, numpy {numpy.__version__}, av {av.__version__}", end="")
    try:
        import transformers

        print(f", transformers {transformers.__version__}")
    except ImportError:
        print()
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            prop = torch.cuda.get_device_properties(i)
            print(f"device cuda:{i}: {prop.name}, {prop.total_memory / 2**30:.1f} GiB")
    else:
        print(f"device: cpu only ({torch.get_num_threads()} threads); no CUDA GPU found")
    roots = [default_weights_dir()] + ([Path(args.weights).expanduser()] if args.weights else [])
    for root in roots:
        for variant in VARIANTS:
            layout = WeightsLayout(root, variant)
            try:
                missing = layout.missing_files()
            except InfiniteTalkError as err:
                print(f"weights {variant:6s} in {root}: unreadable ({err})")
                continue
            if not missing:
                print(f"weights {variant:6s} in {root}: complete")
            else:
                print(f"weights {variant:6s} in {root}: {len(missing)} file(s) missing, e.g. {missing[0]} "
                      f"(infinitetalk download --variant {variant} --dir {root})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING
    if getattr(args, "quiet", False) and not args.verbose:
        level = logging.ERROR
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except InfiniteTalkError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted (finished windows are kept; add --resume to continue)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
