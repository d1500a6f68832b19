"""Model soups: average the weights of runs of one architecture (Wortsman et al., 2022).

    python -m trainer.soup runs/a runs/a-rewind --out runs/a-soup                  # uniform
    python -m trainer.soup runs/seed0 runs/seed1 runs/seed2 --out runs/greedy \\
        --tasks heldout=data/synth/eval                                          # greedy

Reads: run folders (their latest checkpoint) or checkpoint files, as `trainer.evaluate` does.
Uniform: the mean of every ingredient's weights. Greedy (`--tasks`, held-out classification
folders as `trainer.evaluate --tasks` takes them): ingredients sorted by their held-out score
(the mean of the tasks' main metrics), then each added in that order only if the soup's
held-out score does not drop (the paper's recipe). Ingredients of different architectures
(model config, parameter names or shapes) are refused.

Writes `--out` as a run folder that `trainer.evaluate` and `trainer.compare` read:
model_config.json, model_configs/<model>.json, checkpoints/epoch_latest.pt (the soup's
weights), config.json (the ingredients and method) and manifest.json (the first ingredient's
scale, data and samples seen; `standard` only when every ingredient is; the ingredients, those
kept, and the held-out scores).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from pools.files import write_json_atomic
from trainer.checkpoint import save_checkpoint
from trainer.evaluate import classification_task, evaluate_classification, parse_named
from trainer.models import (MODEL_CONFIG_FILE, MODEL_CONFIGS_DIR, checkpoint_and_record,
                            create_model)


class SoupError(ValueError):
    """Ingredients that cannot be souped, or a bad flag: one line for the user."""


def load_ingredient(path: str | Path) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    """(checkpoint, model record, state dict without DDP's 'module.' prefix)."""
    try:
        checkpoint, record = checkpoint_and_record(path)
    except FileNotFoundError as exc:
        raise SoupError(str(exc)) from None
    ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = ck["state_dict"] if isinstance(ck, dict) and "state_dict" in ck else ck
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return checkpoint, record, state


def check_same_architecture(records: Sequence[dict], states: Sequence[dict], names: Sequence[str]) -> None:
    """Refuse ingredients whose model config or parameter names/shapes differ from the first's."""
    for record, state, name in zip(records[1:], states[1:], names[1:]):
        if record["model_cfg"] != records[0]["model_cfg"]:
            raise SoupError(f"{name}: model {record['model_name']} is not {names[0]}'s "
                            f"{records[0]['model_name']} (another config); a soup averages "
                            "runs of one architecture")
        if state.keys() != states[0].keys():
            diff = sorted(set(state) ^ set(states[0]))
            raise SoupError(f"{name}: parameters differ from {names[0]}'s, e.g. {diff[0]}")
        for k, v in state.items():
            if v.shape != states[0][k].shape:
                raise SoupError(f"{name}: {k} has shape {tuple(v.shape)}, {names[0]}'s "
                                f"{tuple(states[0][k].shape)}")


def average_states(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of floating-point tensors (in float64, cast back); other tensors
    (integer buffers such as step counters) must agree and are kept."""
    out = {}
    for k, first in states[0].items():
        if first.is_floating_point():
            mean = sum(s[k].double() for s in states) / len(states)
            out[k] = mean.to(first.dtype)
        else:
            if any(not torch.equal(s[k], first) for s in states[1:]):
                raise SoupError(f"non-float tensor {k} differs between ingredients: cannot average")
            out[k] = first.clone()
    return out


def held_out_score(model, preprocess, tokenizer, tasks, device: str) -> tuple[float, dict]:
    """The mean main metric over the held-out tasks, and each task's."""
    model.eval()
    per_task = {t.key: evaluate_classification(model, preprocess, tokenizer, t, device=device)["main_metric"]
                for t in tasks}
    return sum(per_task.values()) / len(per_task), per_task


def greedy_soup(states, names, score) -> tuple[list[int], list[dict]]:
    """Wortsman et al.'s greedy soup: indices kept, and the log of each decision.

    `score(state)` is the held-out score of a model with those weights.
    """
    solo = [score(s) for s in states]
    order = sorted(range(len(states)), key=lambda i: -solo[i])
    kept = [order[0]]
    best = solo[order[0]]
    log = [{"ingredient": names[order[0]], "alone": solo[order[0]], "soup": best, "kept": True}]
    for i in order[1:]:
        candidate = score(average_states([states[j] for j in kept + [i]]))
        keep = candidate >= best
        log.append({"ingredient": names[i], "alone": solo[i], "soup": candidate, "kept": keep})
        if keep:
            kept.append(i)
            best = candidate
    return kept, log


def make_soup(ingredients: Sequence[str | Path], out: str | Path, *, tasks: Sequence[str] = (),
              device: str = "cpu") -> dict:
    """Average the ingredients (greedily when `tasks` are given) into the run folder `out`."""
    out = Path(out)
    if len(ingredients) < 2:
        raise SoupError("a soup needs at least two ingredients")
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("*.pt")):
        raise SoupError(f"{out} already holds checkpoints: choose another --out")
    names = [str(p) for p in ingredients]
    loaded = [load_ingredient(p) for p in ingredients]
    records, states = [r for _, r, _ in loaded], [s for _, _, s in loaded]
    check_same_architecture(records, states, names)
    record = records[0]

    held_out, log = None, None
    kept = list(range(len(states)))
    if tasks:
        model, _, preprocess, tokenizer = create_model(record, device=device)
        task_list = []
        for spec in tasks:
            key, root = parse_named(spec)
            if not root.is_dir():
                raise SoupError(f"--tasks {spec}: no such folder")
            task_list.append(classification_task(key, root))

        def score(state):
            model.load_state_dict(state)
            return held_out_score(model, preprocess, tokenizer, task_list, device)[0]

        kept, log = greedy_soup(states, names, score)
        held_out = {"tasks": list(tasks), "decisions": log}
    soup = average_states([states[i] for i in kept])

    manifests = [_manifest_of(Path(p)) for p in ingredients]
    first = next((m for m in manifests if m), {})
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / MODEL_CONFIG_FILE, record)
    write_json_atomic(out / MODEL_CONFIGS_DIR / f"{record['model_name']}.json", record["model_cfg"])
    save_checkpoint(out, {"epoch": 1, "name": out.name, "state_dict": soup,
                          "model_name": record["model_name"], "model_cfg": record["model_cfg"]},
                    keep_numbered=False)
    write_json_atomic(out / "config.json", {
        "soup": "greedy" if tasks else "uniform", "ingredients": names, "tasks": list(tasks),
        "data": first.get("data"), "seed": None})
    manifest = {
        "soup": "greedy" if tasks else "uniform",
        "ingredients": [str(c) for c, _, _ in loaded],
        "kept": [str(loaded[i][0]) for i in kept],
        "held_out": held_out,
        "scale": first.get("scale"), "data": first.get("data"),
        "samples_seen": first.get("samples_seen"),
        "standard": bool(manifests) and all(m is not None and m.get("standard", False) for m in manifests),
        "model_name": record["model_name"],
        "checkpoint": str(out / "checkpoints" / "epoch_latest.pt"),
    }
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


def _manifest_of(path: Path) -> dict | None:
    """The trainer.train manifest of an ingredient (its run folder's), if there is one."""
    run = path if path.is_dir() else path.parent.parent
    m = run / "manifest.json"
    return json.loads(m.read_text()) if m.is_file() else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.soup", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m trainer.soup runs/a runs/a-rewind --out runs/a-soup\n"
               "  python -m trainer.soup runs/s0 runs/s1 runs/s2 --out runs/greedy --tasks heldout=DIR")
    p.add_argument("ingredients", nargs="+", metavar="RUN_OR_CKPT",
                   help="trainer.train run folders (their latest checkpoint) or checkpoint files")
    p.add_argument("--out", required=True, help="the soup's run folder to write")
    p.add_argument("--tasks", nargs="*", default=[], metavar="[NAME=]DIR",
                   help="held-out classification folders (as trainer.evaluate --tasks): make a "
                        "greedy soup by their mean main metric; without them, a uniform soup")
    p.add_argument("--device", default="cpu", help="where held-out scoring runs (cpu or cuda)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        manifest = make_soup(args.ingredients, args.out, tasks=args.tasks, device=args.device)
    except SoupError as exc:
        if argv is not None:
            raise
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps({k: manifest[k] for k in ("soup", "kept", "checkpoint")}))
    return manifest


if __name__ == "__main__":
    main()
