"""`llava-drip clip-train` on open_clip_train's own loop: learning, checkpoints, resume, guards, bad rows.

Runs are in-process (the hooks are scoped to each call) on the synthetic coloured-shape set,
fp32 on CPU, with a handful of steps each. Nothing here asserts on wall-clock time.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llava_drip.drip as drip
from llava_drip.clip import train as clip_train
from llava_drip.clip import zeroshot
from llava_drip.utils import atomic_save_tensors
from llava_drip.clip.loss import DRIPLoss
from llava_drip.clip.monitor import NonFiniteLossError, StepMonitor, instrument_optimizer
from llava_drip.data import synth_clip

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    assert synth_clip.main(["--out", str(out), "--n", "96", "--val-per-class", "3", "--seed", "0", "--quiet"]) == 0
    # a 6-class zero-shot set (class names in sorted folder order); open_clip_train's top-5 needs >= 5
    classes = sorted(p.name for p in (out / "val").iterdir())[:6]
    small = out / "val6"
    for c in classes:
        shutil.copytree(out / "val" / c, small / c)
    (out / "classnames6.txt").write_text("\n".join(c.replace("_", " ") for c in classes) + "\n")
    lines = (out / "train.csv").read_text().splitlines()
    (out / "train48.csv").write_text("\n".join(lines[:49]) + "\n")  # header + 48 rows, for the longer tests
    return out


def _base(data: Path, logs: Path, name: str, model="DRIP-4x-tiny", epochs=1, batch=16, csv=None):
    return ["--model", model, "--train-data", str(csv or data / "train.csv"), "--dataset-type", "csv",
            "--batch-size", str(batch), "--epochs", str(epochs), "--lr", "2e-3", "--warmup", "2",
            "--wd", "0.1", "--precision", "fp32", "--device", "cpu", "--workers", "0", "--seed", "0",
            "--logs", str(logs), "--name", name, "--zeroshot-frequency", "0", "--log-every-n-steps", "2"]


def _steps(run_dir: Path):
    return [json.loads(ln) for ln in (run_dir / "steps.jsonl").read_text().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def one_epoch(synth, tmp_path_factory):
    """One epoch of DRIP-4x-tiny with the in-training zero-shot on a 6-class val set."""
    logs = tmp_path_factory.mktemp("logs")
    argv = _base(synth, logs, "one") + [
        "--imagenet-val", str(synth / "val6"), "--zeroshot-frequency", "1",
        "--zeroshot-classnames", str(synth / "classnames6.txt"), "--zeroshot-templates", str(synth / "templates.txt")]
    assert clip_train.main(argv) == 0
    return logs / "one"


def test_one_epoch_learns_and_checkpoints(one_epoch):
    steps = _steps(one_epoch)
    assert len(steps) == 96 // 16
    assert [s["step"] for s in steps] == list(range(6))
    losses = [s["contrastive_loss"] for s in steps]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses
    assert all(0.0 < s["boundary_ratio"] < 1.0 for s in steps)
    assert all(s["boundary_loss"] > 0 for s in steps)  # the prior reaches the optimiser through the loss dict

    ckpt = one_epoch / "checkpoints" / "epoch_1.pt"
    model = drip.create_model("DRIP-4x-tiny")
    drip.load_checkpoint(model, ckpt, strict=True)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    sched = saved["optimizer"]["param_groups"][0][clip_train.SCHEDULE_KEY]
    assert sched == {"lr_scheduler": "cosine", "lr": 2e-3, "warmup": 2, "epochs": 1, "total_steps": 6,
                     "samples_per_epoch": 96, "batch_size": 16, "world_size": 1, "accum_freq": 1}

    eff = json.loads((one_epoch / "efficiency.json").read_text())
    (ep,) = eff["epochs"]
    assert ep["epoch"] == 0 and ep["steps"] == 6 and ep["skipped_steps"] == 0
    assert ep["avg_step_time_s"] > 0 and ep["avg_peak_memory_mb"] > 0
    assert 0 < ep["avg_boundary_ratio"] < 1 and eff["memory_metric"].startswith("cpu_peak_rss")

    params = (one_epoch / "params.txt").read_text()
    assert "grad_clip_norm: 1.0" in params  # DRIP default when the flag is not given
    zs = json.loads((one_epoch / "checkpoints" / "results.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= zs["imagenet-zeroshot-val-top1"] <= zs["imagenet-zeroshot-val-top5"] <= 1.0

    # the run ends by calibrating the final checkpoint on the held-out zero-shot images
    cal = json.loads((one_epoch / "calibration.json").read_text())
    assert cal["checkpoint"] == str(ckpt) and cal["calibration"]["images"] == 18
    assert cal["calibration"]["mean_ratio"] == pytest.approx(0.25, abs=0.02)
    assert model.visual.is_calibrated and float(model.visual.calib_target) == pytest.approx(0.25)


def test_zeroshot_cli(one_epoch, synth, capsys):
    ckpt = one_epoch / "checkpoints" / "epoch_1.pt"
    rc = zeroshot.main(["--model", "DRIP-4x-tiny", "--checkpoint", str(ckpt), "--data", str(synth / "val6"),
                        "--classnames", str(synth / "classnames6.txt"), "--templates", str(synth / "templates.txt"),
                        "--eval-mode", "topk", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["num_images"] == 18 and res["num_classes"] == 6
    assert 0.0 <= res["top1"] <= res["top5"] <= 1.0
    assert res["eval_mode"] == "topk" and res["group_ratio"] == pytest.approx(0.25, abs=0.02)

    # 48 names for a 6-folder set is refused, naming the folder
    rc = zeroshot.main(["--model", "DRIP-4x-tiny", "--checkpoint", str(ckpt), "--data", str(synth / "val6"),
                        "--classnames", str(synth / "classnames.txt")])
    assert rc == 2
    assert "6 class folders but 48 class names" in capsys.readouterr().err


def test_resume_continues_schedule_exactly(synth, tmp_path):
    """2 epochs straight == 1 epoch, stop, resume latest, 1 epoch: same LR and loss at every step."""
    model = "DRIP-2x-tiny"  # samples boundaries: also checks the per-epoch reseeding
    small = dict(model=model, batch=8, csv=synth / "train48.csv")  # 6 steps per epoch
    straight = _base(synth, tmp_path, "straight", epochs=2, **small)
    assert clip_train.main(straight) == 0
    split = _base(synth, tmp_path, "split", epochs=2, **small)
    assert clip_train.main(split + ["--stop-after-epoch", "1"]) == 0
    assert not (tmp_path / "split" / "checkpoints" / "epoch_2.pt").exists()
    assert clip_train.main(split + ["--resume", "latest"]) == 0

    a, b = _steps(tmp_path / "straight"), _steps(tmp_path / "split")
    assert len(a) == len(b) == 12
    for x, y in zip(a, b):
        assert x["step"] == y["step"]
        assert y["lr"] == pytest.approx(x["lr"], rel=1e-12, abs=0)
        for key in ("contrastive_loss", "boundary_loss", "boundary_ratio"):
            assert y[key] == pytest.approx(x[key], abs=1e-6), (x["step"], key)
    sd_a = torch.load(tmp_path / "straight" / "checkpoints" / "epoch_2.pt", weights_only=True)["state_dict"]
    sd_b = torch.load(tmp_path / "split" / "checkpoints" / "epoch_2.pt", weights_only=True)["state_dict"]
    assert all(torch.allclose(sd_a[k], sd_b[k], atol=1e-6, equal_nan=True) for k in sd_a)  # uncalibrated: NaN

    # a resume that changes the schedule is refused, then accepted with --force-schedule-change
    longer = _base(synth, tmp_path, "split", epochs=3, **small) + ["--resume", "latest"]
    assert clip_train.main(longer) == 2
    log = (tmp_path / "split" / "out.log").read_text()
    assert "would change the LR schedule: epochs 2 -> 3, total_steps 12 -> 18" in log
    assert clip_train.main(longer + ["--force-schedule-change"]) == 0
    assert (tmp_path / "split" / "checkpoints" / "epoch_3.pt").exists()


def test_nonfinite_step_is_skipped_and_counted():
    torch.manual_seed(0)
    model = drip.create_model("DRIP-4x-tiny")
    tok = drip.get_tokenizer("DRIP-4x-tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    from open_clip import ClipLoss
    monitor = StepMonitor(max_consecutive_skips=2)
    loss_fn = DRIPLoss(ClipLoss(), 1.0, monitor)
    images, texts = torch.randn(4, 3, 64, 64), tok(["one red circle."] * 4)

    def step(poison: bool):
        with instrument_optimizer(opt, None, monitor):
            opt.zero_grad()
            out = model(images, texts)
            if poison:
                out["boundary_loss"] = out["boundary_loss"] * float("nan")
            losses = loss_fn(**out, output_dict=True)
            sum(losses.values()).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

    step(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {id(p): s["exp_avg"].clone() for p, s in opt.state.items()}
    step(True)
    assert monitor.total_skips == 1 and monitor.consecutive_skips == 1
    same = lambda a, b: torch.equal(a.nan_to_num(), b.nan_to_num())  # the calibration buffer is NaN until calibrated
    assert all(same(before[k], v) for k, v in model.state_dict().items())  # no update, no weight decay
    assert all(torch.equal(moments[id(p)], s["exp_avg"]) for p, s in opt.state.items())
    step(False)
    assert monitor.consecutive_skips == 0 and monitor.total_skips == 1
    assert not all(same(before[k], v) for k, v in model.state_dict().items())
    step(True)
    with pytest.raises(NonFiniteLossError, match="2 consecutive steps had a non-finite loss"):
        step(True)


def test_run_stops_after_consecutive_nonfinite_losses(synth, tmp_path):
    model = drip.create_model("DRIP-4x-tiny")
    with torch.no_grad():
        model.logit_scale.fill_(float("nan"))  # every contrastive loss is NaN from the first step
    weights = atomic_save_tensors(model.state_dict(), tmp_path / "nan.safetensors")
    argv = _base(synth, tmp_path, "nan", batch=8) + ["--pretrained", str(weights), "--max-skipped-steps", "3"]
    assert clip_train.main(argv) == 1
    steps = _steps(tmp_path / "nan")
    assert len(steps) == 3 and all(s["skipped"] for s in steps)
    log = (tmp_path / "nan" / "out.log").read_text()
    assert "stopping: 3 consecutive steps had a non-finite loss" in log
    eff = json.loads((tmp_path / "nan" / "efficiency.json").read_text())
    assert eff["epochs"][0]["skipped_steps"] == 3 and eff["epochs"][0]["stopped"] == "NonFiniteLossError"
    assert not (tmp_path / "nan" / "checkpoints" / "epoch_1.pt").exists()


def test_bad_rows_are_skipped_and_reported(synth, tmp_path):
    lines = (synth / "train.csv").read_text().splitlines()
    header, rows = lines[0], lines[1:25]
    broken = tmp_path / "broken.png"
    good = Path(rows[0].split("\t")[0]).read_bytes()
    broken.write_bytes(good[: len(good) // 2])  # truncated PNG: opens, fails to decode
    rows[3] = f"{tmp_path / 'gone.png'}\t{rows[3].split(chr(9))[1]}"
    rows[7] = f"{broken}\t{rows[7].split(chr(9))[1]}"
    rows[9] = f"{rows[9].split(chr(9))[0]}\t "
    csv = tmp_path / "bad.csv"
    csv.write_text("\n".join([header] + rows) + "\n")

    assert clip_train.main(_base(synth, tmp_path, "bad", batch=8, csv=csv)) == 0
    report = json.loads((tmp_path / "bad" / "skipped_rows.json").read_text())["train"]
    assert report["rows"] == 24
    got = {(r["line"], Path(r["image"]).name): r["reason"] for r in report["skipped"]}
    assert set(got) == {(5, "gone.png"), (9, "broken.png"), (11, Path(rows[9].split("\t")[0]).name)}
    assert got[(5, "gone.png")] == "missing image"
    assert got[(9, "broken.png")].startswith("unreadable image")
    assert len(_steps(tmp_path / "bad")) == 21 // 8
    log = (tmp_path / "bad" / "out.log").read_text()
    assert "skipped 3 of 24 rows" in log and "gone.png" in log and "broken.png" in log

    # a wrong column name fails before training, naming the file and the column
    assert clip_train.main(_base(synth, tmp_path, "badkey", csv=csv) + ["--csv-img-key", "path"]) == 2
    assert f"{csv}: no column 'path'" in (tmp_path / "badkey" / "out.log").read_text()


def test_drip_only_flags_are_refused_for_vit(synth, tmp_path):
    with pytest.raises(SystemExit, match="--drip-eval-mode applies only to DRIP models"):
        clip_train.main(_base(synth, tmp_path, "vit", model="ViT-tiny") + ["--drip-eval-mode", "topk"])
    with pytest.raises(SystemExit, match="--accum-freq > 1 is not supported for DRIP"):
        clip_train.main(_base(synth, tmp_path, "acc") + ["--accum-freq", "2"])


@pytest.mark.slow
def test_torchrun_two_ranks_cpu(synth, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    # "--": torchrun's parser would read our --logs as an abbreviation of its --logs-specs
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "--", "llava_drip.cli", "clip-train",
           *_base(synth, tmp_path, "ddp", batch=8)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "ddp"
    assert (run / "checkpoints" / "epoch_1.pt").exists()
    eff = json.loads((run / "efficiency.json").read_text())
    assert eff["world_size"] == 2 and eff["epochs"][0]["steps"] == 96 // (8 * 2)
    saved = torch.load(run / "checkpoints" / "epoch_1.pt", weights_only=True)
    assert saved["optimizer"]["param_groups"][0][clip_train.SCHEDULE_KEY]["world_size"] == 2


class _Payload:
    """Unpickling this creates a marker file: stands in for any code a planted checkpoint would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_refuses_pickled_payload(synth, tmp_path):
    evil = tmp_path / "epoch_1.pt"
    marker = tmp_path / "payload-ran"
    torch.save({"epoch": 1, "state_dict": {}, "hook": _Payload(marker)}, evil)
    argv = _base(synth, tmp_path, "evil", batch=8, csv=synth / "train48.csv") + ["--resume", str(evil)]
    assert clip_train.main(argv) == 2
    assert not marker.exists()
    assert "refusing to load it" in (tmp_path / "evil" / "out.log").read_text()


def _clip_train_process(argv):
    # every run of a comparison in its own process: the thread count and RNG use of earlier tests in this
    # process would otherwise change the float results
    proc = subprocess.run([sys.executable, "-m", "llava_drip.cli", "clip-train", *argv],
                          env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]


def _kill_during_save(argv, target, nbytes):
    env = dict(os.environ, PYTHONPATH=str(REPO), LLAVA_DRIP_KILL_FILE=target, LLAVA_DRIP_KILL_BYTES=str(nbytes))
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "kill_plant.py"), "clip-train", *argv], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == -9, proc.stdout[-3000:]  # SIGKILL: it died in the save


def _kill_small(synth):
    return dict(model="ViT-tiny", batch=8, csv=synth / "train48.csv", epochs=2)


@pytest.fixture(scope="module")
def straight_clip(synth, tmp_path_factory) -> Path:
    """The uninterrupted run both kill cases are compared with (run once, in its own process)."""
    logs = tmp_path_factory.mktemp("straight")
    _clip_train_process(_base(synth, logs, "straight", **_kill_small(synth)))
    return logs / "straight"


@pytest.mark.parametrize("nbytes", [0, 3000])
def test_kill_during_checkpoint_write_then_resume_matches_straight(synth, straight_clip, tmp_path, nbytes):
    """kill -9 while epoch_2.pt is written: no truncated epoch_2.pt appears; --resume latest takes epoch_1.pt
    and the run ends with the weights of an uninterrupted one."""
    killed = _base(synth, tmp_path, "killed", **_kill_small(synth))
    _kill_during_save(killed, "checkpoints/epoch_2.pt", nbytes)
    ckpts = tmp_path / "killed" / "checkpoints"
    assert (ckpts / "epoch_1.pt").is_file() and not (ckpts / "epoch_2.pt").exists()
    # what older runs (or a full disk) leave behind: a truncated newer file and open_clip_train's tmp.pt
    (ckpts / "epoch_3.pt").write_bytes((ckpts / "epoch_1.pt").read_bytes()[:5000])
    (ckpts / "tmp.pt").write_bytes(b"\0" * 100)
    _clip_train_process(killed + ["--resume", "latest"])
    log = (tmp_path / "killed" / "out.log").read_text()
    assert "resume: skipping" in log and "epoch_3.pt" in log
    sd_a = torch.load(straight_clip / "checkpoints" / "epoch_2.pt", weights_only=True)["state_dict"]
    sd_b = torch.load(ckpts / "epoch_2.pt", weights_only=True)["state_dict"]
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.allclose(sd_a[k], sd_b[k], atol=1e-6) for k in sd_a)
