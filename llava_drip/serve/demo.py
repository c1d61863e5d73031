"""`llava-drip demo`: a Gradio chat with LLaVA-DRIP that shows how many visual tokens DRIP kept.

Upload an image (it starts a new conversation, as in LLaVA's demo), ask questions, and read the
token count and the boundary map of the image. The budget control under the image re-pools it at
another visual-token budget (exactly r N tokens, or r N on average) without retraining, and the next
answer uses it. Without --model-path it serves the built-in tiny model shipped in llava_drip/assets
(llava_drip/serve/builtin.py); the page says which model it serves, and that the built-in one knows
only synthetic shape scenes.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import List, Optional, Sequence, Tuple

from PIL import Image

# the engine and the budgets load torch, gradio takes seconds too: imported where used, so `--help` is fast
from .builtin import is_builtin, model_path_help, resolve_model_path

NO_IMAGE_TEXT = "No image: text-only chat. Upload one to see how many visual tokens DRIP keeps."

# (scene, question, the word a right answer names): scenes the built-in model was not trained on (stream 1000),
# questions of the kinds it was trained on; tests/test_builtin_model.py checks it answers each one right
EXAMPLES = (
    (("hexagon", "black", "large", "bottom", 1, "noise"), "What shape is shown in the image?", "hexagon"),
    (("circle", "red", "large", "left", 3, "stripes"), "How many shapes are there in the image?", "three"),
    (("star", "blue", "large", "center", 2, "dots"), "Where are the stars located?", "center"),
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


class DemoActions:
    """The demo's callbacks on one engine, kept apart from the layout so tests can call them directly."""

    def __init__(self, engine: ChatEngine):
        self.engine = engine

    def show_image(self, image: Optional[Image.Image], mode: str, ratio: float) -> Tuple[str, Optional[Image.Image]]:
        """(token-count markdown, boundary map) of the image at the chosen budget."""
        if image is None:
            return _stats_markdown(NO_IMAGE_TEXT), None
        from .engine import visual_token_summary
        from .viz import boundary_map
        try:
            tokens = self.engine.encode_image(image, budget_spec(mode, ratio))
        except ValueError as e:
            import gradio as gr
            raise gr.Error(str(e)) from e
        viz = boundary_map(self.engine.vision_tower, tokens.pixel_values, self.engine.image_processor,
                           budget=tokens.budget)
        summary = visual_token_summary(tokens.tokens_in, tokens.tokens_out, self.engine.budget_label(tokens.budget))
        return _stats_markdown(summary), viz

    def on_image(self, image, mode: str, ratio: float):
        """A new image starts a new conversation: (markdown, map, chatbot, history)."""
        return (*self.show_image(image, mode, ratio), [], [])

    def on_mode(self, image, mode: str, ratio: float):
        """(markdown, map, slider update): the ratio slider only means something away from the default."""
        import gradio as gr
        return (*self.show_image(image, mode, ratio), gr.update(interactive=mode != MODE_DEFAULT))

    def answer(self, image, history: list, temperature: float, top_p: float, max_tokens: int,
               mode: str = MODE_DEFAULT, ratio: float = DEFAULT_RATIO):
        """Stream the answer to the last user turn: yields (chatbot, history, markdown update)."""
        import gradio as gr

        from .engine import visual_token_summary
        if not history or history[-1]["role"] != "user":
            yield history, history, gr.update()
            return
        try:
            stream = self.engine.stream(history, image, temperature=temperature, top_p=top_p,
                                        max_new_tokens=int(max_tokens), budget=budget_spec(mode, ratio))
        except ValueError as e:  # e.g. a conversation longer than the model's context
            raise gr.Error(str(e)) from e
        shown = history + [{"role": "assistant", "content": ""}]
        for piece in stream:
            shown[-1] = {"role": "assistant", "content": stream.text}
            yield shown, history, gr.update()
        history = history + [{"role": "assistant", "content": stream.text}]
        s = stream.stats
        summary = (visual_token_summary(s.visual_tokens_in, s.visual_tokens_out, self.engine.budget_label(s.budget))
                   if s.visual_tokens_in else NO_IMAGE_TEXT)
        yield history, history, _stats_markdown(summary, s)


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
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(type="pil", label="Image", sources=["upload", "clipboard"], height=300)
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

        budget_inputs = [image, mode, ratio]
        image.change(actions.on_image, budget_inputs, [tokens_md, viz, chatbot, history])
        mode.change(actions.on_mode, budget_inputs, [tokens_md, viz, ratio])
        ratio.change(actions.show_image, budget_inputs, [tokens_md, viz])  # the chat carries on
        for trigger in (textbox.submit, send.click):
            trigger(add_user, [textbox, history], [textbox, chatbot, history]).then(
                actions.answer, [image, history, temperature, top_p, max_tokens, mode, ratio],
                [chatbot, history, tokens_md])
        clear.click(lambda: ([], [], ""), None, [chatbot, history, textbox])
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
    args = p.parse_args(argv)

    model_path = resolve_model_path(args.model_path)
    print(f"loading {model_path} on {args.device}", flush=True)
    from .engine import ChatEngine
    engine = ChatEngine(model_path, model_base=args.model_base, device=args.device)
    examples = example_images(tempfile.mkdtemp(prefix="llava-drip-demo-"), photos=not is_builtin(model_path))
    demo = build_demo(engine, examples)
    demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share,
                        prevent_thread_lock=True, quiet=True)
    try:
        print(f"LLaVA-DRIP demo at {demo.local_url}" + (f" and {demo.share_url}" if demo.share_url else "")
              + " (Ctrl-C stops it)", flush=True)
        demo.block_thread()  # returns on Ctrl-C
    except KeyboardInterrupt:  # Ctrl-C before block_thread took over
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
