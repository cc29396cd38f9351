"""`diffusers-ptq bench --ablation`: the papers' ablations in miniature, as rows of the quality benchmark.

Every row is one PTQConfig over a shared base recipe, so only what the study varies differs between rows.
Rows run through `quality.run_rows`: the same per-image noise in every row (and in the float row), the
same float trajectories for the noise SQNR, the same fidelity metric. With several calibration seeds
(`AblationSettings.calibration_seeds`) every quantized row runs once per draw, and `draws.py` summarises
each recipe over its draws.

Base recipe of both studies: the apq-dm preset's quantizers (asymmetric per-channel weights and asymmetric
per-tensor activations, lp search with p = 2.4, first/last layers at 8 bits), block reconstruction off,
calibration through the 'random' selector with CalibrationConfig's default sampler: every sampling step
equally often (`sampler="uniform"`, `step_interval=1`) on random noise trajectories. The config has no
i.i.d. uniform timestep draw, so 'random' is its stratified form: uniform over steps, random samples.
Two properties of that sampler to keep in mind when reading the table: each trajectory records every step,
so N samples come from only ceil(N / steps) noise draws (N = 128 at DDIM-100: 2); and the remainder of
N / steps goes to the noisiest steps (N = 128: steps 0-27 get 2 samples, the rest 1).
With one shared base, the 'groups' study's G = 1 row and the 'selectors' study's 'random' row at the
same size are the same recipe, and the 'active' row is the apq-dm preset at that calibration size.

- groups: G = 1 (one scale, no search), G in {4, 8, 16} (APQ-DM group search with that G; epochs and
  target images from the preset unless capped), 'per_step' (one scale per sampling step initialised from
  that step's samples, TFMQ-DM FSC form; no search).
- selectors (G = 1, no search, unless stated): 'random' (above); 'normal' (PTQ4DM's released-code sampler,
  t ~ N(0.4 T, (0.4 T)^2) from the ptq4dm preset, one step per trajectory); 'uniform' (Q-Diffusion: every
  5th step, the paper's DDIM-100 CIFAR-10 setting); 'density_diversity' (EDA-DM TDAC with the eda-dm
  preset's r, lambda and feature pass); 'active' (APQ-DM: G = 8 and the group search, which active
  selection needs). Because 'active' cannot run without the search, every size with 'active' also gets
  'random+search': the 'random' samples with the same G = 8 search, active's fair baseline.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from diffusers_ptq.benchmark.ablation.draws import draw_name, summarise_draws
from diffusers_ptq.benchmark.ablation.settings import PER_STEP, AblationSettings
from diffusers_ptq.benchmark.ablation.w4 import W4_ROWS, w4_notes, w4_recipe
from diffusers_ptq.benchmark.quality.benchmark import (
    Fidelity,
    RowResult,
    RowSpec,
    check_unconditional,
    run_rows,
)
from diffusers_ptq.benchmark.quality.sampling import ddim_pipeline, record_trajectory
from diffusers_ptq.benchmark.quality.settings import parse_bits
from diffusers_ptq.config import PTQConfig

BASE_PRESET = "apq-dm"
# Q-Diffusion's CIFAR-10 calibration on DDIM-100: every 5th sampling step (docs/methods.md).
UNIFORM_STEP_INTERVAL = 5
RANDOM_CALIBRATION: dict[str, Any] = {"selector": "random", "sampler": "uniform", "step_interval": 1}
SEARCH_LABEL = "random+search"


@dataclass
class AblationRow:
    """One row of a study: what it varies, and the recipe it quantizes with (None: the float row)."""

    name: str
    weight_bits: int | None = None
    act_bits: int | None = None
    groups: int | str | None = None
    selector: str | None = None  # a SELECTORS label or 'random+search'
    size: int | None = None  # calibration.num_samples
    search: bool = False  # APQ-DM group search on
    config: PTQConfig | None = field(default=None, repr=False)
    calibration_seed: int | None = None  # the calibration draw (None: the float row)
    recipe: str = ""  # the name without its draw (`draws.draw_name`); "": the same as `name`

    def __post_init__(self) -> None:
        self.recipe = self.recipe or self.name

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "config"}


def _preset_value(preset: str, section: str, name: str) -> Any:
    return getattr(getattr(PTQConfig.preset(preset), section), name)


def _recipe(
    settings: AblationSettings,
    w: int,
    a: int,
    seed: int,
    *,
    groups: int | str = 1,
    search: bool = False,
    calibration: dict[str, Any] | None = None,
    selection: dict[str, Any] | None = None,
    num_samples: int | None = None,
) -> PTQConfig:
    """The base recipe with this row's groups, search, calibration samples and selector."""
    calib = {
        **RANDOM_CALIBRATION,
        **(calibration or {}),
        "num_inference_steps": settings.num_inference_steps,
        "seed": seed,
    }
    if num_samples is not None:
        calib["num_samples"] = num_samples
    group_search: dict[str, Any] = {"enabled": search}
    if settings.search_epochs is not None:
        group_search["epochs"] = settings.search_epochs
    if settings.search_images is not None:
        group_search["num_images"] = settings.search_images
    if settings.search_lambda is not None:
        group_search["entropy_weight"] = settings.search_lambda
    if settings.search_init_logit is not None:
        group_search["init_logit"] = settings.search_init_logit
    overrides: dict[str, Any] = {
        "weight_bits": w,
        "act_bits": a,
        "method": f"ablation-{settings.study}",
        "activations": {"timestep_groups": groups},
        "calibration": calib,
        "group_search": group_search,
        "reconstruction": {"enabled": False},
    }
    if selection:
        overrides["selection"] = selection
    return PTQConfig.preset(BASE_PRESET, **overrides)


def _bits(settings: AblationSettings) -> list[tuple[str, int, int]]:
    return [(text.upper(), *parse_bits(text)) for text in settings.bit_settings]


def group_rows(settings: AblationSettings, seed: int) -> list[AblationRow]:
    """Per bit setting, one row per G: 1 and 'per_step' plain calibration, the others searched."""
    rows = []
    for tag, w, a in _bits(settings):
        for g in settings.groups:
            search = g not in (1, PER_STEP)
            config = _recipe(
                settings, w, a, seed, groups=g, search=search, num_samples=settings.calibration_samples
            )
            label = "per-step" if g == PER_STEP else f"G={g}"
            rows.append(AblationRow(f"{tag} {label}", w, a, groups=g, search=search, config=config))
    return rows


def _selector_recipes(settings: AblationSettings) -> dict[str, dict[str, Any]]:
    """Selector label -> the `_recipe` keywords that make it (everything else is the base)."""
    active_groups = _preset_value(BASE_PRESET, "activations", "timestep_groups")
    eda = PTQConfig.preset("eda-dm").selection
    feature_samples = settings.feature_samples or eda.feature_samples
    return {
        "random": {},
        "normal": {
            "calibration": {
                "sampler": "normal",
                "mean": _preset_value("ptq4dm", "calibration", "mean"),
                "std": _preset_value("ptq4dm", "calibration", "std"),
            }
        },
        "uniform": {"calibration": {"step_interval": UNIFORM_STEP_INTERVAL}},
        "density_diversity": {
            "calibration": {"selector": "density_diversity"},
            "selection": {
                "feature_module": eda.feature_module,
                "feature_samples": feature_samples,
                "density_radius": eda.density_radius,
                "diversity_weight": eda.diversity_weight,
            },
        },
        "active": {"calibration": {"selector": "active"}, "groups": active_groups, "search": True},
        SEARCH_LABEL: {"groups": active_groups, "search": True},
    }


def selector_rows(settings: AblationSettings, seed: int) -> list[AblationRow]:
    """Per bit setting and calibration size, one row per selector ('random+search' right after 'active')."""
    recipes = _selector_recipes(settings)
    labels = [
        s for name in settings.selectors for s in ([name, SEARCH_LABEL] if name == "active" else [name])
    ]
    rows = []
    for tag, w, a in _bits(settings):
        for size in settings.sizes:
            for label in labels:
                kw = recipes[label]
                config = _recipe(settings, w, a, seed, num_samples=size, **kw)
                groups, search = kw.get("groups", 1), kw.get("search", False)
                name = f"{tag} {label} N={size}"
                rows.append(AblationRow(name, w, a, groups, label, size, search, config))
    return rows


def w4_rows(settings: AblationSettings, seed: int) -> list[AblationRow]:
    """Per bit setting, one row per 4-bit part (`ablation/w4.py`), then the default recipe."""
    rows = []
    labels = [label for label in W4_ROWS if settings.rows is None or label in settings.rows]
    for tag, w, a in _bits(settings):
        for label in labels:
            config = w4_recipe(
                label,
                w,
                a,
                settings.num_inference_steps,
                settings.calibration_samples,
                settings.reconstruction_minutes,
                seed,
            )
            groups = config.activations.timestep_groups
            rows.append(AblationRow(f"{tag} {label}", w, a, groups=groups, config=config))
    return rows


_STUDY_ROWS = {"groups": group_rows, "selectors": selector_rows, "w4": w4_rows}


def ablation_rows(settings: AblationSettings) -> list[AblationRow]:
    """The float row, then the study's rows once per calibration draw (named by `draw_name` when there are
    several); every recipe is built (so validated) here."""
    settings.validate()
    rows = [AblationRow("float")]
    draws = settings.calibration_seeds
    for seed in draws:
        for row in _STUDY_ROWS[settings.study](settings, seed):
            row.calibration_seed = seed
            row.name = draw_name(row.recipe, seed, len(draws))
            rows.append(row)
    return rows


@dataclass
class AblationResult:
    settings: AblationSettings
    rows: list[AblationRow]
    results: list[RowResult]
    timesteps: list[int]
    grids: dict[str, torch.Tensor]
    fidelity: str | None
    notes: list[str] = field(default_factory=list)

    def pairs(self) -> list[tuple[AblationRow, RowResult]]:
        return list(zip(self.rows, self.results))

    def to_dict(self) -> dict[str, Any]:
        data = {
            "study": self.settings.study,
            "settings": self.settings.to_dict(),
            "fidelity": self.fidelity,
            "timesteps": self.timesteps,
            "notes": self.notes,
            "rows": [{**spec.describe(), **asdict(res)} for spec, res in self.pairs()],
        }
        if len(self.settings.calibration_seeds) > 1:
            summaries = summarise_draws(self.pairs(), self.results[0].mean("FD"))
            data["draws"] = [summary.to_dict() for summary in summaries]
        return data


def study_notes(settings: AblationSettings) -> list[str]:
    """What the table's rows hold fixed and vary, in the words a reader needs."""
    return [*_study_notes(settings), *_draws_note(settings)]


def _draws_note(settings: AblationSettings) -> list[str]:
    seeds = settings.calibration_seeds
    if len(seeds) == 1:
        return [] if seeds == [0] else [f"Every quantized row calibrates on calibration seed {seeds[0]}."]
    listed = ", ".join(map(str, seeds))
    return [
        f"Every quantized row runs once per calibration draw (calibration seeds {listed}: the calibration "
        "trajectories' noise and the observers' subsample), on the same sampling noise and against the same "
        "float row; the second table gives each recipe's FD change on every draw, its mean and its spread."
    ]


def _study_notes(settings: AblationSettings) -> list[str]:
    if settings.study == "w4":
        return w4_notes(settings.calibration_samples)
    search = PTQConfig.preset(BASE_PRESET).group_search
    epochs = settings.search_epochs if settings.search_epochs is not None else search.epochs
    images = settings.search_images or search.num_images
    lam = settings.search_lambda if settings.search_lambda is not None else search.entropy_weight
    logit = settings.search_init_logit if settings.search_init_logit is not None else search.init_logit
    common = (
        f"Base recipe: {BASE_PRESET} quantizers, no block reconstruction; calibration by the 'random' "
        "selector (every sampling step equally often, the remainder of N / steps to the noisiest steps; each "
        "trajectory records every step) unless the row says otherwise. "
        f"Group search (APQ-DM): {epochs} epochs, lambda {lam}, initial logit {logit}, noise target on "
        f"{images} float samples."
    )
    if settings.study == "groups":
        n = settings.calibration_samples or _preset_value(BASE_PRESET, "calibration", "num_samples")
        return [
            common,
            f"Every row calibrates on the same {n} samples. G=1: one scale for all timesteps; G=4/8/16: "
            "the group search with G groups; per-step: one scale per sampling step from that step's "
            "samples (TFMQ-DM FSC), no search.",
        ]
    eda = PTQConfig.preset("eda-dm").selection
    return [
        common,
        "random: uniform over sampling steps; normal: PTQ4DM's released-code sampler N(0.4 T, (0.4 T)^2); "
        f"uniform: Q-Diffusion, every {UNIFORM_STEP_INTERVAL}th step; density_diversity: EDA-DM TDAC "
        f"(r {eda.density_radius}, lambda {eda.diversity_weight}, "
        f"{settings.feature_samples or eda.feature_samples} feature trajectories); these run G=1 without "
        "search.",
        "active (APQ-DM) needs the group search (G=8) to score steps, so it is not comparable to the G=1 "
        "rows alone: random+search is the same G=8 search on the 'random' samples, its fair baseline.",
    ]


def run_ablation(
    pipe: Any, settings: AblationSettings, fidelity: Fidelity | None = None, progress: bool = True
) -> AblationResult:
    """The float row, then every row of `settings.study`, on paired noise (see the module docstring)."""
    rows = ablation_rows(settings)
    check_unconditional(pipe)
    sampling = settings.sampling()
    float_pipe = ddim_pipeline(pipe)
    notes = study_notes(settings)
    if fidelity is None:
        notes.append("no classifier matches this model: FD and IS are skipped; noise SQNR is still measured")
    trajectory = record_trajectory(
        float_pipe, sampling.sqnr_samples, sampling.seeds[0], sampling.num_inference_steps
    )
    specs = [
        RowSpec(RowResult(spec.name, None, spec.weight_bits, spec.act_bits), spec.config) for spec in rows
    ]
    desc = f"ablation: {settings.study}"
    results, grids = run_rows(specs, float_pipe, sampling, trajectory, fidelity, progress=progress, desc=desc)
    return AblationResult(
        settings=settings,
        rows=rows,
        results=results,
        timesteps=[int(t) for t in trajectory.timesteps],
        grids=grids,
        fidelity=None if fidelity is None else fidelity.name,
        notes=notes,
    )
