"""Build the shipped networks other than the class-conditional FlexiDiTs (scripts/build_embedded.py):
the FID feature net and its statistics, the tiny CLIP, the text-to-image FlexiTextDiT and their cards.

    python scripts/build_assets.py featnet --out flexisearch/assets [--seed 0 --steps 1500]
    python scripts/build_assets.py clip-train [--out flexisearch/assets/text/clip --steps N]
    python scripts/build_assets.py clip-eval [--path flexisearch/assets/text/clip]
    python scripts/build_assets.py text-pretrain --out runs/train/text-base [--steps N]
    python scripts/build_assets.py text-flexify --base runs/train/text-base/model --out runs/train/text-lora [--steps N]
    python scripts/build_assets.py text-ship --model runs/train/text-lora/model --dest flexisearch/assets/text/flexidit-mnist16
    python scripts/build_assets.py text-card --model flexisearch/assets/text/flexidit-mnist16 [--out card.json]

Training runs are resumable: run the same command again after an interruption.
"""

from __future__ import annotations

import argparse
import json

from flexisearch.files import atomic_write_bytes
from flexisearch.metrics.tiny_clip import ASSET as CLIP_ASSET
from flexisearch.models.text_dit import FlexiTextDiT
from flexisearch.training.cards import model_card
from flexisearch.training.clip import CLIPTrainConfig, evaluate_clip, train_clip
from flexisearch.training.featnet import build_feature_assets
from flexisearch.training.text_dit import (
    TextBaseTrainConfig,
    TextFlexifyConfig,
    ship_prompt_table,
    train_text_base,
    train_text_flexify,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("featnet", help="train the FID digit feature net, write it and the reference statistics")
    p.add_argument("--out", default="flexisearch/assets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1500)
    p = sub.add_parser("clip-train", help="train the tiny digit CLIP")
    p.add_argument("--out", default=str(CLIP_ASSET))
    p.add_argument("--steps", type=int)
    p = sub.add_parser("clip-eval", help="zero-shot accuracy and CLIP score of a tiny CLIP")
    p.add_argument("--path", default=str(CLIP_ASSET))
    p = sub.add_parser("text-pretrain", help="pretrain the static text-to-image DiT")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int)
    p = sub.add_parser("text-flexify", help="LoRA-flexify the text-to-image DiT")
    p.add_argument("--base", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int)
    p = sub.add_parser("text-ship", help="install the shipped prompt table and save to --dest")
    p.add_argument("--model", required=True)
    p.add_argument("--dest", required=True)
    p.add_argument("--per-digit", type=int, default=6)
    p = sub.add_parser("text-card", help="CLIP vs FLOPs of a text model on its held-out prompts")
    p.add_argument("--model", required=True)
    p.add_argument("--out")
    p.add_argument("--per-prompt", type=int, default=10)
    args = ap.parse_args()
    steps = {"steps": args.steps} if getattr(args, "steps", None) else {}
    if args.cmd == "featnet":
        print(json.dumps(build_feature_assets(args.out, seed=args.seed, steps=args.steps), indent=1))
    elif args.cmd == "clip-train":
        print(json.dumps(train_clip(CLIPTrainConfig(**steps), args.out), indent=1))
    elif args.cmd == "clip-eval":
        print(json.dumps(evaluate_clip(args.path), indent=1))
    elif args.cmd == "text-pretrain":
        train_text_base(TextBaseTrainConfig(**steps), args.out)
    elif args.cmd == "text-flexify":
        train_text_flexify(TextFlexifyConfig(base=args.base, **steps), args.out)
    elif args.cmd == "text-ship":
        model = FlexiTextDiT.from_pretrained(args.model)
        ship_prompt_table(model, args.per_digit)
        model.save_pretrained(args.dest)
    else:
        text = json.dumps(model_card(args.model, args.per_prompt), indent=1)
        if args.out:
            atomic_write_bytes(args.out, (text + "\n").encode())
        print(text)


if __name__ == "__main__":
    main()
