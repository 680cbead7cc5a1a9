"""The paper's per-category settings (Tables 9, 10, 11 and App. 7) as data.

``--preset mvtec`` (DDAD, Table 9), ``--preset mvtec-s`` (DDAD-S, Table 10) and ``--preset visa``
(DDAD, Table 11) pick the row of ``--category``; every value can still be overridden by a flag.
"""

from __future__ import annotations

from dataclasses import dataclass

MVTEC = ("carpet", "grid", "leather", "tile", "wood", "bottle", "cable", "capsule", "hazelnut", "metal_nut",
         "pill", "screw", "toothbrush", "transistor", "zipper")
VISA = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3",
        "pcb4", "pipe_fryum")

# (w, training epochs, feature-extractor (DA) epochs) per category, in the order of the names above.
_TABLE_9 = [(0, 2500, 0), (4, 2000, 6), (11, 2000, 8), (4, 1000, 0), (11, 2000, 16), (3, 1000, 5), (3, 3000, 0),
            (8, 1500, 8), (5, 2000, 3), (7, 3000, 1), (9, 1000, 4), (2, 2000, 4), (0, 2000, 2), (0, 2000, 0),
            (10, 1000, 6)]
# DDAD-S screw has no FE-epoch entry ("-") in the paper: no adaptation.
_TABLE_10 = [(0, 2000, 0), (5, 2000, 4), (6, 2000, 4), (4, 2000, 0), (4, 2000, 11), (8, 2000, 1), (0, 4000, 0),
             (11, 3000, 4), (0, 2000, 2), (3, 2000, 3), (11, 1000, 6), (2, 2000, None), (1, 2000, 2),
             (1, 4000, 7), (5, 2000, 4)]
_TABLE_11 = [(6, 1000, 1), (5, 1000, 3), (0, 1750, 0), (6, 1250, 0), (4, 1000, 3), (5, 500, 7), (2, 500, 11),
             (9, 500, 8), (5, 500, 5), (6, 500, 1), (6, 500, 1), (8, 500, 6)]


@dataclass(frozen=True)
class CategorySetting:
    preset: str
    category: str
    model: str  # UNet preset
    w: float
    epochs: int
    adapt_epochs: int | None  # None where the paper gives no value
    v: float
    lambda_dl: float
    batch_size: int  # denoiser training
    adapt_batch_size: int
    test_batch_size: int

    def overrides(self) -> dict:
        """The RunConfig sections this preset sets."""
        return {
            "data": {"dataset": "visa" if self.preset == "visa" else "mvtec", "category": self.category,
                     "image_size": 256, "channels": 3},
            "train": {"epochs": self.epochs, "batch_size": self.batch_size},
            "detect": {"sampler": {"start_step": 250, "skip": 25, "w": float(self.w), "eta": 1.0},
                       "scoring": {"mode": "combined", "v": self.v, "sigma": 4.0, "feature_layers": [2, 3]},
                       "backbone": "wide_resnet101_2", "crop": 0.875, "batch_size": self.test_batch_size},
            "adapt": {"epochs": self.adapt_epochs or 0, "batch_size": self.adapt_batch_size,
                      "lambda_dl": self.lambda_dl, "w": 3.0, "start_step": 250, "skip": 25},
        }


def _rows() -> dict[str, dict[str, CategorySetting]]:
    tables: dict[str, dict[str, CategorySetting]] = {"mvtec": {}, "mvtec-s": {}, "visa": {}}
    for name, (w, ep, fe) in zip(MVTEC, _TABLE_9):
        tables["mvtec"][name] = CategorySetting("mvtec", name, "ddad", w, ep, fe, 1.0, 0.1, 32, 16, 16)
    for name, (w, ep, fe) in zip(MVTEC, _TABLE_10):
        tables["mvtec-s"][name] = CategorySetting("mvtec-s", name, "ddad-s", w, ep, fe, 1.0, 0.1, 16, 16, 16)
    for name, (w, ep, fe) in zip(VISA, _TABLE_11):
        v = 1.5 if name == "cashew" else 7.0
        da_batch = 16 if name in ("macaroni2", "pcb1") else 32
        tables["visa"][name] = CategorySetting("visa", name, "ddad", w, ep, fe, v, 0.01, 32, da_batch, 32)
    return tables


PRESETS = _rows()


def get_setting(preset: str, category: str) -> CategorySetting:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    table = PRESETS[preset]
    if category not in table:
        raise ValueError(f"preset {preset!r} has no category {category!r}; categories: {', '.join(table)}")
    return table[category]


def format_table(preset: str | None = None) -> str:
    lines = []
    for name, table in PRESETS.items():
        if preset and name != preset:
            continue
        lines.append(f"--preset {name} (UNet {next(iter(table.values())).model}; T'=250, skip 25 (DDAD-10), eta 1, "
                     f"sigma 4, wide_resnet101_2, crop 224/256)")
        lines.append(f"  {'category':<12} {'w':>3} {'epochs':>6} {'DA ep':>5} {'v':>4} {'lambda':>6} "
                     f"{'batch':>5} {'DA bs':>5} {'test bs':>7}")
        for s in table.values():
            fe = "-" if s.adapt_epochs is None else str(s.adapt_epochs)
            lines.append(f"  {s.category:<12} {s.w:>3g} {s.epochs:>6} {fe:>5} {s.v:>4g} {s.lambda_dl:>6g} "
                         f"{s.batch_size:>5} {s.adapt_batch_size:>5} {s.test_batch_size:>7}")
        lines.append("")
    return "\n".join(lines)
