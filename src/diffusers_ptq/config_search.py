"""Config sections of calibration-sample selection (EDA-DM, APQ-DM) and APQ-DM's timestep-group search."""

from __future__ import annotations

from dataclasses import dataclass

from diffusers_ptq.config_fields import _check_bool, _check_choice, _check_float, _check_int, _fail, _field

ACTIVE_SCORES = ("paper", "code")
SEARCH_TARGETS = ("auto", "noise", "float")
SEARCH_INITS = ("ranges", "contiguous")


@dataclass
class SelectionConfig:
    """Parameters of the calibration sample selectors ('density_diversity' and 'active')."""

    feature_module: str = _field(
        "mid_block.attentions.0",
        "'density_diversity': UNet module whose input is the per-step feature (EDA-DM: mid-block attention)",
    )
    feature_samples: int = _field(64, "'density_diversity': trajectories of the float feature pass")
    density_radius: float = _field(
        3.0, "'density_diversity': r, steps s count toward step t's density if mean((F_t - F_s)^2) <= r"
    )
    diversity_weight: float = _field(
        1.2, "'density_diversity': lambda in w_t = density_t + lambda * diversity_t (both min-max normalised)"
    )
    active_round_size: int = _field(16, "'active': samples captured per round (the first round spreads them)")
    active_score: str = _field(
        "paper",
        "'active': step score, 'paper' H(sigma_t) + eta / (N_t + 1) or released 'code' H(sigma_t) - eta N_t",
        ACTIVE_SCORES,
    )
    active_eta: float = _field(1.5, "'active': eta, weight of the visit-count term of the score")
    active_exclude_noisiest: int = _field(
        0, "'active': never pick the first (noisiest) k sampling steps (released code: 30)"
    )
    active_search_epochs: int = _field(
        1, "'active': group-search epochs over the data gathered so far after each round"
    )

    def validate(self, path: str = "selection") -> None:
        if not isinstance(self.feature_module, str) or not self.feature_module:
            _fail(
                f"{path}.feature_module",
                self.feature_module,
                "a module name such as 'mid_block.attentions.0'",
            )
        _check_int(f"{path}.feature_samples", self.feature_samples, 1)
        _check_float(f"{path}.density_radius", self.density_radius, 0.0, 1e12, open_lo=True)
        _check_float(f"{path}.diversity_weight", self.diversity_weight, 0.0, 1e6)
        _check_int(f"{path}.active_round_size", self.active_round_size, 1)
        _check_choice(f"{path}.active_score", self.active_score, ACTIVE_SCORES)
        _check_float(f"{path}.active_eta", self.active_eta, 0.0, 1e6)
        _check_int(f"{path}.active_exclude_noisiest", self.active_exclude_noisiest, 0)
        _check_int(f"{path}.active_search_epochs", self.active_search_epochs, 0)


@dataclass
class GroupSearchConfig:
    """APQ-DM timestep-group search: a learned timestep -> group map per activation quantizer."""

    enabled: bool = _field(
        False, "search each activation quantizer's timestep -> group map (integer timestep_groups)"
    )
    init: str = _field(
        "ranges",
        "starting groups: 'ranges' (k-means of the per-step activation ranges) or 'contiguous'",
        SEARCH_INITS,
    )
    init_logit: float = _field(
        1.0,
        "starting logit of each step's initial group, the others 0 (0: uniform softmax; larger keeps the "
        "initial groups unless the loss consistently prefers another)",
    )
    target: str = _field(
        "auto",
        "loss target: 'noise' (forward-diffused float-pipeline images, target the added noise; paper), "
        "'float' (captured x_t, target the float UNet's output), 'auto' (noise if unconditional)",
        SEARCH_TARGETS,
    )
    num_images: int = _field(1024, "'noise' target: clean images sampled from the float pipeline")
    epochs: int = _field(10, "epochs over the calibration set after selection")
    batch_size: int = _field(64, "samples per search iteration")
    lr: float | None = _field(
        None, "Adam learning rate of logits and log-scales (None: 5e-3 at >= 8 activation bits, else 3e-3)"
    )
    lr_min: float = _field(1e-5, "the learning rate decays (cosine) to this over the final epochs")
    entropy_weight: float = _field(
        0.8, "lambda of the mean per-timestep softmax entropy in the loss (paper 0.8, code 1.0)"
    )
    refit_scales: bool = _field(
        False, "after the search, re-run the scale search on each searched group (False: keep learned)"
    )

    def validate(self, path: str = "group_search") -> None:
        _check_bool(f"{path}.enabled", self.enabled)
        _check_choice(f"{path}.init", self.init, SEARCH_INITS)
        _check_float(f"{path}.init_logit", self.init_logit, 0.0, 100.0)
        _check_choice(f"{path}.target", self.target, SEARCH_TARGETS)
        _check_int(f"{path}.num_images", self.num_images, 1)
        _check_int(f"{path}.epochs", self.epochs, 0)
        _check_int(f"{path}.batch_size", self.batch_size, 1)
        if self.lr is not None:
            _check_float(f"{path}.lr", self.lr, 0.0, 10.0, open_lo=True)
        _check_float(f"{path}.lr_min", self.lr_min, 0.0, 10.0)
        if self.lr is not None and self.lr_min > self.lr:
            _fail(
                f"{path}.lr_min", self.lr_min, f"a number <= group_search.lr={self.lr} (it decays to lr_min)"
            )
        _check_float(f"{path}.entropy_weight", self.entropy_weight, 0.0, 1e6)
        _check_bool(f"{path}.refit_scales", self.refit_scales)
