"""Can an object's position be read from a LLaVA model's visual tokens? A probe on the frozen tower.

    python -m llava_drip.inspect.position_probe [--model llava_drip/assets/tiny-llava] [--n 2400]

Synthetic scenes (one object group at left / right / top / bottom / center) go through the model's own
tower; an attention-pooling probe (4 learned queries over the tokens, then a linear layer, Adam) learns the
position from 5/6 of them and is scored on the rest, for three token sets: the tokens at the model's budget,
the same tokens with the --mm_vision_token_pos centroid code appended, and all patches (budget 1.0).
It tells a tower that lost where things are from an LLM that did not learn to read it.
"""
import argparse
import json
from typing import Dict, List

import torch
import torch.nn.functional as F


def _features(model_path: str, n: int, seed: int, batch: int = 100):
    from llava_drip.data.shapes import POSITIONS, render, rng_for, sample_scene
    from llava_drip.mm_utils import process_images
    from llava_drip.model.builder import load_pretrained_model

    _, model, processor, _ = load_pretrained_model(model_path, device="cpu")
    wrapper = model.get_vision_tower()
    if not hasattr(wrapper.vision_tower, "encode_tokens"):
        raise ValueError(f"{model_path}: the probe needs a DRIP tower, found {type(wrapper).__name__}")
    tower, labels = wrapper.vision_tower, []
    sets: Dict[str, List[torch.Tensor]] = {"tokens": [], "tokens + centroid code": [], "all patches": []}
    drop_cls = wrapper.select_feature == "patch"
    with torch.no_grad():
        for start in range(0, n, batch):
            images = []
            for i in range(start, min(n, start + batch)):
                rng = rng_for(seed, 6, i)
                scene = sample_scene(rng)
                images.append(render(scene, rng, 64))
                labels.append(POSITIONS.index(scene.position))
            px = process_images(images, processor, model.config).to(wrapper.dtype)
            toks, pos = tower.encode_tokens(px, wrapper.select_layer, drop_cls, budget=wrapper.budget,
                                            with_positions=True)
            sets["tokens"] += [t.float() for t in toks]
            sets["tokens + centroid code"] += [t.float() for t in wrapper._with_positions(toks, pos)]
            sets["all patches"] += [t.float() for t in tower.encode_tokens(px, wrapper.select_layer, drop_cls, budget=1.0)]
    return sets, torch.tensor(labels)


def probe(feats: List[torch.Tensor], y: torch.Tensor, steps: int = 600, seed: int = 0) -> Dict:
    torch.manual_seed(seed)
    n, d, L = len(feats), feats[0].shape[1], max(f.shape[0] for f in feats)
    x = torch.zeros(n, L, d)
    mask = torch.zeros(n, L, dtype=torch.bool)
    for i, f in enumerate(feats):
        x[i, :len(f)], mask[i, :len(f)] = f, True
    x = (x - x[mask].mean(0)) / (x[mask].std(0) + 1e-5)
    n_train = n * 5 // 6
    att, head = torch.nn.Linear(d, 4), torch.nn.Linear(4 * d, int(y.max()) + 1)
    opt = torch.optim.Adam([*att.parameters(), *head.parameters()], 3e-3, weight_decay=1e-4)

    def logits(idx):
        a = att(x[idx]).masked_fill(~mask[idx, :, None], float("-inf")).softmax(1)
        return head(torch.einsum("blh,bld->bhd", a, x[idx]).flatten(1))

    for _ in range(steps):
        idx = torch.randint(0, n_train, (min(128, n_train),))
        loss = F.cross_entropy(logits(idx), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        test = torch.arange(n_train, n)
        acc = (logits(test).argmax(1) == y[test]).float().mean().item()
    return {"held_out_accuracy": acc, "n_train": n_train, "n_test": n - n_train,
            "tokens_mean": mask.sum(1).float().mean().item()}


def main(argv=None) -> int:
    from llava_drip.serve.builtin import SHIPPED
    p = argparse.ArgumentParser(prog="python -m llava_drip.inspect.position_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(SHIPPED), help="a LLaVA-DRIP folder (default: the built-in model)")
    p.add_argument("--n", type=int, default=2400, help="scenes (5/6 train the probe, 1/6 score it)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=3, help="scene seed (training data uses 0, held-out eval 7)")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    sets, y = _features(a.model, a.n, a.seed)
    results = {name: probe(f, y, a.steps) for name, f in sets.items()}
    print("| tokens | per image (mean) | position probe, held-out accuracy % |\n|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['tokens_mean']:.1f} | {100 * r['held_out_accuracy']:.1f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "n": a.n, "seed": a.seed, "steps": a.steps, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
