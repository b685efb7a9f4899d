"""Running an exported domain expert at a site with onnxruntime and `tokenizers` alone.

No torch, no transformers: this module (and everything it imports) must stay light so a
site can run its expert on a machine without the training stack. The folder it reads is
what `fedmoe export --format onnx` writes: model.onnx, tokenizer.json, edge.json.

Generation is incremental: the graph takes the key/value cache of earlier positions and
returns it extended, so each new token costs one single-position forward pass.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedmoe.shared.errors import FedmoeError

EDGE_META = "edge.json"
EDGE_FORMAT = "fedmoe-edge-onnx/1"


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    first_token_s: float
    total_s: float
    stopped_at_eos: bool = False
    timings: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.total_s if self.total_s > 0 else float("inf")

    def as_dict(self) -> dict:
        return {"text": self.text, "new_tokens": len(self.token_ids), "prompt_tokens": self.prompt_tokens,
                "token_ids": self.token_ids, "first_token_ms": 1000 * self.first_token_s,
                "total_ms": 1000 * self.total_s, "tokens_per_s": self.tokens_per_s, "stopped_at_eos": self.stopped_at_eos}


class EdgeModel:
    """An exported expert: an onnxruntime session plus its tokenizer."""

    def __init__(self, model_dir: str | os.PathLike, threads: int | None = None, model_file: str | None = None):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.dir = Path(model_dir)
        meta_path = self.dir / EDGE_META
        if not self.dir.is_dir():
            raise FedmoeError(f"edge model folder not found: {self.dir}")
        if not meta_path.is_file():
            raise FedmoeError(f"not an exported edge model (no {EDGE_META}): {self.dir}; make one with fedmoe export --format onnx")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != EDGE_FORMAT:
            raise FedmoeError(f"{meta_path}: format {self.meta.get('format')!r} is not {EDGE_FORMAT!r}")
        onnx_path = self.dir / (model_file or self.meta["model_file"])
        if not onnx_path.is_file():
            raise FedmoeError(f"ONNX model file missing: {onnx_path}")
        tok_path = self.dir / "tokenizer.json"
        if not tok_path.is_file():
            raise FedmoeError(f"tokenizer.json missing in edge model folder {self.dir}")

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FedmoeError(f"onnxruntime could not load {onnx_path}: {first[:300]}") from None
        self.tokenizer = Tokenizer.from_file(str(tok_path))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.num_layers = int(self.meta["num_layers"])
        self.kv_shapes = [tuple(s) for s in self.meta["kv_shapes"]]
        self.with_positions = "position_ids" in self.input_names
        self.eos = set(self.meta.get("eos_token_id") or [])
        self.max_positions = self.meta.get("max_positions")
        self._past_names = [n for n in self.input_names if n.startswith("past_key_values.")]
        if len(self._past_names) != 2 * self.num_layers:
            raise FedmoeError(f"{onnx_path}: expected {2 * self.num_layers} cache inputs, found {len(self._past_names)}")

    # -------------------------------------------------------------- forward passes

    def empty_cache(self, batch: int = 1) -> list[np.ndarray]:
        return [np.zeros((batch, h, 0, d), dtype=np.float32) for h, d in self.kv_shapes]

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list[np.ndarray],
                position_ids: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """One step: logits [batch, seq, vocab] and the extended cache."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.with_positions:
            if position_ids is None:
                # Positions count only attended tokens, so left padding does not shift them.
                position_ids = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)[:, -input_ids.shape[1]:]
            feed["position_ids"] = np.asarray(position_ids, dtype=np.int64)
        feed.update(zip(self._past_names, past))
        outputs = self.session.run(self.output_names, feed)
        return outputs[0], outputs[1:]

    def logits(self, input_ids, attention_mask=None) -> np.ndarray:
        """Logits of a whole sequence in one pass from an empty cache (for parity checks)."""
        input_ids = np.atleast_2d(np.asarray(input_ids, dtype=np.int64))
        if attention_mask is None:
            attention_mask = np.ones_like(input_ids)
        logits, _ = self.forward(input_ids, attention_mask, self.empty_cache(input_ids.shape[0]))
        return logits

    # -------------------------------------------------------------- generation

    def encode(self, prompt: str) -> list[int]:
        # Prompts were tokenized without special tokens in training (fedmoe.shared.training).
        return self.tokenizer.encode(prompt, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 32, temperature: float = 0.0,
                     seed: int | None = None, stop_at_eos: bool = True) -> Generation:
        """Greedy (temperature 0) or sampled continuation of one prompt, with timings."""
        if not prompt_ids:
            raise FedmoeError("empty prompt: nothing to continue from")
        if max_new_tokens < 1:
            raise FedmoeError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise FedmoeError(f"--temperature must be >= 0, got {temperature}")
        if self.max_positions:
            if len(prompt_ids) >= self.max_positions:
                raise FedmoeError(f"prompt is {len(prompt_ids)} tokens; this model takes at most {self.max_positions - 1} before generating")
            max_new_tokens = min(max_new_tokens, self.max_positions - len(prompt_ids))
        rng = np.random.default_rng(seed)
        start = time.perf_counter()
        ids = np.asarray([prompt_ids], dtype=np.int64)
        mask = np.ones_like(ids)
        past = self.empty_cache(1)
        out: list[int] = []
        first = 0.0
        eos_hit = False
        for step in range(max_new_tokens):
            logits, past = self.forward(ids, mask, past)
            token = self._pick(logits[0, -1], temperature, rng)
            if step == 0:
                first = time.perf_counter() - start
            if stop_at_eos and token in self.eos:
                eos_hit = True
                break
            out.append(token)
            ids = np.asarray([[token]], dtype=np.int64)
            mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
        total = time.perf_counter() - start
        return Generation(self.decode(out), out, len(prompt_ids), first, total, eos_hit)

    def generate(self, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, seed: int | None = None) -> Generation:
        return self.generate_ids(self.encode(prompt), max_new_tokens, temperature, seed)

    @staticmethod
    def _pick(logits: np.ndarray, temperature: float, rng) -> int:
        if temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / temperature
        z -= z.max()
        p = np.exp(z)
        p /= p.sum()
        return int(rng.choice(p.shape[0], p=p))
