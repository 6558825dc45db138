"""Small models for the tests, and a helper that trains eager and compiled side by side."""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    def __init__(self, d: int = 32, hidden: int = 64, out: int = 8):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, out)

    def forward(self, x):
        return self.head(F.gelu(self.fc2(torch.relu(self.fc1(x)))))


class Block(nn.Module):
    """A pre-norm transformer block: attention through SDPA, then an MLP."""

    def __init__(self, d: int = 64, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class ConvBN(nn.Module):
    """BatchNorm updates its running statistics (buffers) in forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(y.mean(dim=(2, 3)))


def tiny_llama(tie: bool = False, layers: int = 2, vocab: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg)


def tiny_gpt2(layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=128, n_embd=64, n_layer=layers, n_head=4, n_positions=64,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg)


def train_side_by_side(
    make_model: Callable[[], nn.Module],
    batches: list,
    loss_fn: Callable,
    *,
    options: dict | None = None,
    backend: str = "lohan",
    lr: float = 1e-2,
):
    """Train an eager copy and a compiled copy on the same batches with AdamW.

    Returns (eager_losses, compiled_losses, eager_model, compiled_model).
    """
    torch.manual_seed(0)
    eager = make_model()
    compiled_model = copy.deepcopy(eager)
    cm = torch.compile(compiled_model, backend=backend, options=options)
    opt_e = torch.optim.AdamW(eager.parameters(), lr=lr)
    opt_c = torch.optim.AdamW(compiled_model.parameters(), lr=lr)
    losses_e, losses_c = [], []
    for batch in batches:
        for model, opt, losses in ((eager, opt_e, losses_e), (cm, opt_c, losses_c)):
            loss = loss_fn(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
    return losses_e, losses_c, eager, compiled_model


def assert_same_state(a: nn.Module, b: nn.Module, *, exact: bool = True, atol: float = 0.0):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if exact:
            assert torch.equal(sa[k], sb[k]), f"{k} differs: max {(sa[k].float() - sb[k].float()).abs().max()}"
        else:
            torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=0, msg=k)
