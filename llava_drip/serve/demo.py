"""`llava-drip demo`: a Gradio chat with LLaVA-DRIP that shows how many visual tokens DRIP kept.

Upload an image (it starts a new conversation, as in LLaVA's demo), ask questions, and read the
token count and the boundary map of the image. The budget control under the image re-pools it at
another visual-token budget (exactly r N tokens, or r N on average) without retraining, and the next
answer uses it. Without --model-path it serves the built-in tiny model shipped in llava_drip/assets
(llava_drip/serve/builtin.py); the page says which model it serves, and that the built-in one knows
only synthetic shape scenes.

Each upload is read once, by llava_drip.image_io (pixel limit checked before decoding, EXIF, 16-bit, alpha
over white), and encoded once; answers and budget changes reuse it. An image that cannot be used (not an
image, empty, truncated, too many pixels) is named in one line and the chat goes on without it; uploads over
--max-upload-mb (20 MB, the HTTP API's body limit) are refused before they are stored.
"""
from __future__ import annotations

import argparse
import hashlib
import html
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

from PIL import Image

# the engine and the budgets load torch, gradio takes seconds too: imported where used, so `--help` is fast
from .api import DEFAULT_MAX_BODY_MB  # a light import: the API loads its server and torch where used
from .builtin import DEFAULT_MAX_BATCH_SIZE, add_dtype_arg, is_builtin, model_path_help, resolve_model_path

if TYPE_CHECKING:  # annotations only: the engine imports torch
    from .engine import ChatEngine, ChatStats, ImageTokens

NO_IMAGE_TEXT = "No image: text-only chat. Upload one to see how many visual tokens DRIP keeps."
BAD_IMAGE_TEXT = "Image not used: {error}. Questions are answered without an image; upload another to use one."
# one limit on an image, whichever door it comes in: the HTTP API's default --max-body-mb (MB of 10^6 bytes)
MAX_UPLOAD_MB = DEFAULT_MAX_BODY_MB

# (scene, question, the word a right answer names): scenes the built-in model was not trained on (stream 1000),
# questions of the kinds it was trained on; tests/test_builtin_model.py checks it answers each one right
EXAMPLES = (
    (("hexagon", "purple", "large", "left", 1, "noise"), "What shape is shown in the image?", "hexagon"),
    (("circle", "red", "large", "left", 3, "stripes"), "How many shapes are there in the image?", "three"),
    (("star", "blue", "large", "left", 2, "dots"), "Where are the stars located?", "left"),
    (("triangle", "green", "large", "center", 1, "plain"), "What color is the triangle?", "green"),
)


def example_images(out_dir: str, size: int = 224, photos: bool = True) -> List[Tuple[str, str]]:
    """Draw the EXAMPLES scenes into out_dir; returns [(image path, question)].

    With `photos` a real photo is added when LLAVA_DRIP_DATA holds it (not for the built-in model,
    which knows synthetic scenes only and would answer it with talk of shapes).
    """
    from llava_drip.data.shapes import Scene, render, rng_for
    os.makedirs(out_dir, exist_ok=True)
    out = []
    for i, (attrs, question, _) in enumerate(EXAMPLES):
        scene = Scene(*attrs)
        path = os.path.join(out_dir, f"{scene.color}_{scene.shape}.png")
        # drawn at the training size (64 px) and enlarged without smoothing, so the tower sees what it was trained on
        img = render(scene, rng_for(0, 1000, i), image_size=64)  # stream 1000: no training image
        img.resize((size, size), Image.NEAREST).save(path)
        out.append((path, question))
    photo = os.path.join(os.environ.get("LLAVA_DRIP_DATA", ""), "images", "extreme_ironing.jpg")
    if photos and os.environ.get("LLAVA_DRIP_DATA") and os.path.isfile(photo):
        out.append((photo, "What is unusual about this image?"))
    return out


def _heldout(model_path: str) -> dict:
    """The held-out accuracy per question kind recorded in a shipped model's MANIFEST.json, if any."""
    import json
    try:
        with open(os.path.join(model_path, "MANIFEST.json"), encoding="utf-8") as f:
            return json.load(f).get("held_out", {}).get("accuracy", {})
    except (OSError, ValueError):
        return {}


def model_markdown(model_path: str) -> str:
    """What the page says about the loaded model: the built-in one's limits, or another folder's name."""
    if is_builtin(model_path):
        text = ("**Model: llava-drip-tiny, the built-in tiny LLaVA-DRIP.** It was trained on a CPU on synthetic "
                "scenes of coloured shapes only: ask about the colour, shape, count or position of the shapes in "
                "scenes like the examples. It answers any other image, a real photo too, with talk of shapes. "
                "To chat about real images, load a real checkpoint: `llava-drip demo --model-path DIR`.")
        held = _heldout(model_path)
        if held:
            text += " Right on held-out scenes: " + ", ".join(f"{k} {100 * v:.0f} %" for k, v in held.items()) + "."
        return text
    name = os.path.basename(os.path.normpath(model_path))
    return f"**Model: {name}** (`{model_path}`)"


def _stats_markdown(summary: str, stats: Optional[ChatStats] = None) -> str:
    text = f"**{summary}**"
    if stats is not None:
        visual = f" ({stats.visual_tokens_out} visual)" if stats.visual_tokens_in else ""
        text += (f"\n\nlast answer: prompt {stats.prompt_tokens} tokens{visual}, "
                 f"{stats.generated_tokens} generated, {stats.latency_s:.2f} s")
    return text


# the budget control: a mode and a ratio r (tokens per patch); see llava_drip.drip.budget
MODE_DEFAULT, MODE_EXACT, MODE_MEAN = "model default", "exactly r·N per image", "mean r·N (image-dependent)"
DEFAULT_RATIO = 0.25


def budget_spec(mode: str, ratio: float) -> Optional[str]:
    """The demo's budget control -> a budget spec: '0.25' (exactly), 'mean:0.25', or None (the model's default)."""
    if mode == MODE_DEFAULT:
        return None
    from llava_drip.drip.budget import Budget

    from .engine import budget_text
    r = round(float(ratio), 4)  # slider floats: 0.30000000000000004 -> 0.3
    if mode == MODE_EXACT:
        return budget_text(Budget("ratio", r))
    if mode == MODE_MEAN:
        return budget_text(Budget("mean", r))
    raise ValueError(f"unknown budget mode {mode!r}; expected one of {(MODE_DEFAULT, MODE_EXACT, MODE_MEAN)}")


def budget_modes(engine: ChatEngine) -> List[str]:
    """The modes this model offers: none for a tower that keeps every patch, no mean without calibration."""
    kinds = engine.budget_kinds
    if not kinds:
        return []
    return [MODE_DEFAULT, MODE_EXACT] + ([MODE_MEAN] if "mean" in kinds else [])


@dataclass
class Upload:
    """What one upload became, kept in a gr.State so an image is decoded and encoded once, not per event.

    `tokens` are at the model's default budget; other budgets are re-counted from the same pixels."""
    key: str  # which upload (Gradio's cached path, or a hash of pasted bytes)
    tokens: Optional[ImageTokens] = None
    error: Optional[str] = None  # one line naming the problem, when the image cannot be used


def _upload_key(image) -> Optional[str]:
    if image is None:
        return None
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if isinstance(image, bytes):
        return "bytes:" + hashlib.sha1(image).hexdigest()
    return f"pil:{id(image)}"  # an already decoded image (callers other than the page)


def _warn(message: str) -> None:
    """A yellow toast on the page (a plain warning outside Gradio); Gradio renders it as HTML."""
    import gradio as gr
    gr.Warning(html.escape(message))


class DemoActions:
    """The demo's callbacks on one engine, kept apart from the layout so tests can call them directly.

    An image arrives as a file path (what the page's upload component hands over, undecoded), bytes, or a
    PIL image; `cache` is the gr.State holding the `Upload` of the current image."""

    def __init__(self, engine: ChatEngine):
        self.engine = engine

    def upload(self, image, cache: Optional[Upload] = None) -> Optional[Upload]:
        """The Upload of `image`: `cache` when it is the same upload, else read and encoded now."""
        key = _upload_key(image)
        if key is None:
            return None
        if cache is not None and cache.key == key:
            return cache
        from llava_drip.image_io import ImageError, open_image, to_rgb
        try:
            if isinstance(image, Image.Image):
                pil = to_rgb(image)
            else:  # the project's reader: pixel limit before decoding, EXIF, 16-bit, alpha over white
                name = os.path.basename(image) if isinstance(image, str) else None
                pil = open_image(image, name=name)
            return Upload(key, tokens=self.engine.encode_image(pil))
        except (ImageError, ValueError) as e:
            return Upload(key, error=str(e))

    def _at_budget(self, up: Upload, mode: str, ratio: float) -> ImageTokens:
        """The upload's tokens re-counted at the chosen budget, from the pixels encoded once."""
        spec = budget_spec(mode, ratio)
        # the engine's re-count of an ImageTokens at another budget (what chat/stream do with one)
        return self.engine._image_tokens(up.tokens, self.engine.resolve_budget(spec))

    def show_image(self, image, mode: str, ratio: float, cache: Optional[Upload] = None):
        """(token-count markdown, boundary map, Upload) of the image at the chosen budget."""
        up = self.upload(image, cache)
        if up is None:
            return _stats_markdown(NO_IMAGE_TEXT), None, None
        if up.error:
            if up is not cache:  # once per upload, not again at each budget change
                _warn(up.error)
            return _stats_markdown(BAD_IMAGE_TEXT.format(error=up.error)), None, up
        from .engine import visual_token_summary
        from .viz import boundary_map
        try:
            tokens = self._at_budget(up, mode, ratio)
        except ValueError as e:  # a budget this model cannot serve: say so, keep the last good count
            _warn(str(e))
            return _stats_markdown(f"Budget not applied: {e}"), None, up
        viz = boundary_map(self.engine.vision_tower, tokens.pixel_values, self.engine.image_processor,
                           budget=tokens.budget)
        summary = visual_token_summary(tokens.tokens_in, tokens.tokens_out, self.engine.budget_label(tokens.budget))
        return _stats_markdown(summary), viz, up

    def on_image(self, image, mode: str, ratio: float, cache: Optional[Upload] = None):
        """A new image starts a new conversation: (markdown, map, chatbot, history, Upload)."""
        text, viz, up = self.show_image(image, mode, ratio, cache)
        return text, viz, [], [], up

    def on_mode(self, image, mode: str, ratio: float, cache: Optional[Upload] = None):
        """(markdown, map, slider update, Upload): the ratio slider only means something away from the default."""
        import gradio as gr
        text, viz, up = self.show_image(image, mode, ratio, cache)
        return text, viz, gr.update(interactive=mode != MODE_DEFAULT), up

    def answer(self, image, history: list, temperature: float, top_p: float, max_tokens: int,
               mode: str = MODE_DEFAULT, ratio: float = DEFAULT_RATIO, cache: Optional[Upload] = None):
        """Stream the answer to the last user turn: yields (chatbot, history, markdown update, Upload).

        A problem (an unusable image, a budget, a prompt over the context, a failed generation) is one
        line in a toast and in the chat, and the failed question is left out of the history, so the next
        question is answered as usual."""
        import gradio as gr

        from .engine import visual_token_summary
        if not history or history[-1]["role"] != "user":
            yield history, history, gr.update(), cache
            return
        up = self.upload(image, cache)  # normally cached by on_image; a question sent at once encodes it here
        tokens = up.tokens if up is not None else None
        shown = history + [{"role": "assistant", "content": ""}]
        try:
            stream = self.engine.stream(history, tokens, temperature=temperature, top_p=top_p,
                                        max_new_tokens=int(max_tokens), budget=budget_spec(mode, ratio))
            for _ in stream:
                shown[-1] = {"role": "assistant", "content": stream.text}
                yield shown, history, gr.update(), up
        except Exception as e:  # noqa: BLE001  (whatever it is, the page says it and stays usable)
            _warn(f"not answered: {e}")
            shown[-1] = {"role": "assistant", "content": f"(not answered: {e})"}
            yield shown, history[:-1], gr.update(), up
            return
        history = history + [{"role": "assistant", "content": stream.text}]
        s = stream.stats
        if s.visual_tokens_in:
            summary = visual_token_summary(s.visual_tokens_in, s.visual_tokens_out, self.engine.budget_label(s.budget))
        elif up is not None and up.error:
            summary = BAD_IMAGE_TEXT.format(error=up.error)
        else:
            summary = NO_IMAGE_TEXT
        yield history, history, _stats_markdown(summary, s), up


def _upload_component(**kwargs):
    """gr.Image that hands the callbacks the uploaded file as it is, undecoded.

    Gradio's own Image decodes (and, in RGB mode, flattens) every upload before any callback runs, and a
    file it cannot decode ends in a bare "Error" badge; passing the path on lets llava_drip.image_io read
    it once, with its limits and messages."""
    import gradio as gr

    class UploadImage(gr.Image):
        is_template = True  # rendered by the page as the ordinary Image component

        def preprocess(self, payload):
            if payload is None:
                return None
            if payload.path:
                return str(payload.path)
            if payload.url and payload.url.startswith("data:"):  # pasted: the bytes themselves
                import base64
                import binascii
                try:
                    return base64.b64decode(payload.url.split(",", 1)[1])
                except (binascii.Error, IndexError):
                    return b"(not base64)"  # image_io then says it is not an image, in the usual words
            return None

    return UploadImage(type="filepath", image_mode=None, **kwargs)


def build_demo(engine: ChatEngine, examples: Sequence[Tuple[str, str]] = ()):
    """The Blocks app (not launched). Conversation state lives in a gr.State of plain messages."""
    import gradio as gr

    actions = DemoActions(engine)

    def add_user(text: str, history: list):
        text = (text or "").strip()
        if not text:
            return gr.update(), history, history
        history = history + [{"role": "user", "content": text}]
        return "", history, history

    modes = budget_modes(engine)
    with gr.Blocks(title="LLaVA-DRIP", analytics_enabled=False) as demo:
        gr.Markdown("# LLaVA-DRIP\nLLaVA whose vision tower (DRIP) pools image patches into fewer, "
                    "variable-count segments. The map shows each segment in its own colour.")
        history = gr.State([])
        upload = gr.State(None)  # the current image's Upload: decoded and encoded once
        with gr.Row():
            with gr.Column(scale=2):
                image = _upload_component(label="Image", sources=["upload", "clipboard"], height=300,
                                          elem_id="drip-image")
                with gr.Group(visible=bool(modes)):  # a tower that keeps every patch has no budget
                    mode = gr.Radio(modes or [MODE_DEFAULT], value=MODE_DEFAULT, label="Visual-token budget",
                                    info="N = patches; applies to the map now and to the next answer",
                                    elem_id="drip-budget-mode")
                    ratio = gr.Slider(0.05, 1.0, value=DEFAULT_RATIO, step=0.05, label="r (tokens per patch)",
                                      interactive=False, elem_id="drip-ratio")
                tokens_md = gr.Markdown(_stats_markdown(NO_IMAGE_TEXT), elem_id="drip-tokens")
                viz = gr.Image(type="pil", label="DRIP boundary map", interactive=False, height=300,
                               elem_id="drip-map")
            with gr.Column(scale=3):
                gr.Markdown(model_markdown(engine.model_path), elem_id="drip-model")
                chatbot = gr.Chatbot(label="Chat", height=460, elem_id="chat")
                with gr.Row():
                    textbox = gr.Textbox(label="Question", placeholder="Ask about the image (Enter sends)", show_label=False,
                                         scale=5, elem_id="question")
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                with gr.Accordion("Parameters", open=False):
                    temperature = gr.Slider(0.0, 1.0, value=0.2, step=0.05, label="Temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=0.7, step=0.05, label="Top P")
                    max_tokens = gr.Slider(8, 512, value=128, step=8, label="Max new tokens")
                clear = gr.Button("Clear chat")
        if examples:
            gr.Examples([[p, q] for p, q in examples], inputs=[image, textbox], label="Examples")

        budget_inputs = [image, mode, ratio, upload]
        image.change(actions.on_image, budget_inputs, [tokens_md, viz, chatbot, history, upload])
        mode.change(actions.on_mode, budget_inputs, [tokens_md, viz, ratio, upload])
        ratio.change(actions.show_image, budget_inputs, [tokens_md, viz, upload])  # the chat carries on
        for trigger in (textbox.submit, send.click):
            trigger(add_user, [textbox, history], [textbox, chatbot, history]).then(
                actions.answer, [image, history, temperature, top_p, max_tokens, mode, ratio, upload],
                [chatbot, history, tokens_md, upload])
        clear.click(lambda: ([], [], ""), None, [chatbot, history, textbox])
    return demo


def launch(demo, host: str = "127.0.0.1", port: Optional[int] = None, share: bool = False,
           max_upload_mb: float = MAX_UPLOAD_MB):
    """Queue and start `demo` without blocking. Uploads over `max_upload_mb` are refused by Gradio before
    they reach the temp folder; an unexpected exception shows its message, never a bare "Error"."""
    # each user's answer is its own event: let up to a batch of them reach the engine, which decodes them together
    demo.queue(default_concurrency_limit=DEFAULT_MAX_BATCH_SIZE).launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=True,
                        max_file_size=int(max_upload_mb * 1e6), show_error=True)
    return demo


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="llava-drip demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help=model_path_help())
    p.add_argument("--model-base", default=None, help="base LLM for LoRA / projector checkpoints")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 exposes it on the network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--device", default="cpu")
    add_dtype_arg(p)
    p.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB,
                   help=f"largest image upload in MB (default {MAX_UPLOAD_MB:g}, the API's --max-body-mb default)")
    args = p.parse_args(argv)

    model_path = resolve_model_path(args.model_path)
    print(f"loading {model_path} on {args.device}", flush=True)
    from .engine import ChatEngine
    engine = ChatEngine(model_path, model_base=args.model_base, device=args.device, dtype=args.dtype)
    examples = example_images(tempfile.mkdtemp(prefix="llava-drip-demo-"), photos=not is_builtin(model_path))
    demo = build_demo(engine, examples)
    launch(demo, args.host, args.port, args.share, args.max_upload_mb)
    try:
        print(f"LLaVA-DRIP demo at {demo.local_url}" + (f" and {demo.share_url}" if demo.share_url else "")
              + " (Ctrl-C stops it)", flush=True)
        demo.block_thread()  # returns on Ctrl-C
    except KeyboardInterrupt:  # Ctrl-C before block_thread took over
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
