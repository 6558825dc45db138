"""Supervised fine-tuning with TRL's SFTTrainer through lohan, in the style of TRL's own examples.

    python examples/sft_trl.py                      # through lohan (gradients to CPUAdamW)
    python examples/sft_trl.py --budget 90MiB       # ... under a device memory budget
    python examples/sft_trl.py --no-lohan           # the plain SFTTrainer, to compare
    python examples/sft_trl.py --lora --bf16        # LoRA adapters, bf16 autocast

Nothing is downloaded: the model is a small Qwen2-style model built from a config (random
weights), the data the English corpus shipped with lohan_compile, one sentence per example,
tokenized byte by byte. The losses and gradient norms it logs are the plain SFTTrainer's.

Most of this step's memory is TRL's chunked LM head (a tokens x 32768 buffer, run eagerly
after a graph break) and, under the Trainer, attention modules dynamo runs eagerly: outside
any plan (README, "Fine-tuning with TRL"). A budget a few MiB under the unplanned peak makes
lohan move the activations of what it compiles; much lower, it says which budget fits.
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset
from transformers import Qwen2Config, Qwen2ForCausalLM
from trl import SFTConfig, SFTTrainer

import lohan_compile.hf
from lohan_compile.cli import byte_tokenizer, corpus


def sentences() -> list[str]:
    text = corpus().decode().replace("\n", " ")
    return [s.strip() + "." for s in text.split(". ") if len(s.strip()) > 20]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-lohan", dest="lohan", action="store_false", help="train with the plain SFTTrainer")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (needs peft)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 weights)")
    parser.add_argument("--budget", default=None, help="memory_budget, e.g. '90MiB' (default: none)")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    tokenizer = byte_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    training_args = SFTConfig(
        output_dir="sft-out", max_steps=args.steps, per_device_train_batch_size=4, learning_rate=1e-3,
        lr_scheduler_type="cosine", warmup_steps=2, max_grad_norm=1.0, max_length=128, bf16=args.bf16,
        logging_steps=5, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), seed=0,
        optim="adamw_torch",
    )
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=Dataset.from_dict({"text": sentences()}),
                         processing_class=tokenizer, peft_config=peft_config)
    if args.lohan:
        lohan_compile.hf.prepare(trainer, memory_budget=args.budget)
    trainer.train()
    if args.lohan:
        import lohan_compile as lohan

        print(lohan.last_report())  # the last step: plan, predicted and measured peak, transfers


if __name__ == "__main__":
    main()
