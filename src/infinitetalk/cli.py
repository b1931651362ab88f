"""The `infinitetalk` command: generate, download, info.

It parses the arguments, builds the `JobSpec`, runs it through the job service and renders the
service's progress events (`infinitetalk.console`). Exit codes:

- 0 done; 2 an InfiniteTalkError (bad input, missing weights, ...): its sentence, no traceback.
- 130 Ctrl-C: the first one cancels at the next sampler step or window boundary, the second stops
  at once; either way the finished windows are kept and the printed command (the same one plus
  --resume) continues the job. No partial MP4 is left at the output path.
- 1 an internal error (a bug): one line "internal error, please report it: ..." naming a log file
  with the traceback, in the system temp folder: $TMPDIR/infinitetalk/error-<time>-<pid>.log.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from . import __version__, errors
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
  infinitetalk generate --input-json examples/single.json --output out.mp4

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
    out.add_argument("--restart", action="store_true",
                     help="discard the interrupted job writing the same output and start over")
    out.add_argument("--official-sound", action="store_true",
                     help="mux the 16 kHz mono speech the model hears (official) instead of the original sound")
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
    gen.add_argument("--frame-num", type=int, default=None, metavar="N",
                     help="frames per window, 4n+1 (default 81; official --frame_num)")
    gen.add_argument("--motion-frame", type=int, default=None, metavar="N",
                     help="frames of the previous window that condition the next one (default 9; "
                          "official --motion_frame)")
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
                       help="DiT block layers in fp8 (half the weight memory of those layers; faster on GPUs "
                            "with fp8 tensor cores, timings in benchmarks/results)")
    model.add_argument("--fp8-attention", action="store_true",
                       help="DiT self-attention in fp8 through cuDNN (Hopper or newer, pip install "
                            "'infinitetalk[fp8]'): faster steps, less exact than --fp8 alone (timings and "
                            "errors in benchmarks/results)")
    model.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                       help="merge a LoRA into the DiT at load (repeatable; scale default 1); works with --fp8")
    model.add_argument("--no-fast", dest="fast", action="store_false", default=None,
                       help="use the reference kernels instead of the fast GPU path (for comparisons)")
    _add_component_options(model)
    model.add_argument("--vram", metavar="GB|auto", type=_vram_value, default="auto",
                       help="VRAM the job may use (per GPU): DiT blocks stream from host memory, or with --gpus are "
                            "sharded over the GPUs, and the other models sit on the GPU only while they run (default "
                            "auto: the GPU's free memory; see `infinitetalk info --vram GB [--gpus N]` for the plan)")
    par = p.add_argument_group("several GPUs")
    par.add_argument("--gpus", type=int, default=None, metavar="N",
                     help="share each step over N GPUs (cuda:0..N-1; with --device cpu: N CPU processes, for "
                          "tests); torchrun -m infinitetalk generate ... works too")
    par.add_argument("--branch-groups", type=int, default=None, metavar="G",
                     help="run the guidance branches on G groups of GPUs (default: chosen from N and the branches)")
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


def _vram_value(text: str):
    """--vram: a positive number of GB or 'auto' (argparse prints the error, exit code 2)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"the VRAM budget must be a number of GB or 'auto', not {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"the VRAM budget must be positive, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infinitetalk",
        description="Talking videos of any length from a portrait (or a video) and speech.",
        epilog=MAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version=f"infinitetalk {__version__}")
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
    info.add_argument("--vram", metavar="GB", type=_vram_value, default=None,
                      help="print the memory plan of a job under this VRAM budget (14B model)")
    info.add_argument("--size", type=int, choices=(480, 720), default=480, help="size bucket set of that plan")
    info.add_argument("--fp8", action="store_true", help="plan with the DiT block layers in fp8")
    info.add_argument("--speakers", type=int, choices=(1, 2), default=1, help="speakers of that plan")
    info.add_argument("--preset", default=None, help="a preset with text guidance 1 (fast, fusionx) plans two passes")
    info.add_argument("--gpus", type=int, default=1, metavar="N",
                      help="plan for a job shared by N GPUs (below a whole DiT per GPU its blocks are sharded over them)")
    info.set_defaults(func=cmd_info)
    from .ui.options import add_ui_parser  # `infinitetalk ui`: the web page (gradio is imported only when it runs)

    add_ui_parser(sub)

    # serve: the HTTP API (extra `server`; FastAPI is imported only when the command runs)
    from .server.cli_serve import add_serve_parser

    add_serve_parser(sub)

    from .batch_cli import add_batch_parser  # `infinitetalk batch`: many jobs, the models loaded once

    add_batch_parser(sub, sub.choices["generate"])
    return parser


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
        vram=args.vram,
    )
    return JobSpec(
        output=args.output, audio=args.audio, image=args.image, video=args.video, audio2=args.audio2,
        audio_type=args.audio_type, bbox1=parse_box(args.bbox1, "speaker 1"), bbox2=parse_box(args.bbox2, "speaker 2"),
        prompt=args.prompt, negative_prompt=args.negative_prompt, input_json=args.input_json, preset=args.preset,
        size=args.size, mode=args.mode, steps=args.steps, seed=args.seed, shift=args.shift,
        text_guide_scale=args.text_guide_scale, audio_guide_scale=args.audio_guide_scale,
        color_correction=args.color_correction, frame_num=args.frame_num, motion_frame=args.motion_frame,
        teacache=args.teacache, max_seconds=args.max_seconds,
        resume=args.resume, restart=args.restart, official_sound=args.official_sound, runtime=runtime, text=args.text, text_file=args.text_file, voice=args.voice,
        voice2=args.voice2, lang=args.lang, speed=args.speed, save_audio=args.save_audio,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from .console import make_display
    from .progress import CancelToken, JobCancelled, JobStarted
    from .service import JobService

    spec = job_spec(args)
    display = None if args.quiet else make_display(sys.stderr)
    planned: list = []
    cancelled: list = []

    def on_event(event) -> None:
        if isinstance(event, JobStarted):
            planned.append(event.windows)
        if isinstance(event, JobCancelled):
            cancelled.append(event)
        if display is not None:
            display(event)

    token = CancelToken()
    service = JobService()
    world = _parallel_world(args, spec)
    if world > 1:  # several ranks: start them (this process returns their result) or be one of them
        import torch

        from .runtime.parallel import ParallelContext
        from .runtime.parallel_launch import rank_device, start_or_join

        device_type = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")).type
        launched = start_or_join(cmd_generate, args, world, device_type)
        if launched is not None:
            return launched
        parallel = ParallelContext(branch_groups=args.branch_groups)
        spec = spec.with_(runtime=spec.runtime.with_(device=str(rank_device(device_type))))
        service = JobService(parallel=parallel)
        if not parallel.is_leader:
            display = None
    try:
        with _ctrl_c_cancels(token):
            service.run(spec, progress=on_event, cancel=token)
    except (errors.JobCancelledError, KeyboardInterrupt):
        if display is not None:
            display.close()
        done = cancelled[-1].next_window if cancelled else None  # None: stopped at once (a second Ctrl-C)
        print(_cancelled_message(spec.output, planned[-1] if planned else None, done, getattr(args, "argv", None)),
              file=sys.stderr)
        return 130
    finally:
        if display is not None:
            display.close()
    return 0


@contextmanager
def _ctrl_c_cancels(token) -> Iterator[None]:
    """SIGINT -> cancel `token` (the job stops at its next step or window boundary); a second
    SIGINT raises KeyboardInterrupt at once. The previous handler comes back afterwards."""
    try:
        previous = signal.getsignal(signal.SIGINT)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return

    def handler(signum, frame) -> None:
        if token.cancelled:
            raise KeyboardInterrupt
        token.cancel()
        sys.stderr.write("\nstopping after the current step (Ctrl-C again to stop at once)\n")
        sys.stderr.flush()

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _resume_command(argv: Optional[list]) -> str:
    words = list(argv if argv is not None else sys.argv[1:])
    if "--resume" not in words:
        words.append("--resume")
    return shlex.join(["infinitetalk", *words])


def _cancelled_message(output: str, windows: Optional[int], done: Optional[int], argv: Optional[list]) -> str:
    """The one message after a cancel: what is kept (`done`: the finished windows the JobCancelled
    event reported, None when the job stopped without one) and the exact command that continues."""
    from .generation.job_state import JobDir

    root = JobDir(Path(output).expanduser()).root
    of = f" of {windows}" if windows else ""
    if done is None:
        kept = f"the finished windows, if any, are kept in {root}"
    elif done:
        kept = f"{done}{of} window(s) are finished and kept in {root}"
    else:
        kept = "no window was finished yet"
    return f"cancelled: {kept}; no video was written. To continue, run:\n  {_resume_command(argv)}"


def _parallel_world(args: argparse.Namespace, spec) -> int:
    """The job's rank count (--gpus or torchrun), its layout checked (by the service) before anything starts."""
    from .runtime.parallel_launch import requested_world
    from .service.runner import check_layout

    world = requested_world(getattr(args, "gpus", None))
    check_layout(spec, world, getattr(args, "branch_groups", None))
    return world


def _loras(args: argparse.Namespace) -> list:
    """--lora PATH[:SCALE] values as (path, scale); the service checks the files and adds a preset's own LoRA."""
    loras = []
    for value in args.lora:
        path, sep, scale = value.rpartition(":")
        if not sep or not path or "/" in scale or "\\" in scale:
            path, scale = value, "1"
        try:
            loras.append((str(Path(path).expanduser()), float(scale)))
        except ValueError:
            raise InputError(f"--lora {value}: the scale after ':' must be a number, e.g. --lora file.safetensors:0.8.")
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
    from .weights.locate import describe, official_layout_lines

    files = _component_files(args, "single")
    print(f"components for {files.root} ({'complete' if not files.missing() else 'incomplete'}):")
    print("\n".join(describe(files)))
    if args.vram is not None:
        print(_vram_plan(args))
    for line in official_layout_lines(files):
        print(line)
    return 0


def _vram_plan(args: argparse.Namespace) -> str:
    """`info --vram GB`: the plan of a 14B job (bf16 on a GPU) of --size, --fp8, --speakers."""
    import torch

    from .config import GenerationConfig
    from .runtime.offload import host_ram_available, resolve_budget
    from .runtime.offload_plan import OffloadModels, plan_offload

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    budget = resolve_budget(args.vram, device)
    if budget is None:
        raise InputError("--vram auto needs a CUDA GPU to read its free memory; give a number of GB.")
    cfg = GenerationConfig.from_preset(args.preset) if args.preset else GenerationConfig()
    models = OffloadModels.infinitetalk_14b(torch.bfloat16, args.fp8)
    gpus = max(1, args.gpus)
    shards = gpus if gpus > 1 and models.dit_config.num_heads % gpus == 0 else 1  # as generation.components.offload_for
    plan = plan_offload(models, budget, size=args.size, speakers=args.speakers, passes=2 if cfg.two_pass_guidance else 3,
                        host_ram_bytes=host_ram_available(), shards=shards)
    return plan.describe()


def _is_user_error(err: BaseException) -> bool:
    """An InfiniteTalkError meant for the user (an internal-error type, if one exists, is not)."""
    internal = getattr(errors, "InternalError", ())
    return isinstance(err, InfiniteTalkError) and not isinstance(err, internal)


def error_log_dir() -> Path:
    """Where internal-error reports go: the system temp folder's infinitetalk/ (see module doc)."""
    return Path(tempfile.gettempdir()) / "infinitetalk"


def _write_error_log(err: BaseException, argv: Optional[list]) -> Path:
    import platform

    folder = error_log_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = "absent"
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(f"infinitetalk {__version__}, python {platform.python_version()}, torch {torch_version}, "
                 f"{platform.platform()}\n")
        fh.write(f"command: {shlex.join(['infinitetalk', *(argv if argv is not None else sys.argv[1:])])}\n\n")
        fh.write("".join(traceback.format_exception(type(err), err, err.__traceback__)))
    return path


def _internal_error(err: BaseException, argv: Optional[list]) -> int:
    text = " ".join(str(err).split())
    if len(text) > 200:
        text = text[:197] + "..."
    try:
        where = f"details in {_write_error_log(err, argv)}"
    except OSError as log_err:
        where = f"the log could not be written: {log_err}; run again with --verbose"
    print(f"internal error, please report it: {type(err).__name__}: {text} ({where})", file=sys.stderr)
    return 1


VALUE_OPTIONS = ("--bbox1", "--bbox2", "--prompt", "--negative-prompt")
"""Options whose value may start with '-' (a box at x = -10, a prompt "- smiling")."""


def _attach_dash_values(argv: list[str]) -> list[str]:
    """`--bbox1 -10,0,50,50` -> `--bbox1=-10,0,50,50`, so argparse does not take the value for an
    option and the box reaches the box check (which says what is wrong with it)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in VALUE_OPTIONS and i + 1 < len(argv) and argv[i + 1].startswith("-") and argv[i + 1] != "--":
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    from .console import configure_logging

    parser = build_parser()
    args = parser.parse_args(_attach_dash_values(list(sys.argv[1:] if argv is None else argv)))
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    configure_logging(verbose=args.verbose, quiet=getattr(args, "quiet", False) and not args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every failure ends in one of two kinds of message
        if _is_user_error(err):
            print(f"error: {err}", file=sys.stderr)
            return err.exit_code
        return _internal_error(err, args.argv)


if __name__ == "__main__":
    sys.exit(main())
