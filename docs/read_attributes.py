"""Does the language model read each attribute from the image? Teacher-forced accuracy on
descriptions.

    python docs/read_attributes.py ckpt/sft [data/shapes] [--blank]

For the first 200 validation images, the true description ("There are two objects. At the top left
there is a large red circle. ...") is fed in the chat template; at every shape, colour and size word
the model's most likely next token is compared with the true one. Chance is about 1/6 for shape and
colour and 1/2 for size; --blank feeds blank images (what the text alone predicts).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import shapes  # noqa: E402
from data import IGNORE, ImageCache, collate, normalize, tokenize_conversation  # noqa: E402

WORDS = {"shape": set(shapes.SHAPES), "colour": set(shapes.COLORS), "size": set(shapes.SIZES)}


def attribute_of(piece):
    word = piece.replace("▁", "").strip(".,?!:").lower()
    return next((k for k, words in WORDS.items() if word in words), None)


def main(ckpt, world="data/shapes", blank=False, n=200):
    model, tok = common.load_model_and_tokenizer(ckpt)
    model.eval()
    cache, items = ImageCache(model.config.image_size), []
    for img in [i for i in shapes.load_world(world)["images"] if i["split"] == "val"][:n]:
        turns = [{"from": "human", "value": "<image>\nDescribe the image in detail."},
                 {"from": "gpt", "value": shapes.describe(img["objects"])}]
        item = tokenize_conversation(tok, turns, model.config.image_token_id,
                                     model.config.num_image_tokens)
        unit = cache.unit(os.path.join(world, img["file_name"]))
        item["pixel_values"] = normalize(torch.zeros_like(unit) if blank else unit)
        items.append(item)
    hits = {k: [0, 0] for k in WORDS}
    with torch.no_grad():
        for s in range(0, len(items), 32):
            batch = collate(items[s:s + 32], tok.pad_token_id)
            h = model(batch["pixel_values"], batch["input_ids"], None, return_hidden=True)
            pred, labels = model.logits(h[:, :-1]).argmax(-1), batch["labels"][:, 1:]
            learned = labels != IGNORE
            for (r, j), want in zip(learned.nonzero().tolist(), labels[learned].tolist()):
                kind = attribute_of(tok.convert_ids_to_tokens(want))
                if kind:
                    hits[kind][0] += int(pred[r, j] == want)
                    hits[kind][1] += 1
    print(f"{ckpt}{' (blank images)' if blank else ''}: " +
          " | ".join(f"{k} {a / max(t, 1):.3f} ({t} words)" for k, (a, t) in hits.items()))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--blank"]
    main(*args, blank="--blank" in sys.argv)
