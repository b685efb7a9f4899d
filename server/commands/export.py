"""`fedmoe export` (coordinator side) and `fedmoe edge generate` (site side).

Only light imports at module level: the parser is built for every `fedmoe` command,
and `fedmoe edge generate` must run where torch is not installed.
"""

from __future__ import annotations

import sys

from fedmoe.shared.cli import add_json_flag, print_json


def register(sub) -> None:
    p = sub.add_parser("export", help="export one domain expert of a run: peft adapter, merged model, or ONNX for sites")
    p.add_argument("--run", required=True, help="run folder (run.json + experts/<domain>/)")
    p.add_argument("--expert", required=True, help="expert (domain) name, a folder under RUN/experts/")
    p.add_argument("--format", default="onnx", choices=("peft", "merged", "onnx"),
                   help="peft: the adapter folder; merged: a Hugging Face model with the expert folded in; "
                        "onnx: an onnxruntime model with KV cache + tokenizer (default)")
    p.add_argument("--out", required=True, help="folder to write (new or empty)")
    p.add_argument("--quantize", choices=("int8",), help="onnx only: int8 weight quantization (onnxruntime quantize_dynamic)")
    p.add_argument("--exporter", default="dynamo", choices=("dynamo", "torchscript"),
                   help="torch.onnx exporter (default dynamo; torchscript is the older, faster-to-run one)")
    add_json_flag(p)
    p.set_defaults(func=cmd_export)

    edge = sub.add_parser("edge", help="run an exported expert with onnxruntime alone (no torch)")
    esub = edge.add_subparsers(dest="edge_command", metavar="ACTION", required=True)
    g = esub.add_parser("generate", help="continue a prompt with an ONNX model from `fedmoe export --format onnx`")
    g.add_argument("--model", required=True, help="exported edge model folder (model.onnx, tokenizer.json, edge.json)")
    g.add_argument("prompt", help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy; > 0 samples")
    g.add_argument("--seed", type=int, help="sampling seed (temperature > 0)")
    g.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: onnxruntime's choice)")
    add_json_flag(g)
    g.set_defaults(func=cmd_edge_generate)


def cmd_export(args) -> int:
    from fedmoe.server.export import export_expert

    result = export_expert(args.run, args.expert, args.format, args.out, quantize=args.quantize, exporter=args.exporter)
    if args.json:
        print_json(result)
    else:
        extra = f", {result['quantization']}" if result.get("quantization") else ""
        print(f"exported expert {args.expert!r} as {args.format}{extra}: {result['out']} ({result['bytes'] / 1e6:.1f} MB)")
    return 0


def cmd_edge_generate(args) -> int:
    from fedmoe.shared.edge import EdgeModel

    model = EdgeModel(args.model, threads=args.threads)
    gen = model.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    if args.json:
        print_json(gen.as_dict())
    else:
        print(gen.text)
        print(f"[{len(gen.token_ids)} tokens, {gen.tokens_per_s:.1f} tokens/s, first token {1000 * gen.first_token_s:.1f} ms]",
              file=sys.stderr)
    return 0
