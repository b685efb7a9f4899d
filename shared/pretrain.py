"""The default foundation model: a tiny Llama pretrained here, on a generated corpus.

Machines that run fedmoe's tests and demo cannot download weights, so the project
builds its own base: a byte-level BPE tokenizer trained with `tokenizers`, and a small
`LlamaForCausalLM` pretrained on general-language text (everyday sentences and
question/answer pairs in many phrasings, none about the domain suite's facts). The
result is a standard model directory that stock `AutoModelForCausalLM` and
`AutoTokenizer` load. Nothing else in fedmoe is specific to it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fedmoe.shared.errors import FedmoeError

PRESET_VERSION = "tiny-v1"


@dataclass(frozen=True)
class PretrainPreset:
    vocab_size: int = 2048
    hidden_size: int = 192
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 128
    corpus_size: int = 24000
    steps: int = 700
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0


PRESETS = {"tiny": PretrainPreset()}

PEOPLE = ("teacher", "farmer", "child", "baker", "driver", "painter", "student", "gardener", "writer", "singer", "cook", "tailor")
PLACES = ("school", "market", "park", "kitchen", "library", "garden", "station", "village", "shop", "museum", "harbour", "bakery")
DOCS = ("notebook", "letter", "newspaper", "recipe", "story book", "map", "poster", "diary")
VERBS = ("saw", "liked", "carried", "painted", "found", "bought", "cleaned", "moved", "shared", "counted")
EVERYDAY = {
    "apple": "fruit", "pear": "fruit", "plum": "fruit", "dog": "animal", "horse": "animal", "sparrow": "bird",
    "owl": "bird", "oak": "tree", "pine": "tree", "rose": "flower", "tulip": "flower", "hammer": "tool",
    "saw": "tool", "violin": "instrument", "drum": "instrument", "bread": "food", "soup": "food", "river": "water",
    "rain": "weather", "snow": "weather", "chair": "furniture", "table": "furniture", "shirt": "clothing",
    "boot": "clothing", "car": "vehicle", "train": "vehicle", "red": "colour", "blue": "colour",
    "june": "month", "monday": "day", "copper": "metal", "iron": "metal", "salt": "mineral", "wool": "fabric",
}
QA_TEMPLATES = (
    "The {person} at the {place} asked what {thing} is. Answer:",
    "What is a {thing}, asked the {person}. Answer:",
    "In the {doc}, the word {thing} appears. What does it mean? Answer:",
    "A {person} in the {place} wants to know the meaning of {thing}. Answer:",
    "Explain {thing} to the {person}. Answer:",
    "The {person} read {thing} in the {doc}. What is it? Answer:",
    "Tell me what {thing} refers to. Answer:",
    "Question: what kind of thing is {thing}? Answer:",
    "At the {place}, what does {thing} denote? Answer:",
    "The {doc} from the {place} says {thing}. Meaning? Answer:",
    "Someone at the {place} needed {thing} explained. Answer:",
    "For a {person}, {thing} stands for what? Answer:",
)


def general_corpus(n: int, seed: int, lexicon: tuple[str, ...] = ()) -> list[str]:
    """Everyday sentences and Q/A pairs. `lexicon` adds words the model should know as
    words (a real foundation model knows "kidney" and "bond"), with no facts about them."""
    rng = random.Random(seed)
    words = list(lexicon) or list(EVERYDAY)
    # Invented words with invented meanings teach the model the skill fine-tuning
    # needs (a term's meaning stored in weights), on facts disjoint from any suite's.
    invented = {"".join(rng.choice("bcdfghjklmnpqrstvwxz") + rng.choice("aeiou") for _ in range(3)): rng.choice(words) for _ in range(300)}
    facts = EVERYDAY | invented
    things = list(facts)
    out = []
    for _ in range(n):
        kind = rng.random()
        fill = {"person": rng.choice(PEOPLE), "place": rng.choice(PLACES), "doc": rng.choice(DOCS)}
        if kind < 0.45:
            thing = rng.choice(things)
            out.append(rng.choice(QA_TEMPLATES).format(thing=thing, **fill) + " " + facts[thing])
        elif kind < 0.6:
            w = rng.choice(words)
            out.append(rng.choice(("Repeat the word {w}. Answer: {w}", "Spell out {w} for the {person}. Answer: {w}",
                                   "Which word did the {person} write in the {doc}? It was {w}. Answer: {w}")).format(w=w, **fill))
        elif kind < 0.8:
            a, b = rng.sample(words, 2)

            out.append(f"The {fill['person']} {rng.choice(VERBS)} the {a} at the {fill['place']}, and then read about the {b} in the {fill['doc']}.")
        else:
            a, b = rng.sample(things, 2)
            out.append(f"The {fill['person']} {rng.choice(VERBS)} the {a} at the {fill['place']}, and the {rng.choice(PEOPLE)} {rng.choice(VERBS)} the {b}.")
    return out


def train_tokenizer(corpus: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_model(preset: PretrainPreset, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=preset.hidden_size, intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_hidden_layers, num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_attention_heads, max_position_embeddings=preset.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(preset.seed)
    return LlamaForCausalLM(config)


def pretrain(out: str | Path, preset_name: str = "tiny", progress=None, steps: int | None = None) -> dict:
    """Build and pretrain the preset into `out`; returns a summary (loss, seconds)."""
    if preset_name not in PRESETS:
        raise FedmoeError(f"unknown preset {preset_name!r}: choose one of {', '.join(PRESETS)}")
    from fedmoe.shared.data import Record
    from fedmoe.shared.training import collate

    preset = PRESETS[preset_name]
    steps = steps if steps is not None else preset.steps
    start = time.perf_counter()
    from fedmoe.shared.synthetic_vocabulary import general_lexicon

    corpus = general_corpus(preset.corpus_size, preset.seed, general_lexicon())
    tokenizer = train_tokenizer(corpus, preset.vocab_size)
    model = build_model(preset, tokenizer)
    encoded = [tokenizer(Record("", t).completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in corpus]
    rng = random.Random(preset.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=preset.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=preset.lr, total_steps=steps, pct_start=0.1)
    model.train()
    losses = []
    for step in range(steps):
        batch = collate([(e, e) for e in rng.sample(encoded, preset.batch_size)], tokenizer.pad_token_id, "cpu")
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if progress:
            progress(step + 1, steps, losses[-1])
    model.eval()
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    summary = {"preset": preset_name, "version": PRESET_VERSION, "steps": steps, "final_loss": sum(losses[-20:]) / len(losses[-20:]),
               "seconds": time.perf_counter() - start, "parameters": sum(p.numel() for p in model.parameters()), "config": asdict(preset)}
    (tmp / "fedmoe_pretrain.json").write_text(json.dumps(summary, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return summary


def cache_dir() -> Path:
    return Path(os.environ.get("FEDMOE_HOME", Path.home() / ".cache" / "fedmoe"))


def default_model_dir() -> Path:
    return cache_dir() / "models" / PRESET_VERSION


def ensure_default_model(progress=None) -> Path:
    """The cached default model, built on first use (one process builds, others wait)."""
    import fcntl

    path = default_model_dir()
    if (path / "fedmoe_pretrain.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "fedmoe_pretrain.json").exists():
            pretrain(path, "tiny", progress=progress)
    return path
