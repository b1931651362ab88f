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
from pathlib import Path
from typing import Optional, TextIO

from .errors import InfiniteTalkError, InputError

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
    tts = p.add_argument_group("speech from text (instead of --audio; pip install 'infinitetalk[tts]', "
                               "infinitetalk download --tts)")
    tts.add_argument("--text", default=None, help="words to speak; a script with (s1) ... (s2) ... turns makes two speakers")
    tts.add_argument("--text-file", metavar="PATH", default=None, help="UTF-8 file with the words or the (s1)/(s2) script")
    tts.add_argument("--voice", default=None, help="Kokoro voice of speaker 1, a name or a .pt file (default af_heart)")
    tts.add_argument("--voice2", default=None, help="Kokoro voice of speaker 2 (default am_adam)")
    tts.add_argument("--lang", default=None, help="a (US English), b (UK), e, f, h, i, p; default: the voice's first letter")
    tts.add_argument("--speed", type=float, default=None, help="speaking speed (default 1.0)")
    tts.add_argument("--save-audio", metavar="PATH.wav", default=None, help="also keep the speech track (24 kHz WAV) here")
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
    _add_component_options(model)
    p.set_defaults(func=cmd_generate)


COMPONENT_OPTIONS = {  # option -> ComponentFiles field (weights.locate.locate_components overrides)
    "--dit": "dit", "--adapter": "adapter", "--t5": "t5", "--audio-encoder": "wav2vec2", "--vae": "vae", "--clip": "clip",
}


def _add_component_options(group) -> None:
    """--dit/--adapter/--t5/--audio-encoder/--vae/--clip FILE: one component from a file of your own."""
    for option, field in COMPONENT_OPTIONS.items():
        group.add_argument(option, metavar="FILE", default=None, dest=f"file_{field}",
                           help=f"the {field} from this file (official, ComfyUI/Kijai, fp8-scaled or GGUF; found by content)")


def _component_files(args: argparse.Namespace, variant: str, say=lambda *a: None):
    """The ComponentFiles of --weights DIR (official layout or a ComfyUI models/ folder) and the overrides."""
    from .weights.locate import locate_components

    overrides = {field: getattr(args, f"file_{field}", None) for field in COMPONENT_OPTIONS.values()}
    files = locate_components(args.weights, variant, overrides)
    for note in files.notes:
        say(f"note: {note}")
    return files


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
    dl.add_argument("--tts", action="store_true",
                    help="fetch only the Kokoro-82M speech model and voices into DIR/Kokoro-82M (for --text)")
    dl.set_defaults(func=cmd_download)
    info = sub.add_parser("info", help="versions, device, and where weights are found")
    info.add_argument("--weights", metavar="DIR", default=None, help="also check this weights folder")
    _add_component_options(info)
    info.set_defaults(func=cmd_info)
    from .ui.options import add_ui_parser  # `infinitetalk ui`: the web page (gradio is imported only when it runs)

    add_ui_parser(sub)
    from .batch_cli import add_batch_parser  # `infinitetalk batch`: many jobs, the models loaded once

    add_batch_parser(sub, sub.choices["generate"])
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
    """Typed progress events -> lines on stderr (elapsed time and ETA from the events).

    On a terminal the step line is rewritten in place; otherwise only window lines are printed.
    """

    def __init__(self, stream: TextIO = sys.stderr):
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
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

    def __call__(self, event) -> None:
        from . import progress as ev

        times = f"elapsed {_clock(event.elapsed_s)}  eta {_clock(event.eta_s)}"
        if isinstance(event, ev.JobStarted):
            self._line(f"{event.frames} frames ({event.duration_s:.2f} s) at {event.width}x{event.height}, "
                       f"{event.windows} window(s) of {event.steps} steps, seed {event.seed}")
        elif isinstance(event, ev.StageStarted) and event.message:
            self._line(event.message + " ...")
        elif isinstance(event, ev.WindowFinished):
            self._line(f"window {event.index + 1}/{event.count} done  {times}")
        elif isinstance(event, ev.StepFinished) and self.tty:
            self._line(f"  window {event.window + 1}/{event.windows} step {event.step}/{event.steps}  {times}",
                       transient=True)
        elif isinstance(event, ev.Notice):
            self._line(("note: " if event.level != "info" else "") + event.message)
        elif isinstance(event, ev.JobFinished) and event.output:
            self._line(f"wrote {event.output} ({event.frames} frames, {event.duration_s:.2f} s) "
                       f"in {_clock(event.elapsed_s)}")


# ---- commands ------------------------------------------------------------------------------


def job_spec(args: argparse.Namespace):
    """The job description of `infinitetalk generate` arguments."""
    from .generation.inputs import parse_box
    from .service import JobSpec, RuntimeOptions

    runtime = RuntimeOptions(
        model=args.model, weights=args.weights, variant=args.variant, device=args.device,
        dtype=DTYPES[args.dtype] if args.dtype else None, fast=args.fast, fp8=args.fp8,
        fp8_attention=args.fp8_attention, loras=tuple(_loras(args)),
        files=tuple((field, getattr(args, f"file_{field}")) for field in COMPONENT_OPTIONS.values()
                    if getattr(args, f"file_{field}", None)),
    )
    return JobSpec(
        output=args.output, audio=args.audio, image=args.image, video=args.video, audio2=args.audio2,
        audio_type=args.audio_type, bbox1=parse_box(args.bbox1, "speaker 1"), bbox2=parse_box(args.bbox2, "speaker 2"),
        prompt=args.prompt, negative_prompt=args.negative_prompt, input_json=args.input_json, preset=args.preset,
        size=args.size, mode=args.mode, steps=args.steps, seed=args.seed, shift=args.shift,
        text_guide_scale=args.text_guide_scale, audio_guide_scale=args.audio_guide_scale,
        color_correction=args.color_correction, teacache=args.teacache, max_seconds=args.max_seconds,
        resume=args.resume, runtime=runtime, text=args.text, text_file=args.text_file, voice=args.voice,
        voice2=args.voice2, lang=args.lang, speed=args.speed, save_audio=args.save_audio,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from .service import JobService

    spec = job_spec(args)
    progress = None if args.quiet else ConsolePrinter(sys.stderr)
    JobService().run(spec, progress=progress)
    return 0


def _loras(args: argparse.Namespace) -> list:
    """--lora PATH[:SCALE] values as (path, scale); the service adds a preset's own LoRA."""
    loras = []
    for value in args.lora:
        path, sep, scale = value.rpartition(":")
        if not sep or not path or "/" in scale or "\\" in scale:
            path, scale = value, "1"
        try:
            loras.append((str(Path(path).expanduser()), float(scale)))
        except ValueError:
            raise InputError(f"--lora {value}: the scale after ':' must be a number, e.g. --lora file.safetensors:0.8.")
        if not Path(loras[-1][0]).is_file():
            raise InputError(f"--lora {value}: the file {loras[-1][0]} does not exist.")
    return loras


def cmd_download(args: argparse.Namespace) -> int:
    from .weights.hub import default_weights_dir, download_preset_lora, download_weights

    root = Path(args.dir).expanduser() if args.dir else default_weights_dir()
    if args.tts:
        from .weights.tts_loader import download_tts_weights

        layout = download_tts_weights(root, log_fn=lambda m: print(m, file=sys.stderr, flush=True))
        print(f"Kokoro-82M present in {layout.folder} ({len(layout.voices())} voices)")
        print(f"run: infinitetalk generate --weights {root} --image face.png --text \"Hello.\" --output talk.mp4")
        return 0
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
    from .weights.locate import describe

    files = _component_files(args, "single")
    print(f"components for {files.root} ({'complete' if not files.missing() else 'incomplete'}):")
    print("\n".join(describe(files)))
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
