"""`llava-drip chat`: chat with a model in the terminal, as LLaVA's `llava.serve.cli` does.

Reads one user message per line from stdin until EOF (Ctrl-D), streaming each answer after
"ASSISTANT: ". With --image-file the image goes into the first turn, and the number of visual
tokens DRIP kept for it (at --budget) is printed once before the chat starts. Without --model-path it
chats with the built-in tiny model, building it on first use.
"""
import argparse
import sys

from .builtin import add_dtype_arg, model_path_help, resolve_model_path

BUDGET_HELP = ("DRIP visual tokens per image, three forms: a ratio 0.25 (exactly round(0.25 N) of the N patches), "
               "a count 16 (exactly 16), or mean:0.25 (the calibrated cut: 0.25 N on average, each image its own "
               "count); default: the model's own")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="llava-drip chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help=model_path_help())
    p.add_argument("--model-base", default=None, help="base LLM for LoRA / projector checkpoints")
    p.add_argument("--image-file", default=None,
                   help="image for the conversation (any format PIL reads, up to LLAVA_DRIP_MAX_IMAGE_PIXELS)")
    p.add_argument("--temperature", type=float, default=0.2, help="0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=0.7)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--budget", default=None, help=BUDGET_HELP)
    p.add_argument("--conv-mode", default="vicuna_v1", help="conversation template")
    p.add_argument("--device", default="cpu")
    add_dtype_arg(p)
    args = p.parse_args(argv)
    prog = "llava-drip chat"

    try:  # before loading anything: a typo fails in a second
        from llava_drip.drip.budget import parse_budget
        budget = parse_budget(args.budget)
    except ValueError as e:
        print(f"{prog}: --budget: {e}", file=sys.stderr)
        return 2

    image = None
    if args.image_file:
        from llava_drip.image_io import ImageError, open_image
        try:  # the project's one reader: pixel limit from the header, EXIF, 16-bit, alpha over white
            image = open_image(args.image_file)
        except ImageError as e:  # missing, not an image, truncated, too many pixels: one line, no traceback
            print(f"{prog}: --image-file: {e}", file=sys.stderr)
            return 2
    model_path = resolve_model_path(args.model_path, file=sys.stderr)  # stdout is the conversation
    from .engine import ChatEngine, visual_token_summary  # after the image check: a bad path fails fast
    engine = ChatEngine(model_path, model_base=args.model_base, device=args.device,
                        conv_template=args.conv_mode, dtype=args.dtype)
    try:  # what only the model can tell: a DRIP tower, enough patches, calibrated for a mean
        budget = engine.resolve_budget(budget)
    except ValueError as e:
        print(f"{prog}: --budget: {e}", file=sys.stderr)
        return 2
    tokens = None
    if image is not None:
        tokens = engine.encode_image(image, budget)  # once: every turn reuses the same pixels, count and budget
        print(visual_token_summary(tokens.tokens_in, tokens.tokens_out, engine.budget_label(tokens.budget)),
              flush=True)

    history = []
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("USER: " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print()
            break
        line = line.strip()
        if not line:
            continue
        if not interactive:
            print(f"USER: {line}")
        history.append({"role": "user", "content": line})
        try:
            stream = engine.stream(history, tokens, temperature=args.temperature, top_p=args.top_p,
                                   max_new_tokens=args.max_new_tokens, budget=budget)
        except ValueError as e:  # e.g. the conversation outgrew the context
            print(f"{prog}: {e}", file=sys.stderr)
            return 1
        print("ASSISTANT: ", end="", flush=True)
        for piece in stream:
            print(piece, end="", flush=True)
        print(flush=True)
        history.append({"role": "assistant", "content": stream.text})
    return 0


if __name__ == "__main__":
    sys.exit(main())
