"""The ``lohan`` command line.

``lohan demo`` fine-tunes a small model through the lohan backend beside an
eager copy and shows what the compiler decided for each step.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

from . import __version__


def _demo_model(name: str, layers: int):

    if name == "llama":
        try:
            from transformers import LlamaConfig, LlamaForCausalLM
        except ImportError:
            sys.exit("lohan demo --model llama needs transformers: pip install 'lohan_compile[hf]'")
        cfg = LlamaConfig(
            vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        )
        model = LlamaForCausalLM(cfg)
        return model, lambda m, ids: m(input_ids=ids, labels=ids).loss, cfg.vocab_size
    if name == "gpt2":
        try:
            from transformers import GPT2Config, GPT2LMHeadModel
        except ImportError:
            sys.exit("lohan demo --model gpt2 needs transformers: pip install 'lohan_compile[hf]'")
        cfg = GPT2Config(vocab_size=512, n_embd=128, n_layer=layers, n_head=4, n_positions=512,
                         bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(cfg)
        return model, lambda m, ids: m(input_ids=ids, labels=ids).loss, cfg.vocab_size
    raise SystemExit(f"unknown demo model {name!r}")


def demo(args: argparse.Namespace) -> int:
    import torch

    import lohan_compile as lohan

    torch.manual_seed(args.seed)
    model, loss_fn, vocab = _demo_model(args.model, args.layers)
    eager = copy.deepcopy(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"lohan demo: {args.model} with {args.layers} layers, {n_params / 1e6:.2f}M parameters, "
          f"batch {args.batch} x sequence {args.seq}, {args.steps} AdamW steps (random weights, random tokens)")
    cm = torch.compile(model, backend="lohan", options={"executor": args.executor})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(args.seed)
    rows = []
    for step in range(args.steps):
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
        start = time.perf_counter()
        loss = loss_fn(cm, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        seconds = time.perf_counter() - start
        loss_e = loss_fn(eager, ids)
        loss_e.backward()
        opt_e.step()
        opt_e.zero_grad()
        rows.append((step, loss.item(), loss_e.item(), torch.equal(loss.detach(), loss_e.detach()), seconds))
    from tabulate import tabulate

    print(tabulate(rows, headers=["step", "loss (lohan)", "loss (eager)", "bitwise equal", "seconds"],
                   floatfmt=".6f"))
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), eager.state_dict().values()))
    print(f"\nparameters after {args.steps} steps bitwise equal to eager: {same}")
    report = lohan.last_report()
    print("\nwhat the compiler decided for the last step (lohan.last_report().to_table()):\n")
    print(report.to_table())
    print("\nNothing was moved: without a memory_budget every saved activation stays on the device.")
    return 0 if same else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lohan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"lohan_compile {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="fine-tune a small model through lohan and show what it decided")
    p.add_argument("--model", choices=["llama", "gpt2"], default="llama")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--executor", choices=["fx", "inductor"], default="fx")
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
