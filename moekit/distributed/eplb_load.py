"""Measuring expert load for EPLB: a sliding-window recorder on the device, and the load files it writes.

    every MoE layer l of a step:  recorder.record(l, topk_ids)     current[l, e] += #entries routed to e
    end of the step:              recorder.step()                  window[row] = current; current = 0; row += 1
    whenever a plan is due:       rebalance_experts(recorder.load(), ...)   load = Σ window over the last W steps

Everything a step does runs on the device into buffers made once at construction (the ring row is a device
tensor too), with no host sync, so recording can stay on at decode and inside a captured CUDA graph: a replay
advances the ring exactly as an eager step would.

File formats (``write_expert_load`` / ``read_expert_load``; the format follows the suffix):

- ``.json``: ``{"format": "moekit.expert_load", "version": 1, "num_layers": L, "num_experts": E, "steps": n,
  "load": [[...E numbers...] × L]}``; ``steps`` (how many steps the counts cover) may be null.
- ``.csv``: a header ``layer,expert_0,...,expert_{E-1}``, then one line per layer in order:
  ``l,count_0,...,count_{E-1}``.

Loads are non-negative numbers (the recorder writes integer token counts; hand-made files may hold floats).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import torch

from moekit._checks import check_int_dtype, check_ndim, check_positive

__all__ = ["ExpertLoadRecorder", "read_expert_load", "write_expert_load"]

FORMAT = "moekit.expert_load"
VERSION = 1


class ExpertLoadRecorder:
    """Per layer, per logical expert counts of routed (token, k) entries over the last ``window`` steps.

    Args:
        num_layers: L, MoE layers recorded.
        num_experts: E, logical experts per layer.
        window: W, steps summed by ``load()``.
        device: where the buffers live (the device of the ``topk_ids`` recorded).

    Buffers: ``current`` int64 [L, E] (the step in progress), ``window_counts`` int64 [W, L, E] (a ring of
    completed steps), ``row`` and ``steps`` int64 [1] (the ring's next row, the steps completed so far).
    """

    def __init__(self, num_layers: int, num_experts: int, window: int = 1000,
                 device: torch.device | str | None = None) -> None:
        check_positive("num_layers", num_layers)
        check_positive("num_experts", num_experts)
        check_positive("window", window)
        self.num_layers, self.num_experts, self.window = num_layers, num_experts, window
        kw = {"dtype": torch.int64, "device": device if device is not None else "cpu"}
        self.current = torch.zeros(num_layers, num_experts, **kw)
        # The buffers' own device: "cuda" given as such becomes "cuda:N", which is what topk_ids report.
        self.device = self.current.device
        self.window_counts = torch.zeros(window, num_layers, num_experts, **kw)
        self.row = torch.zeros(1, **kw)
        self.steps = torch.zeros(1, **kw)
        # index_add_ reads this one element through a stride-0 view: no source tensor is made per call.
        self._one = torch.ones(1, **kw)

    def record(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Count ``topk_ids`` ([T, K] or any shape of logical ids in [0, E)) into ``layer``'s current step.

        No host sync; an id outside [0, E) raises an IndexError (a device-side assert on CUDA).
        """
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: expected an int in [0, {self.num_layers}), got {layer!r}")
        if not isinstance(topk_ids, torch.Tensor):
            raise TypeError(f"topk_ids: expected a torch.Tensor, got {type(topk_ids).__name__}")
        check_int_dtype("topk_ids", topk_ids)
        if topk_ids.device != self.device:
            raise ValueError(f"topk_ids: expected device {self.device} (the recorder's), got {topk_ids.device}")
        ids = topk_ids.reshape(-1)
        if ids.dtype not in (torch.int32, torch.int64):  # index_add_ takes these; uint8 would not index as numbers
            ids = ids.long()
        # Indexing the layer's own [E] row (not a flat [L * E] view) keeps the bounds check: an id >= E must not
        # land in the next layer's counts.
        self.current[layer].index_add_(0, ids, self._one.expand(ids.numel()))

    def step(self) -> None:
        """Close the current step: it becomes the newest of the window (replacing the oldest), counts restart."""
        self.window_counts.index_copy_(0, self.row, self.current.unsqueeze(0))
        self.current.zero_()
        self.row.add_(1).remainder_(self.window)
        self.steps.add_(1)

    def load(self) -> torch.Tensor:
        """int64 [L, E]: the counts of the last min(steps, W) completed steps (the step in progress excluded)."""
        return self.window_counts.sum(dim=0)

    def reset(self) -> None:
        """Forget everything recorded (e.g. after a rebalancing moved the experts)."""
        for t in (self.current, self.window_counts, self.row, self.steps):
            t.zero_()

    def save(self, path: str | Path) -> None:
        """Write ``load()`` to ``path`` (.json or .csv, see the module docstring)."""
        write_expert_load(path, self.load(), steps=min(int(self.steps.item()), self.window))


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in (".json", ".csv"):
        raise ValueError(f"path: expected a .json or .csv file, got {str(path)!r}")
    return suffix


def write_expert_load(path: str | Path, load: torch.Tensor, *, steps: int | None = None) -> None:
    """Write an [L, E] load (integer or real, >= 0) as JSON or CSV, chosen by ``path``'s suffix."""
    path = Path(path)
    suffix = _suffix(path)
    check_ndim("load", load, 2, "[L, E]")
    if load.dtype.is_complex or load.dtype == torch.bool:
        raise TypeError(f"load: expected an integer or real dtype, got {str(load.dtype).removeprefix('torch.')}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ValueError(f"steps: expected None or an int >= 0, got {steps!r}")
    if 0 in load.shape:
        raise ValueError(f"load: expected at least one layer and one expert, got shape {tuple(load.shape)}")
    values = load.detach().cpu().double()
    if not bool((torch.isfinite(values) & (values >= 0)).all()):
        bad = values[~(torch.isfinite(values) & (values >= 0))][0].item()
        raise ValueError(f"load: expected finite loads >= 0 (what read_expert_load accepts), got {bad}")
    rows = load.detach().cpu().tolist()
    if suffix == ".json":
        doc = {"format": FORMAT, "version": VERSION, "num_layers": load.shape[0], "num_experts": load.shape[1],
               "steps": steps, "load": rows}
        path.write_text(json.dumps(doc) + "\n")
        return
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["layer", *(f"expert_{e}" for e in range(load.shape[1]))])
        for layer, row in enumerate(rows):
            writer.writerow([layer, *row])


def _number(text: str, where: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{where}: expected a number, got {text!r}") from None


def _read_csv(path: Path) -> list[list]:
    with path.open(newline="") as f:
        lines = [line for line in csv.reader(f) if line]
    if not lines:
        raise ValueError(f"{path}: empty; expected a header 'layer,expert_0,...' and one line per layer")
    header, body = lines[0], lines[1:]
    expected = ["layer", *(f"expert_{e}" for e in range(len(header) - 1))]
    if [h.strip() for h in header] != expected or len(header) < 2:
        raise ValueError(f"{path}: line 1: expected the header 'layer,expert_0,...,expert_{{E-1}}', "
                         f"got {','.join(header)!r}")
    rows = []
    for n, line in enumerate(body, start=2):
        if len(line) != len(header):
            raise ValueError(f"{path}: line {n}: expected {len(header)} fields (layer + {len(header) - 1} experts), "
                             f"got {len(line)}")
        if line[0].strip() != str(n - 2):
            raise ValueError(f"{path}: line {n}: expected layer {n - 2} (layers in order from 0), got {line[0]!r}")
        rows.append([_number(v.strip(), f"{path}: line {n}") for v in line[1:]])
    return rows


def _read_json(path: Path) -> list[list]:
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("load"), list):
        raise ValueError(f"{path}: expected a JSON object with \"format\": \"{FORMAT}\" and a \"load\" list of "
                         "per-layer lists (written by ExpertLoadRecorder.save or moekit eplb)")
    if doc.get("version") != VERSION:
        raise ValueError(f"{path}: expected version {VERSION}, got {doc.get('version')!r}")
    rows = doc["load"]
    for key, size in (("num_layers", len(rows)), ("num_experts", len(rows[0]) if rows and isinstance(rows[0], list)
                                                                  else None)):
        if key in doc and size is not None and doc[key] != size:
            raise ValueError(f"{path}: {key} is {doc[key]!r} but load has {size}")
    for layer, row in enumerate(rows):
        if not isinstance(row, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 for v in row):
            raise ValueError(f"{path}: load[{layer}]: expected a list of numbers, got {str(row)[:60]}")
    return rows


def read_expert_load(path: str | Path) -> torch.Tensor:
    """Read a load file (.json or .csv by suffix) into [L, E]: int64 when every entry is an integer, else float64.

    Raises OSError if the file cannot be read and ValueError (naming the file, line or layer) if it is malformed:
    ragged layers, no layer, a negative or non-finite load, a missing header.
    """
    path = Path(path)
    rows = _read_json(path) if _suffix(path) == ".json" else _read_csv(path)
    if not rows or not rows[0]:
        raise ValueError(f"{path}: expected at least one layer and one expert, got none")
    for layer, row in enumerate(rows):
        if len(row) != len(rows[0]):
            raise ValueError(f"{path}: layer {layer}: expected {len(rows[0])} experts (as layer 0), got {len(row)}")
        bad = [v for v in row if not (math.isfinite(v) and v >= 0)]
        if bad:
            raise ValueError(f"{path}: layer {layer}: expected finite loads >= 0, got {bad[0]}")
    integral = all(isinstance(v, int) for row in rows for v in row)
    try:
        return torch.tensor(rows, dtype=torch.int64 if integral else torch.float64)
    except (OverflowError, RuntimeError):  # an integer beyond int64
        raise ValueError(f"{path}: a load does not fit in int64") from None
