"""Multiple-choice records as a local lm-evaluation-harness task (no hub).

`export_task(records, out)` writes `OUT/<name>.jsonl` (prompt, choices, gold index) and
`OUT/<name>.yaml` with `dataset_path: json` reading that file, so

    lm-eval run --model hf --model_args pretrained=MODEL --include_path OUT --tasks <name>

scores the same records fedmoe's `fedmoe eval` scores, by the same rule: `doc_to_text` is
the prompt, `doc_to_choice` the choices verbatim and `target_delimiter` empty, because a
fedmoe choice carries its own leading space (as a completion does), and lm-eval's
`acc_norm` divides by the length of exactly these strings.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from fedmoe.shared.data import Record
from fedmoe.shared.errors import FedmoeError

DEFAULT_TASK = "fedmoe_mc"


def export_task(records: list[Record], out: str | Path, name: str = DEFAULT_TASK) -> dict:
    """Write the task; return {"task", "yaml", "data", "count"}."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise FedmoeError(f"lm-eval task name {name!r} must be letters, digits and underscores")
    records = [r for r in records if r.choices]
    if not records:
        raise FedmoeError("nothing to export to lm-eval: no records carry 'choices'")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{name}.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for r in records:
            row = {"prompt": r.prompt, "choices": list(r.choices), "gold": r.choices.index(r.completion),
                   "domain": r.domain}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    # Field names rather than Jinja templates: lm-eval returns doc[field] as is, so
    # the prompt's and choices' whitespace is exactly what fedmoe scored.
    yaml = "\n".join([
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data))}",
        "test_split: test",
        "output_type: multiple_choice",
        "doc_to_text: prompt",
        "doc_to_choice: choices",
        "doc_to_target: gold",
        'target_delimiter: ""',
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: acc_norm",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
        "",
    ])
    (out / f"{name}.yaml").write_text(yaml)
    return {"task": name, "yaml": str(out / f"{name}.yaml"), "data": str(data), "count": len(records)}
