"""SFT without padding (issue 19): sequences packed end to end in one row, attention within each
one (data.pack + model.backbone(seq_lens)). The loss and every gradient equal those of the
right-padded batch of the same sequences, and a short sft.py run gives the same losses packed and
padded."""
import json
import os

import pytest
import torch

import sft
from conftest import assert_same_metrics, run_cli
from data import IGNORE, collate, pack
from model import LLaVA


def items(m, lengths, seed=0):
    """Conversations of the given text lengths: BOS, image tokens, text; labels on the last half of
    the text."""
    c, g = m.config, torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        bos = torch.tensor([c.bos_token_id])
        image = torch.full((c.num_image_tokens,), c.image_token_id)
        ids = torch.cat([bos, image, torch.randint(3, 500, (n,), generator=g)])
        labels = torch.full_like(ids, IGNORE)
        labels[-(n // 2):] = ids[-(n // 2):]
        out.append({"input_ids": ids, "labels": labels,
                    "pixel_values": torch.randn(3, c.image_size, c.image_size, generator=g)})
    return out


def loss_and_grads(m, batch):
    m.zero_grad(set_to_none=True)
    n = (batch["labels"][:, 1:] != IGNORE).sum()
    loss = sft.lm_loss(m, batch, n)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_batch_gives_the_padded_loss_and_gradients(one_thread, checkpointing):
    torch.manual_seed(0)
    # GQA: heads 4, kv_heads 2
    m = LLaVA.from_preset("tiny", image_token_id=4000, pad_token_id=0).train()
    m.gradient_checkpointing = checkpointing
    batch = items(m, [5, 17, 9, 30])
    padded = collate(batch, 0)
    packed = pack(batch)
    assert packed["input_ids"].shape == (1, sum(len(x["input_ids"]) for x in batch))
    packed_len = packed["input_ids"].shape[1]
    assert int(padded["attention_mask"].sum()) == packed_len < padded["input_ids"].numel()
    loss_a, grads_a = loss_and_grads(m, padded)
    loss_b, grads_b = loss_and_grads(m, packed)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], atol=1e-6, rtol=1e-4, msg=k)
    # attention really stays within a sequence: without seq_lens the same row gives another loss
    with torch.no_grad():
        leaky = sft.lm_loss(m, {k: v for k, v in packed.items() if k != "seq_lens"}, 1)
    assert abs(float(leaky) - float(loss_b) * int((packed["labels"][:, 1:] != IGNORE).sum())) > 1e-3


def test_sft_loss_by_hand():
    """sft.lm_loss = -sum over answer tokens of log p(token | the tokens before it) / n_global: a
    stub model whose logits at position t are a fixed table row, the arithmetic written out."""
    # logits at t = 0, 1, 2
    table = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])

    class Stub(torch.nn.Module):
        def forward(self, pixel_values, input_ids, attention_mask, return_hidden, seq_lens):
            return table[None]  # "hidden states" (1, 3, 3), the head below is the identity

        def logits(self, h):
            return h
    # one answer token: 2, predicted at t = 1
    batch = {"pixel_values": None, "input_ids": torch.tensor([[0, 1, 2]]),
             "labels": torch.tensor([[IGNORE, IGNORE, 2]])}
    want = -torch.log_softmax(table[1], -1)[2] / 4  # n_global 4: the global batch's answer tokens
    torch.testing.assert_close(sft.lm_loss(Stub(), batch, 4), want)
    batch["labels"] = torch.tensor([[IGNORE, 1, 2]])  # two: token 1 at t = 0, token 2 at t = 1
    want = -(torch.log_softmax(table[0], -1)[1] + torch.log_softmax(table[1], -1)[2]) / 2
    torch.testing.assert_close(sft.lm_loss(Stub(), batch, 2), want)


def test_pack_refuses_a_label_on_the_first_token():
    m = LLaVA.from_preset("tiny", image_token_id=4000, pad_token_id=0)
    batch = items(m, [4, 6])
    batch[1]["labels"][0] = 5  # it would be predicted by the previous sequence's last token
    with pytest.raises(ValueError, match="first token"):
        pack(batch)


def test_sft_packed_and_padded_runs_have_the_same_losses(one_thread, tiny_world, tmp_path):
    args = ["--model", "tiny", "--world", tiny_world, "--max_steps", "4", "--align_steps", "2",
            "--batch_size", "8", "--grad_accum", "2", "--report", "false", "--log_every", "1",
            "--eval_every", "2", "--save_every", "4"]
    runs = []
    for flag in ("true", "false"):
        out = str(tmp_path / flag)
        code, _, err = run_cli("sft", args + ["--pack", flag, "--out", out])
        assert code == 0, err
        with open(os.path.join(out, "metrics.jsonl")) as f:
            runs.append([json.loads(line) for line in f])
    steps = lambda rows: [r for r in rows if "loss" in r]
    assert assert_same_metrics(steps(runs[0]), steps(runs[1]), ["loss", "grad_norm"], 4) == 8
    val = lambda rows: [r for r in rows if "val_loss" in r]
    assert assert_same_metrics(val(runs[0]), val(runs[1]), ["val_loss"], 2) == 2
