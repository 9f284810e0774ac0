"""The paper's optional flexify recipe parts against today's recipe, on the embedded model.

    python bench/bench_recipes.py [--variants today weak_bias weak_norms dm] [--k-every 4]

Each variant flexifies the shipped base (embedded:dit-mnist16-base) with shared weights for the default
400 steps, today's recipe plus one option (FlexifyConfig: weak_bias, weak_norms, dm_weight=1), then measures
what the shipped models' cards measure (scripts/build_embedded.py's `evaluate`: static native FID on 3 seed
sets, static weak, and "weak for the first k of 20 Euler steps" at CFG 2.0; 1,000 samples each, the same
seeds for every variant). Resumable: runs/bench-recipes/<variant>/ keeps the model and every finished number.
Prints one table row per variant and k.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from build_embedded import measure  # noqa: E402
from family import STEPS, band, curve, evaluate, largest_k_inside  # noqa: E402

from flexisearch.files import ASSETS  # noqa: E402
from flexisearch.metrics.featnet import DigitFeatureNet  # noqa: E402
from flexisearch.metrics.fid import ReferenceStats  # noqa: E402
from flexisearch.models.dit import FlexiDiT  # noqa: E402
from flexisearch.training.dit import FlexifyConfig, train_flexify  # noqa: E402

VARIANTS = {"today": {}, "weak_bias": {"weak_bias": True}, "weak_norms": {"weak_norms": True},
            "dm": {"dm_weight": 1.0}, "all": {"weak_bias": True, "weak_norms": True, "dm_weight": 1.0}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["today", "weak_bias", "weak_norms", "dm"], choices=list(VARIANTS))
    ap.add_argument("--k-every", type=int, default=4)
    ap.add_argument("--out", default="runs/bench-recipes")
    args = ap.parse_args()
    net = DigitFeatureNet.from_pretrained(ASSETS / "featnet")
    stats = ReferenceStats.load(ASSETS / "ref_stats_mnist16")
    rows = []
    for name in args.variants:
        out = Path(args.out) / name
        if not (out / "flexify" / "model" / "config.json").is_file():
            train_flexify(FlexifyConfig(base="embedded:dit-mnist16-base", mode="shared", **VARIANTS[name]),
                          out / "flexify")
        log = [json.loads(line) for line in (out / "flexify" / "loss.jsonl").read_text().splitlines()]
        res = evaluate(FlexiDiT.from_pretrained(out / "flexify" / "model"), out, measure(net, stats), args.k_every)
        values, _, _, limit = band(res)
        rows.append((name, log[-1]["elapsed_s"], values, limit, res["weak@4"]["fid"], dict(curve(res, 4)),
                     largest_k_inside(res, 4)))
    ks = sorted({k for row in rows for k in row[5]})
    print(f"# shared flexify of embedded:dit-mnist16-base, 400 steps; FID (1,000 samples) of weak for the first k of "
          f"{STEPS} Euler steps, CFG 2.0")
    print("| variant | flexify min | static native, 3 seed sets | band (mean + 2 std) | static weak | "
          + " | ".join(f"k={k} ({100 * (1 - rows[0][5][k]['fraction']):.0f}% saved)" for k in ks)
          + " | largest k inside the band |")
    print("|---" * (6 + len(ks)) + "|")
    for name, secs, values, limit, weak, points, best in rows:
        print(f"| {name} | {secs / 60:.1f} | {', '.join(f'{b:.3f}' for b in values)} | {limit:.3f} | {weak:.2f} | "
              + " | ".join(f"{points[k]['fid']:.2f}" for k in ks) + f" | {best} |")


if __name__ == "__main__":
    main()
