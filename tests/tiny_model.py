"""Shared tiny LLaVA-DRIP for tests: `from tiny_model import tiny_llava` in a test module.

tests/ has no __init__.py, so pytest puts it on sys.path and this module imports by name.
LLAVA_DRIP_TINY_MODEL=DIR (a finished stage-2 folder) skips the build; otherwise one small model is
built per session. Each importing module registers its own copy of the fixture, so the build
result is cached here at module level to build only once per session.
"""
import os

import pytest

_BUILT: dict = {}


def tiny_model_path(tmp_path_factory) -> str:
    env = os.environ.get("LLAVA_DRIP_TINY_MODEL")
    if env:
        if not os.path.isfile(os.path.join(env, "config.json")):
            raise FileNotFoundError(f"LLAVA_DRIP_TINY_MODEL={env} has no config.json")
        return env
    if "path" not in _BUILT:
        from llava_drip.train import tiny_pipeline
        out = tmp_path_factory.mktemp("tiny-llava")
        # small and short: enough for the serving path to answer, not to answer well
        # calibrated boundaries (the default): image-dependent counts around p N
        _BUILT["path"] = tiny_pipeline.build(str(out), n=120, lm_steps=40, stage2_epochs=1, clip_epochs=0)
    return _BUILT["path"]


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> str:
    """Path of a tiny trained stage-2 LLaVA-DRIP folder (load with load_pretrained_model)."""
    return tiny_model_path(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_engine(tiny_llava):
    """A ChatEngine on the tiny model, loaded once per session."""
    if "engine" not in _BUILT:
        from llava_drip.serve.engine import ChatEngine
        _BUILT["engine"] = ChatEngine(tiny_llava)
    return _BUILT["engine"]
