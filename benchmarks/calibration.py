"""Calibration on normals (``vsad_lightning.models.calibration``): modes, floor and thresholds.

    python benchmarks/calibration.py --ckpt runs/.../checkpoints/final.ckpt \\
        --root data/synthetic --category brick [--resolution 128] [--image-size 64]

From one fitted checkpoint (its bank and config): the leave-one-out (LOO) maps of the training
normals and the raw maps of the test set are computed once, then

1. view / sample / pixel AUROC per calibration mode and per ``calibration_floor``;
2. how well the OK/NG thresholds carry to unseen normals with ~40 normals per category: the
   LOO normals are split 40 times into two halves, the calibration is fitted on one half and
   the share of the other half's views and samples it calls NG is measured (normals only, no
   test label), next to the share of test normals called NG.

It prints a markdown table; nothing is written. About a minute of CPU for the demo's brick.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from vsad_lightning.data.datamodule import MultiViewDataModule
from vsad_lightning.metrics.curves import exact_auroc
from vsad_lightning.models.calibration import CALIBRATION_MODES, Calibration
from vsad_lightning.system.module import VSADModule

RULES = (("quantile", 0.9), ("quantile", 0.95), ("quantile", 0.99), ("sigma", 2.0), ("sigma", 3.0))
FLOORS = (0.0, 0.5, 1.0, 1.5, 2.0)


def _auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return exact_auroc(scores.flatten().numpy(), labels.flatten().long().numpy())


def load(args) -> dict[str, torch.Tensor]:
    state = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    hparams = {k: v for k, v in state["hyper_parameters"].items() if not k.startswith("_")}
    module = VSADModule(**{**hparams, "calibration": "none"})
    module.load_state_dict(state["state_dict"])
    module.eval()
    data = MultiViewDataModule(
        args.root, args.category, resolution=args.resolution, image_size=args.image_size,
        neighbour_graph=args.neighbour_graph, eval_batch_size=4,
    )  # fmt: skip
    data.setup("test")
    raw, view_labels, sample_labels, masks = [], [], [], []
    for batch in data.test_dataloader():
        raw.append(module.score(batch).anomaly_maps[:, :, 0])
        view_labels.append(batch.view_labels)
        sample_labels.append(batch.sample_labels)
        masks.append(batch.masks[:, :, 0])
    bank = module.memory_bank
    if bank.grid(bank.levels[0]) is None:
        sys.exit("this benchmark reads the LOO features from a bank of whole maps (coreset 1.0)")
    started = time.perf_counter()
    samples = torch.arange(bank.num_samples(bank.levels[0]))
    loo = module.leave_one_out_maps(
        samples,
        lambda ids: {level: bank.sample_features(level, ids) for level in bank.levels},
        batch.image_size,
    )
    print(f"LOO maps of {len(samples)} normals: {time.perf_counter() - started:.1f} s\n")
    return {
        "raw": torch.cat(raw)[:, :, None],
        "view_labels": torch.cat(view_labels),
        "sample_labels": torch.cat(sample_labels),
        "masks": torch.cat(masks),
        "loo": loo,
    }


def modes_and_floors(d: dict[str, torch.Tensor]) -> None:
    print("| floor | mode | view AUROC | sample AUROC | pixel AUROC |")
    print("|---|---|---|---|---|")
    for floor in FLOORS:
        calibration = Calibration()
        calibration.fit(d["loo"], floor=floor)
        for mode in CALIBRATION_MODES if floor == 1.0 else ("position",):
            out = calibration.apply(d["raw"], mode)
            print(
                f"| {floor} | {mode} | {_auroc(out.view_scores, d['view_labels']):.4f} | "
                f"{_auroc(out.sample_scores, d['sample_labels']):.4f} | "
                f"{_auroc(out.maps, d['masks']):.4f} |"
            )


def threshold_stability(d: dict[str, torch.Tensor], half: int, repeats: int) -> None:
    loo, raw = d["loo"], d["raw"]
    normal_views, normal_samples = d["view_labels"] == 0, d["sample_labels"] == 0
    generator = torch.Generator().manual_seed(0)
    splits = [torch.randperm(loo.shape[0], generator=generator) for _ in range(repeats)]
    print(
        f"\nNG share, thresholds fitted on {half} LOO normals (mean ± std over {repeats} splits)\n"
    )
    print("| mode | rule | other LOO normals: views | samples | test normals: views | samples |")
    print("|---|---|---|---|---|---|")
    for mode in CALIBRATION_MODES:
        for rule, value in RULES:
            shares: list[list[float]] = [[], [], [], []]
            for order in splits:
                calibration = Calibration()
                calibration.fit(loo[order[:half]], rule=rule, value=value)
                other = calibration.apply(loo[order[half:]][:, :, None], mode)
                test = calibration.apply(raw, mode)
                shares[0].append(other.view_labels.float().mean())
                shares[1].append(other.sample_labels.float().mean())
                shares[2].append(test.view_labels[normal_views].float().mean())
                shares[3].append(test.sample_labels[normal_samples].float().mean())
            cells = [
                f"{100 * torch.stack(s).mean():.1f} ± {100 * torch.stack(s).std():.1f} %"
                for s in shares
            ]
            print(f"| {mode} | {rule} {value} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--neighbour-graph", default="top_and_ring")
    parser.add_argument("--half", type=int, default=40, help="normals per calibration split")
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load(args)
    modes_and_floors(data)
    if data["loo"].shape[0] > args.half:
        threshold_stability(data, args.half, args.repeats)


if __name__ == "__main__":
    main()
