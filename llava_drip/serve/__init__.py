"""Serving LLaVA-DRIP: a shared engine (engine.ChatEngine) behind the Gradio demo (demo.py), the
terminal chat (cli.py) and the OpenAI-compatible HTTP API (api.py). See docs/serve.md.

Nothing is imported here, so `llava-drip chat --help` and argument errors stay fast (no torch).
"""
