"""Fault injection for the kill -9 tests: run a training CLI and SIGKILL it while a chosen checkpoint file
is being written, leaving on disk exactly what a kill at that point leaves.

    python tests/kill_plant.py clip-train ARGS...   |   python tests/kill_plant.py train ARGS...

LLAVA_DRIP_KILL_FILE   path suffix of the file, e.g. "epoch_2.pt", "checkpoint-2/optimizer.pt",
                       "checkpoint-2/model.safetensors", "checkpoint-2/trainer_state.json"
LLAVA_DRIP_KILL_BYTES  bytes of it that reach the disk before the kill; -1: kill just after it is complete
"""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET = os.environ["LLAVA_DRIP_KILL_FILE"]
BYTES = int(os.environ.get("LLAVA_DRIP_KILL_BYTES", "-1"))


def _hit(path) -> bool:
    return str(path).replace(os.sep, "/").endswith(TARGET)


def _die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _cut(path):
    if BYTES >= 0:
        with open(path, "r+b") as f:
            f.truncate(min(BYTES, os.path.getsize(path)))
        _die()


def install():
    real_replace = os.replace

    def replace(src, dst, *a, **k):  # atomic writes: the temporary file is cut, the name never appears
        if _hit(dst):
            _cut(src)
            real_replace(src, dst, *a, **k)
            _die()
        return real_replace(src, dst, *a, **k)

    os.replace = replace

    import safetensors.torch as st
    real_save_file = st.save_file

    def save_file(tensors, filename, *a, **k):  # written in place by transformers
        real_save_file(tensors, filename, *a, **k)
        if _hit(filename):
            _cut(filename)
            _die()

    st.save_file = save_file
    import transformers.modeling_utils as mu
    mu.safe_save_file = save_file  # imported by name there

    from transformers import trainer_callback
    real_state_save = trainer_callback.TrainerState.save_to_json

    def save_to_json(self, json_path):
        real_state_save(self, json_path)
        if _hit(json_path):
            _cut(json_path)
            _die()

    trainer_callback.TrainerState.save_to_json = save_to_json


if __name__ == "__main__":
    install()
    cmd, argv = sys.argv[1], sys.argv[2:]
    if cmd == "clip-train":
        from llava_drip.clip import train as clip_train
        sys.exit(clip_train.main(argv))
    from llava_drip.train import train
    sys.argv = ["train.py"] + argv
    train.main()
