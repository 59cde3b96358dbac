"""A late prompt's frozen states: each training and validation row's states entering block K, computed once and kept.

Nothing below block K depends on a late prompt (lm/depth.py), so a row's states there are the
same every epoch. They are computed the first time the row is drawn and kept in memory up to
a bound; past it they are appended to a file in the run directory and read back from there
(the page cache keeps the hot ones), and if the disk refuses, the rows past the bound are
recomputed each time. The file is the run's alone: it is removed when the run ends, a killed
run's is removed when the next run starts, and nothing of it reaches the bank.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ptcli.lm.frozen import TextKV, first_rows, states_below, texts_and_posts


class FrozenStates:
    """States (T, H) entering block `layer` of the rows a run has met, by row key."""

    def __init__(self, model, layer: int, bound: int, spill: Path | None = None):
        self.model, self.layer, self.bound, self.spill = model, layer, bound, spill
        self.kept: dict[tuple, torch.Tensor] = {}  # row key -> (T, H), in memory
        self.texts: dict[tuple, TextKV] = {}  # (tag, row) -> its text's keys and values from block K up
        self.spilled: dict[tuple, tuple[int, tuple[int, ...], torch.dtype]] = {}  # row key -> offset, shape, dtype
        self.bytes = 0  # kept in memory
        self.spill_bytes = 0  # written to the spill file
        self.computed = 0  # rows run below K, kept or not (a text run again for its keys and values: one)
        self.refused: str | None = None  # why the spill file stopped taking rows (a full disk)
        if spill is not None:
            with contextlib.suppress(OSError):  # a killed run's; a file that cannot go is not this run's problem
                spill.unlink()

    def get(self, keys: list[tuple], seqs: list[list[int]]) -> list[torch.Tensor]:
        """Each row's states; rows met for the first time run below K now (seqs: the rows, prompt slots in place)."""
        missing = [j for j, k in enumerate(keys) if k not in self.kept and k not in self.spilled]
        fresh = dict(zip(missing, states_below(self.model, self.layer, [seqs[j] for j in missing]) if missing else []))
        self.computed += len(missing)
        for j, states in fresh.items():
            self._keep(keys[j], states)
        return [fresh[j] if j in fresh else self._read(k) for j, k in enumerate(keys)]

    def split(
        self, keys: list[tuple], example: list[int], seqs: list[list[int]], cut: list[int]
    ) -> tuple[list[torch.Tensor], list[TextKV]]:
        """Rows whose prompt follows their text (cut: each row's first slot): each row from its first slot on, and
        each example's text (example: 0 .. E-1 a row) as keys and values at the blocks from K up (frozen.text_kv).

        Both are kept, the text by (tag, row) for all its candidates: a kept text never runs again,
        and a step runs only the prompt and the answer. Texts past the bound are run each time.
        A text that runs, runs once through the whole base for all its candidates
        (frozen.texts_and_posts), not once per candidate below K.
        """
        first = first_rows(example)
        text_key = {e: keys[r][:2] for e, r in first.items()}
        missing = [j for j, k in enumerate(keys) if k not in self.kept and k not in self.spilled]
        run = sorted({e for e in first if text_key[e] not in self.texts} | {example[j] for j in missing})
        kvs: dict[int, TextKV] = {}
        fresh: dict[int, torch.Tensor] = {}
        if run:
            at = {e: n for n, e in enumerate(run)}
            texts = [seqs[first[e]][: cut[first[e]]] for e in run]
            got_kv, got = texts_and_posts(
                self.model, self.layer, texts, [at[example[j]] for j in missing], [seqs[j][cut[j] :] for j in missing]
            )
            kvs, fresh = dict(zip(run, got_kv)), dict(zip(missing, got))
        self.computed += len(missing) + len(set(run) - {example[j] for j in missing})  # a text run again: one row
        for j, states in fresh.items():
            self._keep(keys[j], states)
        for e, kv in kvs.items():
            size = sum(t.numel() * t.element_size() for pair in kv for t in pair)
            if text_key[e] not in self.texts and self.bytes + size <= self.bound:  # past the bound: the text runs again
                self.texts[text_key[e]], self.bytes = kv, self.bytes + size
        posts = [fresh[j] if j in fresh else self._read(k) for j, k in enumerate(keys)]
        return posts, [kvs[e] if e in kvs else self.texts[text_key[e]] for e in range(len(first))]

    def _keep(self, key: tuple, states: torch.Tensor) -> None:
        size = states.numel() * states.element_size()
        if self.bytes + size <= self.bound:
            self.kept[key], self.bytes = states, self.bytes + size
        elif self.spill is not None and self.refused is None:
            try:
                self.spill.parent.mkdir(parents=True, exist_ok=True)
                with open(self.spill, "ab") as f:
                    f.write(states.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            except OSError as e:  # a full disk: the rows past the bound are recomputed from here on
                self.refused = str(e)
                return
            self.spilled[key] = (self.spill_bytes, tuple(states.shape), states.dtype)
            self.spill_bytes += size

    def _read(self, key: tuple) -> torch.Tensor:
        if key in self.kept:
            return self.kept[key]
        offset, shape, dtype = self.spilled[key]
        n = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        assert self.spill is not None  # spilled rows came through it
        with open(self.spill, "rb") as f:
            f.seek(offset)
            data = bytearray(f.read(n))
        device = self.model.get_input_embeddings().weight.device
        return torch.frombuffer(data, dtype=dtype).view(shape).to(device)

    def close(self) -> None:
        """Remove the spill file: the run is over (finished, stopped or failed)."""
        if self.spill is not None:
            with contextlib.suppress(FileNotFoundError):
                self.spill.unlink()
