"""lmms-eval's own CLI runs the llava_drip adapter (registered by entry point, lmms-eval unedited) offline on a
local ScienceQA-format task of synthetic scenes; its answers and its metric match the project's own
model_vqa_science and eval_science_qa on the same questions."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval")

REPO = Path(__file__).resolve().parents[1]
BUILTIN = REPO / "llava_drip" / "assets" / "tiny-llava"

UTILS = '''
import os
from PIL import Image
from lmms_eval.tasks.scienceqa.utils import sqa_process_results  # lmms-eval's own ScienceQA rule

IMAGES = os.environ["DRIP_LMMS_IMAGES"]


def doc_to_visual(doc):
    return [Image.open(os.path.join(IMAGES, doc["image"]))] if doc.get("image") else []


def doc_to_text(doc):  # the human turn of LLaVA's question file, without its <image> line
    return doc["conversations"][0]["value"].replace("<image>\\n", "")


def doc_to_target(doc):
    return "ABCDE"[doc["answer"]]


def doc_to_choice(doc):
    return list("ABCDE"[:len(doc["choices"])])


def process_results(doc, results):
    return sqa_process_results(doc, results)
'''


def _task_yaml(name, docs, output_type):
    head = f"""\
        task: {name}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {docs}
        test_split: test
        output_type: {output_type}
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: !function utils.doc_to_target
        """
    if output_type == "generate_until":
        tail = """\
        generation_kwargs:
          max_new_tokens: 16
          temperature: 0
          do_sample: false
        process_results: !function utils.process_results
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        """
    else:
        tail = """\
        doc_to_choice: !function utils.doc_to_choice
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """
    return textwrap.dedent(head) + textwrap.dedent(tail)


@pytest.fixture(scope="module")
def sqa(tmp_path_factory):
    from llava_drip.data import synth_llava
    from llava_drip.eval import convert_sqa
    d = tmp_path_factory.mktemp("lmms")
    synth_llava.main(["--out", str(d / "synth"), "--n", "4", "--n-sqa", "16", "--seed", "5", "--quiet"])
    base = d / "synth" / "sqa"
    questions = d / "llava_test_CQM-A.json"
    convert_sqa.main(["--base-dir", str(base), "--split", "test", "--output", str(questions)])
    problems = json.loads((base / "problems.json").read_text())
    docs = [{**q, "choices": problems[q["id"]]["choices"], "answer": problems[q["id"]]["answer"]}
            for q in json.loads(questions.read_text())]
    (d / "docs.json").write_text(json.dumps(docs))
    tasks = d / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(UTILS)
    (tasks / "drip_sqa.yaml").write_text(_task_yaml("drip_sqa_local", d / "docs.json", "generate_until"))
    (tasks / "drip_sqa_mc.yaml").write_text(_task_yaml("drip_sqa_local_mc", d / "docs.json", "multiple_choice"))
    return {"dir": d, "base": base, "questions": questions, "docs": docs, "tasks": tasks,
            "images": base / "images" / "test"}


def _env(sqa):
    return dict(os.environ, PYTHONPATH=str(REPO), DRIP_LMMS_IMAGES=str(sqa["images"]), HF_DATASETS_OFFLINE="1",
                HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def test_lmms_eval_cli_matches_the_projects_answers_and_scorer(sqa):
    out = sqa["dir"] / "lmms_out"
    cmd = [str(Path(sys.executable).parent / "lmms-eval"), "--model", "llava_drip",
           "--model_args", f"pretrained={BUILTIN},budget=mean:0.25,device=cpu",
           "--tasks", "drip_sqa_local,drip_sqa_local_mc", "--include_path", str(sqa["tasks"]),
           "--batch_size", "4", "--log_samples", "--output_path", str(out)]
    proc = subprocess.run(cmd, env=_env(sqa), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=900, cwd=sqa["dir"])
    assert proc.returncode == 0, proc.stdout[-5000:]
    results = sorted(out.rglob("*results.json"))
    assert results, proc.stdout[-3000:]
    report = json.loads(results[-1].read_text())["results"]
    em = report["drip_sqa_local"]["exact_match,none"]
    acc_mc = report["drip_sqa_local_mc"]["acc,none"]
    assert 0.0 <= acc_mc <= 1.0
    samples = [json.loads(ln) for f in out.rglob("*samples_drip_sqa_local.jsonl") for ln in f.read_text().splitlines()]
    assert len(samples) == len(sqa["docs"])
    first = lambda r: r[0] if isinstance(r, list) else r
    lmms_answers = {sqa["docs"][s["doc_id"]]["id"]: first(s["filtered_resps"]) for s in samples}

    # the project's own answering, same model, budget and batch size
    ours = sqa["dir"] / "ours.jsonl"
    r = subprocess.run([sys.executable, "-m", "llava_drip.eval.model_vqa_science", "--model-path", str(BUILTIN),
                        "--question-file", str(sqa["questions"]), "--image-folder", str(sqa["images"]),
                        "--answers-file", str(ours), "--temperature", "0", "--max-new-tokens", "16",
                        "--batch-size", "4", "--budget", "mean:0.25", "--device", "cpu", "--conv-mode", "vicuna_v1"],
                       env=_env(sqa), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:]
    our_answers = {json.loads(ln)["question_id"]: json.loads(ln)["text"] for ln in ours.read_text().splitlines()}
    assert our_answers == lmms_answers  # same prompts, same batches, greedy: the same words

    # the project's scorer on the answers lmms-eval produced gives lmms-eval's metric
    theirs = sqa["dir"] / "lmms_answers.jsonl"
    theirs.write_text("".join(json.dumps({"question_id": k, "prompt": "", "text": v}) + "\n"
                              for k, v in lmms_answers.items()))
    s = subprocess.run([sys.executable, "-m", "llava_drip.eval.eval_science_qa", "--base-dir", str(sqa["base"]),
                        "--result-file", str(theirs), "--json"], env=_env(sqa), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=300)
    assert s.returncode == 0, s.stderr[-3000:]
    summary = json.loads(s.stdout)
    assert summary["accuracy"] == pytest.approx(100 * em, abs=1e-6), (summary, em)


def test_loglikelihood_and_multi_round(sqa):
    from llava_drip.eval.lmms import LlavaDrip
    lm = LlavaDrip(pretrained=str(BUILTIN), device="cpu", batch_size=2)
    doc = sqa["docs"][0]
    lm.task_dict = {"t": {"test": [doc]}}
    from PIL import Image
    visual = (lambda d: [Image.open(sqa["images"] / d["image"])]) if doc.get("image") else (lambda d: [])
    context = doc["conversations"][0]["value"].replace("<image>\n", "")

    class Req:
        def __init__(self, args):
            self.args = args

    (res,) = lm.loglikelihood([Req((context, " A", visual, 0, "t", "test"))])
    ll, greedy = getattr(res, "text", res)  # lmms-eval's GenerationResult wrapper, see LlavaDrip.loglikelihood
    # the same number through the model's own loss: mean NLL over the continuation's tokens
    from llava_drip.mm_utils import process_images, tokenizer_image_token
    a = lm.answerer
    image = visual(doc)
    q = lm._question(context, image[0] if image else None, 0)
    prompt = a.build_prompt(q)
    ctx, full = tokenizer_image_token(prompt, a.tokenizer), tokenizer_image_token(prompt + " A", a.tokenizer)
    ids = torch.tensor([full])
    labels = ids.clone()
    labels[0, :len(ctx)] = -100
    images = process_images(image, a.image_processor, a.model.config) if image else None
    with torch.no_grad():
        loss = a.model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, images=images).loss
    n = len(full) - len(ctx)
    assert ll == pytest.approx(-float(loss) * n, rel=1e-4) and ll < 0 and isinstance(greedy, bool)

    rounds_seen = []

    def doc_to_text(d, previous_output, round_idx, previous_round_info):
        rounds_seen.append(list(previous_output))
        if round_idx == 2:
            return None, None, True, previous_output, None
        convo = json.dumps([{"value": context}, {"value": previous_output[-1]}, {"value": "Are you sure?"}])
        return visual(d), convo, False, previous_output, {"round": round_idx}

    (res,) = lm.generate_until_multi_round([Req((context, {"max_new_tokens": 8}, visual, doc_to_text, 0, "t", "test"))])
    assert isinstance(res, tuple) and len(res) == 2 and all(isinstance(x, str) for x in res)
    assert rounds_seen[0] == [res[0]]

    with pytest.raises(ValueError, match="unknown model_args"):
        LlavaDrip(pretrained=str(BUILTIN), bugdet="0.25")
