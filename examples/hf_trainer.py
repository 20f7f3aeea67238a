"""FracTrain with the HuggingFace Trainer: a tiny BERT (random weights, never downloaded) trained on
synthetic tokens through a PFQ ladder with DFQ gates, checkpointed, and resumed.

    python examples/hf_trainer.py --steps 6 --switch-at 3 --out hf_run
    python examples/hf_trainer.py --steps 8 --switch-at 3 --out hf_run --resume     # from the last checkpoint

``FracpassTrainer`` adds the gate loss, steps the Scheduler, logs fracpass/* entries and keeps the
Scheduler's state in each checkpoint. Needs ``pip install "fracpass[transformers]"``.
"""
from __future__ import annotations

import argparse

import torch
import transformers

import fracpass
from fracpass.integrations.transformers import FracpassTrainer


def synthetic_tokens(samples: int = 64, length: int = 8, vocab: int = 100):
    g = torch.Generator().manual_seed(0)
    return [dict(input_ids=torch.randint(0, vocab, (length,), generator=g), attention_mask=torch.ones(length, dtype=torch.long),
                 labels=torch.tensor(i % 3)) for i in range(samples)]


def build(switch_at: int):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, num_labels=3)
    ids = torch.randint(0, 100, (4, 8))
    example = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.zeros(4, dtype=torch.long))
    plan = fracpass.Plan.progressive(fw=(4, 8), bw=(8, 8), switch=fracpass.AtSteps((switch_at,)))
    plan = plan.with_gates(fracpass.Gates(a=(4, 8), g=(8, 8), w=8, granularity="block", target=3.0))
    qmodel = fracpass.transform(transformers.BertForSequenceClassification(config), plan, example_kwargs=example)
    return qmodel, fracpass.Scheduler(qmodel)


def run(steps: int, switch_at: int, out: str, resume=None):
    qmodel, sched = build(switch_at)
    args = transformers.TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=4, save_steps=2,
                                          logging_steps=1, report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
    trainer = FracpassTrainer(model=qmodel, args=args, train_dataset=synthetic_tokens(), scheduler=sched)
    trainer.train(resume_from_checkpoint=resume)
    return sched, trainer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps in all (default 6)")
    parser.add_argument("--switch-at", type=int, default=3, help="step after which the ladder moves to 8 bits")
    parser.add_argument("--out", default="hf_run", help="the Trainer's output folder")
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --out")
    args = parser.parse_args(argv)
    sched, trainer = run(args.steps, args.switch_at, args.out, True if args.resume else None)
    print(sched)
    for iteration, old, new, reason in sched.history:
        print(f"step {iteration}: stage {old} -> {new} ({reason})")


if __name__ == "__main__":
    main()
