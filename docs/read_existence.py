"""Does the model answer "Is there a circle?" from the image? Existence read three ways.

    python docs/read_existence.py ckpt/sft [data/shapes] [N]

For the first N test images (default 100) and every shape, greedy answers to:
- "Is there a <shape> in the image?" as the first turn (what POPE asks);
- the same question after the true inventory as an earlier turn (the answer is in the text: reading
  it back is a lookup, no vision needed);
- "How many <shape>s are there?", scored as zero vs non-zero (the search stage 1 teaches).
Chance is about 0.5 for each. How issue 15 found that a 1000-step stage 2 answered existence at
chance while it counted: the first two stayed near 0.6 while the third was 0.75.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import shapes  # noqa: E402
from data import ImageCache  # noqa: E402


def human(text):
    return {"from": "human", "value": text}


def probes(img):
    """(name, turns, is the answer right?) for every shape of one image."""
    names = [o["name"] for o in img["objects"]]
    inventory = shapes.inventory(img["objects"])
    for s in shapes.SHAPES:
        present = s in names
        says_yes = lambda a, present=present: a.lower().startswith("yes") == present
        ask = f"Is there {shapes.a(s)} in the image?"
        yield "first turn", [human("<image>\n" + ask)], says_yes
        after = [human("<image>\nHow many of each shape are there?"),
                 {"from": "gpt", "value": inventory}, human(ask)]
        yield "after the true inventory", after, says_yes
        count = human(f"<image>\nHow many {shapes.plural(s)} are there?")
        nonzero = lambda a, present=present: (" no " not in f" {a.lower()} ") == present
        yield "count: zero vs non-zero", [count], nonzero


def main(ckpt, world="data/shapes", n=100):
    torch.set_num_threads(1)
    model, tok = common.load_model_and_tokenizer(ckpt)
    model.eval()
    test = [i for i in shapes.load_world(world)["images"] if i["split"] == "test"][:n]
    images = ImageCache(model.config.image_size)
    rows = {}
    for img in test:
        unit = images.unit(os.path.join(world, img["file_name"]))
        for name, turns, right in probes(img):
            rows.setdefault(name, []).append((common.prompt_item(tok, model, turns, unit), right))
    for name, got in rows.items():
        items = [g[0] for g in got]
        answers = common.generate_answers(model, tok, items, max_new_tokens=24, show=False)
        acc = sum(right(a) for a, (_, right) in zip(answers, got)) / len(got)
        print(f"{ckpt}: {name}: {acc:.3f} ({len(got)} questions)")


if __name__ == "__main__":
    main(sys.argv[1], *(sys.argv[2:3] or ["data/shapes"]), *[int(x) for x in sys.argv[3:4]])
