"""Train the colour Fashion-MNIST feature classifier, precompute the real-data feature statistics, and measure
the shipped colour DDPM's float FD.

Writes `diffusers_ptq/zoo/assets/colour_classifier.safetensors` and `colour_fd_stats.safetensors` (mean and
covariance of the 128-d features of the 10k test and 60k training images), then samples `--fd-images`
images from the float `colour_ddpm` (DDIM `--fd-steps`, eta 0, the quality bench's noise for seed 0) and logs
their FD against the test statistics. Needs Debian's `dataset-fashion-mnist`:

    python benchmarks/train_colour_classifier.py --threads 1 --fd-images 0   # while the DDPM trains
    python benchmarks/train_colour_classifier.py --threads 1 --fd-only       # once the DDPM is done
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from training_common import classifier_parser, train_classifier

from diffusers_ptq.benchmark.metrics.fidelity import (
    FeatureStats,
    classifier_outputs,
    frechet_distance,
    inception_score,
    load_stats,
    save_stats,
)
from diffusers_ptq.benchmark.quality.report import save_image_grid
from diffusers_ptq.benchmark.quality.sampling import sample_images
from diffusers_ptq.zoo.colour_classifier import (
    COLOUR_CLASSIFIER_FILE,
    ColourFashionClassifier,
    load_colour_classifier,
)
from diffusers_ptq.zoo.data import load_colour_fashion
from diffusers_ptq.zoo.models import ASSETS_DIR, colour_ddpm_pipeline

STATS_FILE = ASSETS_DIR / "colour_fd_stats.safetensors"
COLOUR_LOSS_WEIGHT = 10.0  # colour MSE starts near 0.1, cross-entropy near 2.3: weigh them alike


def train(args: argparse.Namespace, train_x: torch.Tensor, train_y: torch.Tensor, train_c: torch.Tensor):
    def loss_fn(model: torch.nn.Module, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        features = model.embed(x)
        colour = F.mse_loss(model.colour_head(features), train_c[idx])
        return F.cross_entropy(model.head(features), train_y[idx]) + COLOUR_LOSS_WEIGHT * colour

    return train_classifier(ColourFashionClassifier(), train_x, args, loss_fn)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    log = Path("benchmarks/results/train_colour_classifier.json")
    parser = classifier_parser(__doc__, threads=1, log=log)
    parser.add_argument("--fd-images", type=int, default=1000, help="float DDPM samples for the logged FD")
    parser.add_argument("--fd-steps", type=int, default=100, help="DDIM steps of those samples")
    parser.add_argument(
        "--fd-only",
        action="store_true",
        help="skip training: measure the float DDPM's FD with the saved classifier and statistics and add it "
        "to the existing log (the DDPM and the classifier can then be trained at the same time)",
    )
    parser.add_argument(
        "--grid",
        type=Path,
        default=Path("benchmarks/results/colour_ddpm_float_grid.png"),
        help="where the first 64 float samples go",
    )
    parser.add_argument("--classifier-file", type=Path, default=COLOUR_CLASSIFIER_FILE)
    parser.add_argument("--stats-file", type=Path, default=STATS_FILE)
    return parser.parse_args(argv)


def train_and_save(args: argparse.Namespace) -> dict[str, object]:
    """Train, save the classifier and the statistics; the log's training part."""
    train_x, train_y, train_c = load_colour_fashion("train", root=args.data_root)
    test_x, test_y, test_c = load_colour_fashion("test", root=args.data_root)
    start = time.perf_counter()
    model = train(args, train_x, train_y, train_c)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        test_features, test_logits = classifier_outputs(model, test_x)
        train_features, _ = classifier_outputs(model, train_x)
        colour_mae = float((model.colour_head(test_features) - test_c).abs().mean())
    accuracy = (test_logits.argmax(-1) == test_y).float().mean().item()
    stats = {"test": FeatureStats.of(test_features), "train": FeatureStats.of(train_features)}
    args.classifier_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.classifier_file))
    save_stats(args.stats_file, stats)
    return {
        "args": {k: str(v) for k, v in vars(args).items()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "test_accuracy": round(accuracy, 4),
        "test_colour_mae": round(colour_mae, 4),
        "fd_train_vs_test": round(frechet_distance(stats["train"], stats["test"]), 3),
        "seconds": round(seconds, 1),
    }


def float_fd(args: argparse.Namespace) -> dict[str, object]:
    """FD and IS of the float colour DDPM's samples (seed 0 of the quality bench) against the test set."""
    model = load_colour_classifier(args.classifier_file)
    test_stats = load_stats(args.stats_file)["test"]
    start = time.perf_counter()
    images = sample_images(
        colour_ddpm_pipeline("ddim"), args.fd_images, 0, args.fd_steps, 250, desc="float", progress=False
    )
    features, logits = classifier_outputs(model, images)
    if args.grid is not None:
        save_image_grid(images[:64], args.grid)
    return {
        "fd_float_ddpm": {
            "images": args.fd_images,
            "ddim_steps": args.fd_steps,
            "seed": 0,
            "FD_vs_test": round(frechet_distance(FeatureStats.of(features), test_stats), 3),
            "IS": round(inception_score(logits), 3),
            "seconds": round(time.perf_counter() - start, 1),
        }
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    log = json.loads(args.log.read_text()) if args.fd_only else train_and_save(args)
    if args.fd_images > 0:
        log.update(float_fd(args))
    args.log.parent.mkdir(parents=True, exist_ok=True)
    args.log.write_text(json.dumps(log, indent=1) + "\n")
    print(json.dumps(log, indent=1))


if __name__ == "__main__":
    main()
