"""Fine-tune a transformers sequence classifier with ``Trainer`` and RING.

The optimizer is built on the model and passed to the trainer through ``optimizers=``;
Trainer then puts its learning-rate scheduler (linear decay by default) on it and
clips the gradients (``max_grad_norm``) before each step. RING (like KFAC and
RKalman) trains in a plain ``transformers.Trainer``; this script uses
``grng.integrations.huggingface.GRNGTrainer``, which behaves the same for RING and
is what ``--optimizer reng`` needs: RENG's exact mode differentiates the gradient,
and GRNGTrainer back-propagates with its graph (RENG's finite-difference mode cannot
run in Trainer, which calls ``optimizer.step()`` without a closure; GRNGTrainer
raises saying so). ``TrainingArguments.learning_rate`` is not used when the
optimizer is passed in: its own ``lr`` is the scheduler's start.

Run it::

    # fine-tune a small pretrained BERT on GLUE SST-2 (downloads the model and the data;
    # needs `pip install datasets`)
    python examples/hf_trainer_ring.py --model prajjwal1/bert-tiny --epochs 1

    # a tiny randomly initialised BERT on a synthetic task: no download, CPU, seconds
    python examples/hf_trainer_ring.py --smoke
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import numpy as np
import torch
import transformers
from torch import Tensor

import grng
from grng.integrations.huggingface import GRNGTrainer


class Tokens(torch.utils.data.Dataset[dict[str, Tensor]]):
    """Synthetic token sequences labelled by their first token modulo 4 (``--smoke``)."""

    def __init__(self, n: int, seed: int, length: int = 24, vocab: int = 100) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, length), generator=generator)
        self.labels = self.ids[:, 0] % 4

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def smoke_setup() -> tuple[Any, Any, Any, Any]:
    """A 2-layer BERT of width 64 with random weights, and synthetic data."""
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=32, num_labels=4,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    return model, Tokens(512, seed=1), Tokens(256, seed=2), None


def sst2_setup(name: str) -> tuple[Any, Any, Any, Any]:
    """A pretrained model and GLUE SST-2, tokenised (downloads both)."""
    import datasets  # pip install datasets

    tokenizer = transformers.AutoTokenizer.from_pretrained(name)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(name, num_labels=2)
    data = datasets.load_dataset("nyu-mll/glue", "sst2")
    data = data.map(lambda batch: tokenizer(batch["sentence"], truncation=True), batched=True)
    data = data.remove_columns(["sentence", "idx"]).rename_column("label", "labels")
    collator = transformers.DataCollatorWithPadding(tokenizer)
    return model, data["train"], data["validation"], collator


def accuracy(prediction: Any) -> dict[str, float]:
    logits, labels = prediction
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny random-init BERT, synthetic data, 40 steps (no download)")  # fmt: skip
    parser.add_argument("--model", default="prajjwal1/bert-tiny")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--optimizer", choices=["ring", "reng"], default="ring")
    parser.add_argument("--output-dir", default=None, help="default: a temporary directory")
    args = parser.parse_args()

    model, train, validation, collator = smoke_setup() if args.smoke else sst2_setup(args.model)
    # The defaults (RING lr 0.1, damping 1) were chosen on a BERT classifier among other
    # tasks (docs/tuning.md). RENG's default hvp="exact" needs GRNGTrainer.
    optimizer = grng.RENG(model) if args.optimizer == "reng" else grng.RING(model)

    with tempfile.TemporaryDirectory() as scratch:
        training = transformers.TrainingArguments(
            output_dir=args.output_dir or scratch,
            per_device_train_batch_size=args.batch,
            per_device_eval_batch_size=256,
            num_train_epochs=args.epochs,
            max_steps=40 if args.smoke else -1,
            warmup_steps=0 if args.smoke else 100,  # then linear decay, on the optimizer's lr
            eval_strategy="no" if args.smoke else "epoch",
            logging_steps=10 if args.smoke else 100,
            save_strategy="no",
            report_to="none",
            use_cpu=args.smoke,
            disable_tqdm=args.smoke,
            seed=0,
        )
        trainer = GRNGTrainer(
            model=model,
            args=training,
            train_dataset=train,
            eval_dataset=validation,
            data_collator=collator,
            compute_metrics=accuracy,
            optimizers=(optimizer, None),  # None: Trainer builds its scheduler on grng's groups
        )
        trainer.train()
        metrics = trainer.evaluate()
    print(f"{args.optimizer}: {optimizer.steps_taken} steps, "
          f"validation accuracy {metrics['eval_accuracy']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
