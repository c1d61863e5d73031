"""`llava-drip` command: one subcommand per job, each a module with `main(argv)`.

Modules are imported only when their subcommand runs, so `llava-drip models` stays fast. Each
command builds its parser before importing torch, open_clip, transformers or gradio, so
`llava-drip <command> --help` answers without loading them (tests/test_cli_help.py).
"""
import importlib
import sys

# subcommand -> (module, help). "synth" and "bench" take a second word.
COMMANDS = {
    "models": ("llava_drip.drip.names:cli_models", "list registered model names"),
    "synth clip": ("llava_drip.data.synth_clip:main", "write a synthetic image-text set (CSV + zero-shot val)"),
    "synth llava": ("llava_drip.data.synth_llava:main", "write synthetic LLaVA stage-1/2 data and eval files"),
    "synth digits": ("llava_drip.data.digits:main", "sklearn's 8x8 digits (real data) as train/val ImageFolders"),
    "tiny-llm": ("llava_drip.train.tiny:main", "build a tiny Llama + sentencepiece tokenizer for CPU runs"),
    "clip-train": ("llava_drip.clip.train:main", "contrastive pretraining on open_clip_train's own loop"),
    "zeroshot": ("llava_drip.clip.zeroshot:main", "zero-shot top-1/top-5 on an ImageFolder"),
    "calibrate": ("llava_drip.clip.calibrate:main", "fit a DRIP tower's calibrated boundaries on held-out images"),
    "convert-reference": ("llava_drip.drip.convert_reference:main",
                          "reference DRIP (Yusen-Peng/DRIP) checkpoint -> this project's safetensors"),
    "classify": ("llava_drip.classify.train:main", "linear probe or finetune on an ImageFolder"),
    "flops": ("llava_drip.inspect.flops:main", "GFLOPs per image (fvcore, attention counted)"),
    "tokens": ("llava_drip.inspect.tokens:main", "visual tokens per image and boundary maps"),
    "bench encoder": ("llava_drip.inspect.bench_encoder:main", "encoder images/s, latency, memory"),
    "bench prefill": ("llava_drip.inspect.bench_prefill:main", "LLM prefill time vs visual tokens"),
    "bench serve": ("llava_drip.inspect.bench_serve:main", "chat engine requests/s and latency vs concurrency"),
    "bench train-step": ("llava_drip.inspect.bench_train:main", "one contrastive training step: time and peak memory"),
    "demo": ("llava_drip.serve.demo:main", "Gradio chat demo on the built-in tiny model"),
    "chat": ("llava_drip.serve.cli:main", "chat in the terminal"),
    "serve-api": ("llava_drip.serve.api:main", "OpenAI-compatible HTTP API"),
}
# --help of a command whose module loads torch when imported comes from a light module instead
HELP = {"clip-train": "llava_drip.clip.params:print_help"}


def _load(target: str):
    module_name, func_name = target.split(":")
    return getattr(importlib.import_module(module_name), func_name)


def _usage() -> str:
    lines = ["usage: llava-drip <command> [args]", "", "commands:"]
    width = max(map(len, COMMANDS))  # the help column starts two spaces after the longest name
    for name, (_, help_) in COMMANDS.items():
        lines.append(f"  {name:<{width}}  {help_}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    key = " ".join(argv[:2]) if " ".join(argv[:2]) in COMMANDS else argv[0]
    if key not in COMMANDS:
        print(f"llava-drip: unknown command {' '.join(argv[:2])!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    args = argv[len(key.split()):]
    if key in HELP and ("-h" in args or "--help" in args):  # the test clip-train's own main makes
        _load(HELP[key])()
        return 0
    func = _load(COMMANDS[key][0])
    try:
        rc = func(args)
    except FileNotFoundError as e:
        # a missing input named on the command line: say which, without a traceback
        print(f"llava-drip {key}: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
