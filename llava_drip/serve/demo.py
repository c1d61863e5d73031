"""`llava-drip demo`: a Gradio chat with LLaVA-DRIP that shows how many visual tokens DRIP kept.

Upload an image (it starts a new conversation, as in LLaVA's demo), ask questions, and read the
token count and the boundary map of the image. Without --model-path it serves the built-in tiny
model, building it on first use (a few minutes on CPU, cached in llava_drip.train.tiny_pipeline.DEFAULT_CACHE).
"""
import argparse
import os
import sys
import tempfile
from typing import List, Optional, Sequence, Tuple

from PIL import Image

from .engine import ChatEngine, ChatStats, visual_token_summary
from .viz import boundary_map

EXAMPLE_QUESTIONS = ("What color are the shapes in the image?", "Where is the hexagon located?",
                     "Give a detailed description of the image.")
NO_IMAGE_TEXT = "No image: text-only chat. Upload one to see how many visual tokens DRIP keeps."


def example_images(out_dir: str, size: int = 224) -> List[Tuple[str, str]]:
    """Draw a few synthetic shape scenes (like the tiny model's training data) into out_dir.

    Returns [(image path, question)]. Real photos are added when LLAVA_DRIP_DATA holds them.
    """
    from llava_drip.data.shapes import Scene, render, rng_for
    scenes = [(Scene("hexagon", "black", "large", "bottom", 1, "noise"), EXAMPLE_QUESTIONS[1]),
              (Scene("circle", "red", "small", "left", 3, "stripes"), EXAMPLE_QUESTIONS[0]),
              (Scene("star", "blue", "large", "center", 2, "dots"), EXAMPLE_QUESTIONS[2])]
    os.makedirs(out_dir, exist_ok=True)
    out = []
    for i, (scene, question) in enumerate(scenes):
        path = os.path.join(out_dir, f"{scene.color}_{scene.shape}.png")
        render(scene, rng_for(0, 1000, i), image_size=size).save(path)  # stream 1000: no training image
        out.append((path, question))
    photo = os.path.join(os.environ.get("LLAVA_DRIP_DATA", ""), "images", "extreme_ironing.jpg")
    if os.environ.get("LLAVA_DRIP_DATA") and os.path.isfile(photo):
        out.append((photo, "What is unusual about this image?"))
    return out


def _stats_markdown(summary: str, stats: Optional[ChatStats] = None) -> str:
    text = f"**{summary}**"
    if stats is not None:
        visual = f" ({stats.visual_tokens_out} visual)" if stats.visual_tokens_in else ""
        text += (f"\n\nlast answer: prompt {stats.prompt_tokens} tokens{visual}, "
                 f"{stats.generated_tokens} generated, {stats.latency_s:.2f} s")
    return text


def build_demo(engine: ChatEngine, examples: Sequence[Tuple[str, str]] = ()):
    """The Blocks app (not launched). Conversation state lives in a gr.State of plain messages."""
    import gradio as gr

    def on_image(image: Optional[Image.Image]):
        if image is None:
            return _stats_markdown(NO_IMAGE_TEXT), None, [], []
        tokens = engine.encode_image(image)
        viz = boundary_map(engine.vision_tower, tokens.pixel_values, engine.image_processor)
        return _stats_markdown(visual_token_summary(tokens.tokens_in, tokens.tokens_out)), viz, [], []

    def add_user(text: str, history: list):
        text = (text or "").strip()
        if not text:
            return gr.update(), history, history
        history = history + [{"role": "user", "content": text}]
        return "", history, history

    def answer(image, history: list, temperature: float, top_p: float, max_tokens: int):
        if not history or history[-1]["role"] != "user":
            yield history, history, gr.update()
            return
        try:
            stream = engine.stream(history, image, temperature=temperature, top_p=top_p,
                                   max_new_tokens=int(max_tokens))
        except ValueError as e:  # e.g. a conversation longer than the model's context
            raise gr.Error(str(e)) from e
        shown = history + [{"role": "assistant", "content": ""}]
        for piece in stream:
            shown[-1] = {"role": "assistant", "content": stream.text}
            yield shown, history, gr.update()
        history = history + [{"role": "assistant", "content": stream.text}]
        s = stream.stats
        summary = visual_token_summary(s.visual_tokens_in, s.visual_tokens_out) if s.visual_tokens_in else NO_IMAGE_TEXT
        yield history, history, _stats_markdown(summary, s)

    with gr.Blocks(title="LLaVA-DRIP", analytics_enabled=False) as demo:
        gr.Markdown("# LLaVA-DRIP\nLLaVA whose vision tower (DRIP) pools image patches into fewer, "
                    "variable-count segments. The map shows each segment in its own colour.")
        history = gr.State([])
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(type="pil", label="Image", sources=["upload", "clipboard"], height=300)
                tokens_md = gr.Markdown(_stats_markdown(NO_IMAGE_TEXT), elem_id="drip-tokens")
                viz = gr.Image(type="pil", label="DRIP boundary map", interactive=False, height=300,
                               elem_id="drip-map")
            with gr.Column(scale=3):
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

        image.change(on_image, [image], [tokens_md, viz, chatbot, history])
        for trigger in (textbox.submit, send.click):
            trigger(add_user, [textbox, history], [textbox, chatbot, history]).then(
                answer, [image, history, temperature, top_p, max_tokens], [chatbot, history, tokens_md])
        clear.click(lambda: ([], [], ""), None, [chatbot, history, textbox])
    return demo


def resolve_model_path(model_path: Optional[str]) -> str:
    """The given folder, or the built-in tiny model (built on first use)."""
    if model_path:
        return model_path
    from llava_drip.train import tiny_pipeline
    final = os.path.join(tiny_pipeline.DEFAULT_CACHE, "stage2")
    if not os.path.isfile(os.path.join(final, "llava_drip_train.json")):
        print(f"no --model-path: building the built-in tiny model in {tiny_pipeline.DEFAULT_CACHE} "
              "(synthetic data, tiny Llama, stage 1 and 2 on CPU; a few minutes, once)", flush=True)
    else:
        print(f"no --model-path: using the built-in tiny model {final}", flush=True)
    return tiny_pipeline.build(tiny_pipeline.DEFAULT_CACHE)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="llava-drip demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="model folder (default: the built-in tiny model)")
    p.add_argument("--model-base", default=None, help="base LLM for LoRA / projector checkpoints")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 exposes it on the network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    model_path = resolve_model_path(args.model_path)
    print(f"loading {model_path} on {args.device}", flush=True)
    engine = ChatEngine(model_path, model_base=args.model_base, device=args.device)
    examples = example_images(tempfile.mkdtemp(prefix="llava-drip-demo-"))
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
