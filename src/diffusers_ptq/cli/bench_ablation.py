"""`diffusers-ptq bench --ablation`: the studies' options and their settings, checked before any work."""

from __future__ import annotations

import argparse
from typing import Any

from diffusers_ptq.benchmark.ablation.benchmark import ablation_rows
from diffusers_ptq.benchmark.ablation.settings import SELECTORS, STUDIES, AblationSettings, parse_groups
from diffusers_ptq.benchmark.quality.settings import check_seed


def comma_names(text: str) -> list[str]:
    """Comma-separated names, blanks dropped."""
    return [part.strip() for part in text.split(",") if part.strip()]


# Which study each option applies to.
_SEARCH_OPTIONS = ("--search-epochs", "--search-images", "--search-lambda", "--search-init-logit")
ABLATION_ONLY = (
    "--rows", "--groups", "--selectors", "--sizes", *_SEARCH_OPTIONS, "--feature-samples",
    "--calibration-seeds",
)  # fmt: skip
_STUDY_OPTIONS = {
    "--rows": "w4",
    "--groups": "groups",
    "--selectors": "selectors",
    "--sizes": "selectors",
    "--feature-samples": "selectors",
}


def add_ablation_arguments(b: argparse.ArgumentParser) -> None:
    default = AblationSettings()
    b.add_argument(
        "--ablation",
        metavar="{groups,selectors,w4}",
        help="run an ablation instead of the preset rows: 'groups' (timestep groups G at each bit setting; "
        "--bits default W6A6,W8A8), 'selectors' (calibration-sample selectors x calibration sizes; --bits "
        "default W6A6) or 'w4' (nearest vs GPTQ, group scales 128/64, bias correction off/layer/output, "
        "G = 1/8/per-step with and without bias correction, the default recipe; --bits default W4A8). "
        "Writes table.md, results.json, a plot and grids/ into --output; "
        "--calibration-samples sets the groups and w4 studies' calibration size. Default sampling: "
        f"{default.num_samples} images x seeds {','.join(map(str, default.seeds))}.",
    )
    b.add_argument(
        "--rows",
        type=comma_names,
        help="--ablation w4: comma-separated row labels to run (e.g. 'nearest,gptq bias=layer,default "
        "recipe'), in the study's order. Default: all.",
    )
    b.add_argument(
        "--calibration-seeds",
        type=comma_names,
        help="--ablation: comma-separated calibration seeds (e.g. 0,1,2): every quantized row runs once per "
        "calibration draw, on the same sampling noise and float row, and the table gains each recipe's FD "
        "change per draw, its mean and spread. Instead of --calibration-seed. Default: 0.",
    )
    b.add_argument(
        "--groups",
        type=comma_names,
        help="--ablation groups: comma-separated G, integers or per_step. Default: 1,4,8,16,per_step.",
    )
    b.add_argument(
        "--selectors",
        type=comma_names,
        help=f"--ablation selectors: comma-separated, of {','.join(SELECTORS)} ('active' adds its "
        "'random+search' baseline). Default: all.",
    )
    b.add_argument(
        "--sizes",
        type=comma_names,
        help="--ablation selectors: comma-separated calibration sizes. Default: "
        f"{','.join(map(str, default.sizes))}.",
    )
    b.add_argument(
        "--search-epochs",
        type=int,
        help="--ablation: group-search epochs after selection (bounds its CPU cost). Default: apq-dm's 10.",
    )
    b.add_argument(
        "--search-images",
        type=int,
        help="--ablation: float samples the group search's noise target draws from. Default: apq-dm's 1024.",
    )
    b.add_argument(
        "--search-lambda",
        type=float,
        help="--ablation: the group search's entropy weight (group_search.entropy_weight). Default: "
        "apq-dm's 0.8.",
    )
    b.add_argument(
        "--search-init-logit",
        type=float,
        help="--ablation: the starting logit of each step's initial group (group_search.init_logit). "
        "Default: apq-dm's 1.0.",
    )
    b.add_argument(
        "--feature-samples",
        type=int,
        help="--ablation selectors: trajectories of density_diversity's float feature pass. Default: "
        "eda-dm's 1024.",
    )


def _ints(option: str, texts: list[str], what: str, expected: str) -> list[int]:
    values = []
    for text in texts:
        try:
            values.append(int(text))
        except ValueError:
            raise ValueError(f"{option}: {text!r} is not {what}; expected {expected}") from None
    return values


def _calibration_seeds(args: argparse.Namespace) -> list[int] | None:
    """--calibration-seeds as integers, or --calibration-seed as a one-draw list (None: neither given)."""
    if args.calibration_seeds is not None:
        if args.calibration_seed is not None:
            raise ValueError("--calibration-seed and --calibration-seeds both given; use one of them")
        return _ints("--calibration-seeds", args.calibration_seeds, "a seed", "integers >= 0")
    if args.calibration_seed is not None:
        check_seed("calibration_seed", args.calibration_seed)
        return [args.calibration_seed]
    return None


def ablation_settings(args: argparse.Namespace) -> AblationSettings:
    study = args.ablation
    if study not in STUDIES:
        raise ValueError(f"--ablation {study!r} is invalid; expected one of {', '.join(STUDIES)}")
    fixed = ("--presets", "--no-reconstruction", "--compare-quanto")
    for option in fixed if study == "w4" else (*fixed, "--reconstruction-minutes"):
        if getattr(args, option.lstrip("-").replace("-", "_")) is not None:
            raise ValueError(
                f"{option} does not apply to --ablation {study} (its rows fix their own recipes)"
            )
    for option in ("--prompts", "--guidance-scale", "--clip-model"):
        if getattr(args, option.lstrip("-").replace("-", "_")) is not None:
            raise ValueError(f"{option} does not apply to --ablation (it samples unconditional models only)")
    for option, owner in _STUDY_OPTIONS.items():
        if owner != study and getattr(args, option.lstrip("-").replace("-", "_")) is not None:
            raise ValueError(f"{option} applies to --ablation {owner}, not --ablation {study}")
    if study == "w4":
        for option in _SEARCH_OPTIONS:
            if getattr(args, option.lstrip("-").replace("-", "_")) is not None:
                raise ValueError(f"{option} does not apply to --ablation w4 (its rows run no group search)")
    if study == "selectors" and args.calibration_samples is not None:
        raise ValueError("--calibration-samples does not apply to --ablation selectors; use --sizes")
    overrides: dict[str, Any] = {}
    if args.groups is not None:
        overrides["groups"] = [parse_groups(g) for g in args.groups]
    if args.sizes is not None:
        overrides["sizes"] = _ints("--sizes", args.sizes, "a calibration size", "integers >= 1")
    seeds = _calibration_seeds(args)
    if seeds is not None:
        overrides["calibration_seeds"] = seeds
    names = (
        "bits", "rows", "selectors", "search_epochs", "search_images", "search_lambda", "search_init_logit",
        "feature_samples", "calibration_samples", "reconstruction_minutes",
        "num_samples", "seeds", "num_inference_steps", "batch_size", "sqnr_samples",
    )  # fmt: skip
    overrides.update({n: getattr(args, n) for n in names if getattr(args, n) is not None})
    settings = (
        AblationSettings.quick(study, **overrides) if args.quick else AblationSettings(study, **overrides)
    )
    ablation_rows(settings)  # validates the settings and builds every recipe before any model runs
    return settings
