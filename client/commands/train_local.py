"""`fedmoe train-local`: fine-tune a LoRA adapter on one site's data."""

from __future__ import annotations

import sys

from fedmoe.shared.cli import add_json_flag, print_json


def add_training_flags(p) -> None:
    p.add_argument("--quant", default="nf4", help="base model quantization: nf4 (default) | int8 | none")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--steps", type=int, default=120, help="optimizer steps (default 120)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")


def register(sub) -> None:
    p = sub.add_parser("train-local", help="fine-tune a LoRA adapter on one site's data (no federation)")
    p.add_argument("--model", help="base model directory (default: the built-in tiny model)")
    p.add_argument("--data", required=True, help="site folder with train.jsonl, eval.jsonl, site.toml")
    p.add_argument("--out", required=True, help="adapter directory to write (a standard peft adapter)")
    add_training_flags(p)
    add_json_flag(p)
    p.set_defaults(func=cmd_train_local)


def cmd_train_local(args) -> int:
    from tqdm import tqdm

    from fedmoe.client.trainer import SiteTrainer
    from fedmoe.shared.commands import resolve_model_dir
    from fedmoe.shared.data import load_site
    from fedmoe.shared.modeling import QUANT_MODES, is_quantized_4bit, save_adapter
    from fedmoe.shared.errors import FedmoeError
    from fedmoe.shared.training import TrainConfig

    if args.quant not in QUANT_MODES:
        raise FedmoeError(f"unknown quantization {args.quant!r}: choose one of {', '.join(QUANT_MODES)}")
    site = load_site(args.data)
    model_dir = resolve_model_dir(args.model)
    trainer = SiteTrainer(model_dir, args.quant, args.rank, device=args.device)
    before = trainer.evaluate(site.eval) if site.eval else None
    bar = tqdm(total=args.steps, desc=f"training {site.domain} adapter", file=sys.stderr, leave=False)

    def progress(step, loss):
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    _, result = trainer.train(site.train, cfg, progress)
    bar.close()
    after = trainer.evaluate(site.eval) if site.eval else None
    save_adapter(trainer.model, args.out, trainer.fingerprint, domain=site.domain, quant=args.quant, rank=args.rank)
    summary = {
        "adapter": args.out, "domain": site.domain, "quant": args.quant, "nf4_layers": is_quantized_4bit(trainer.model),
        "rank": args.rank, "steps": result.steps, "examples": result.examples, "final_loss": result.final_loss,
        "seconds": result.seconds, "tokens_per_second": result.tokens / max(result.seconds, 1e-9),
        "eval_accuracy_before": before.accuracy if before else None, "eval_accuracy_after": after.accuracy if after else None,
    }
    if args.json:
        print_json(summary)
    else:
        print(f"trained {site.domain} adapter ({args.quant}, rank {args.rank}) for {result.steps} steps in {result.seconds:.1f}s; "
              f"final loss {result.final_loss:.3f}")
        if after:
            print(f"site eval exact match: {before.accuracy:.3f} before -> {after.accuracy:.3f} after")
        print(f"saved peft adapter: {args.out}")
    return 0
