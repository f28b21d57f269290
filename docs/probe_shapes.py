"""Is an object's shape (and colour) in the image features? Linear probes on a Shapes checkpoint.

    python docs/probe_shapes.py ckpt/sft [data/shapes]

For every annotated object: the CLIP features and the projector output at the image token of its
grid cell (and, as a reference, the raw pixels of that 16 px patch). A softmax-regression probe is
fit on train-split objects and scored on test-split objects. A probe near 1.0 with a model that
still names the wrong shape means the language model does not use what the image features hold.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from data import ImageCache, normalize  # noqa: E402


def features(model, world, ann, split, n, cache, colours):
    images = {i["id"]: i for i in ann["images"]}
    by_image = {}
    for a in [a for a in ann["annotations"] if images[a["image_id"]]["split"] == split][:n]:
        by_image.setdefault(a["image_id"], []).append(a)
    ids = list(by_image)
    rows = {"pixels": [], "vision": [], "projector": [], "shape": [], "colour": []}
    patch = model.config.patch_size
    grid = model.config.image_size // patch  # (a world's grid cell is one patch: 2x2 or 3x3)
    for k in range(0, len(ids), 64):
        units = [cache.unit(os.path.join(world, images[i]["file_name"])) for i in ids[k:k + 64]]
        with torch.no_grad():
            v = model.vision_tower(torch.stack([normalize(u) for u in units]))
            p = model.projector(v)
        for j, i in enumerate(ids[k:k + 64]):
            for a in by_image[i]:
                r, c = a["attributes"]["row"], a["attributes"]["col"]
                cell = r * grid + c
                cell_pixels = units[j][:, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
                rows["pixels"].append(cell_pixels.reshape(-1))
                rows["vision"].append(v[j, cell])
                rows["projector"].append(p[j, cell])
                rows["shape"].append(a["category_id"] - 1)
                rows["colour"].append(colours.index(a["attributes"]["color"]))
    return {k: torch.stack(x) if torch.is_tensor(x[0]) else torch.tensor(x)
            for k, x in rows.items()}


def probe(x_train, y_train, x_test, y_test, steps=300):
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    k = int(y_train.max()) + 1
    w = torch.zeros(x_train.shape[1], k, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(((x_train - mean) / std) @ w + b, y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(((((x_test - mean) / std) @ w + b).argmax(1) == y_test).float().mean())


def main(ckpt, world="data/shapes"):
    model, _ = common.load_model_and_tokenizer(ckpt)[:2]
    model.eval()
    with open(os.path.join(world, "annotations.json")) as f:
        ann = json.load(f)
    colours = sorted({a["attributes"]["color"] for a in ann["annotations"]})
    cache = ImageCache(model.config.image_size)
    tr = features(model, world, ann, "train", 3000, cache, colours)
    te = features(model, world, ann, "test", 1000, cache, colours)
    for target in ("shape", "colour"):
        majority = float((te[target] == te[target].mode().values).float().mean())
        accs = {src: round(probe(tr[src], tr[target], te[src], te[target]), 3)
                for src in ("pixels", "vision", "projector")}
        print(f"{target} probe on held-out objects: {accs} (majority class {majority:.3f})")


if __name__ == "__main__":
    main(*sys.argv[1:])
