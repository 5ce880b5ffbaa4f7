"""Robust accuracy under registered image attacks: one evaluation path, flat rows, sanity flags.

Every robust evaluation (``medshield evaluate``, ``medshield finetune`` and the studies built on
them) runs :func:`robust_rows`: each attack of a config's list (:class:`~medshield.config.
AttackEntry`, e.g. ``[{name: pgd, steps: 10}, {name: apgd-ce, steps: 50}]``) at each budget, each
restart separately, and writes one flat row per image, attack, budget and restart::

    {"attack": "pgd10", "eps": 2.0, "restart": 0, "index": 17, "label": 1,
     "clean_pred": 1, "adv_pred": 0, "clean_correct": true, "adv_correct": false,
     "robust_correct": false, "linf": 2.0, "l2": 51.3, "adv_min": 0.0, "adv_max": 1.0,
     "size": 784, "zero_gradient": false}

``attack`` is the entry's label (:func:`~medshield.config.attack_labels`), ``eps`` the budget
in /255 units, ``restart`` the run of the attack (0 to ``restarts - 1``), ``linf`` and ``l2``
the perturbation's size in /255 units, ``adv_min`` / ``adv_max`` the adversarial image's value
range, ``size`` its values, and ``zero_gradient`` whether the input gradient of the attack's
loss at the clean image is exactly zero. ``robust_correct`` is AutoAttack's convention (right
clean *and* adversarial). Callers add their tags (``task``, ``modality``, ``group``).

From such rows, in one place each: :func:`worst_case`, the per-image worst case over attacks
and restarts (robust accuracy is its mean); :func:`per_image`, one record per image; and
:func:`robust_flags`, the sanity flags in the spirit of AutoAttack and RobustBench (budget,
range, robust<=clean, stronger<=weaker, zero-gradients; see
:mod:`medshield.attacks.sanity`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medshield import data
from medshield.attacks.base import Attack, check_budget
from medshield.attacks.pgd import pgd_step_size
from medshield.attacks.sanity import (
    SanityFlag,
    accuracy_flag,
    budget_flag,
    range_flag,
    stronger_flag,
    zero_gradient_flag,
    zero_gradients,
)
from medshield.config import AttackEntry, attack_labels
from medshield.errors import ConfigError, InputError
from medshield.eval.features import classify_images
from medshield.eval.zero_shot import balanced_subset
from medshield.models.base import DualEncoder, ZeroShotClassifier, check_images, evaluating
from medshield.registry import IMAGE_ATTACKS

TASK = "robust_zero_shot"
Row = dict[str, Any]

#: ``medshield evaluate``'s attacks when the config names none: PGD-10.
DEFAULT_ATTACKS = (AttackEntry(name="pgd", steps=10),)


def eps_key(eps: float) -> str:
    """The name of a budget in groups and metrics: ``2.0 -> "2"``, ``0.5 -> "0.5"``."""
    return f"{eps:g}"


def check_eps_values(eps_values: Sequence[float]) -> list[float]:
    """Distinct budgets (/255 units, each > 0), sorted ascending."""
    if isinstance(eps_values, (str, bytes)) or not eps_values:
        raise InputError("eps_values must be a non-empty list of budgets in /255 units")
    values = [check_budget(e, "eps") for e in eps_values]
    if min(values) <= 0:
        raise InputError(f"every eps must be > 0 (/255 units), got {values}")
    if len({eps_key(e) for e in values}) != len(values):
        raise InputError(f"eps_values has repeats: {values}")
    return sorted(values)


# --- attacks from config entries -------------------------------------------------------------


def build_attack(
    entry: AttackEntry, model: nn.Module, eps: float, early_stop: bool = False
) -> Attack:
    """The registered image attack of ``entry`` on ``model`` at budget ``eps`` (/255), one run
    (restarts are the caller's: :func:`attacked_rows`). An attack that takes a step size
    ``alpha`` the entry leaves out gets :func:`~medshield.attacks.pgd.pgd_step_size` of its
    budget and steps; one that takes ``early_stop`` gets ``early_stop`` unless the entry sets it.

    Raises:
        ConfigError: arguments that do not fit the attack at this budget (the entry's name and
            arguments were checked when it was made, see :class:`~medshield.config.AttackEntry`).
    """
    cls = IMAGE_ATTACKS.get(entry.name)
    kwargs = entry.kwargs
    params = inspect.signature(cls).parameters
    try:
        if "alpha" in params and "alpha" not in kwargs:
            steps = kwargs.get("steps", params["steps"].default if "steps" in params else 1)
            kwargs["alpha"] = pgd_step_size(eps, steps)
        if "early_stop" in params and "early_stop" not in kwargs:
            kwargs["early_stop"] = early_stop
        return cls(model, eps=eps, **kwargs)
    except (TypeError, InputError) as exc:
        raise ConfigError(
            f"the arguments {entry.kwargs} do not fit attack {entry.name!r}: {exc}"
        ) from None


# --- the evaluation --------------------------------------------------------------------------


def _device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _check_inputs(images: Any, labels: Any, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = check_images(images)
    if len(images) == 0:
        raise InputError("got zero images")
    if not isinstance(labels, torch.Tensor) or labels.shape != (len(images),):
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise InputError(f"labels must be a ({len(images)},) tensor, got {shape}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return images, labels


def attacked_rows(
    model: nn.Module,
    attack: Attack,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 128,
    restarts: int = 1,
    clean_pred: torch.Tensor | None = None,
    zero_gradient: torch.Tensor | None = None,
) -> list[Row]:
    """Attack every image (untargeted) ``restarts`` times and classify it clean and adversarial.

    Args:
        model: the classifier evaluated, [0, 1] NCHW images -> (N, K) logits (usually
            ``attack.model``; another model gives a transfer evaluation).
        attack: the attack (one run per call; each restart calls it again on the batch).
        images: float (N, C, H, W) in [0, 1].
        labels: (N,) integer class indices.
        batch_size: images per attack call.
        restarts: runs per batch, one row each. With ``attack.early_stop`` a restart attacks
            only the images no earlier restart fooled; a fooled image's later rows repeat the
            row of the restart that fooled it (the per-image worst case is the same, in fewer
            gradient steps).
        clean_pred, zero_gradient: ``model``'s (N,) clean predictions and
            :func:`~medshield.attacks.sanity.zero_gradients` of ``attack`` on these images,
            when the caller has them (computed here otherwise).

    Returns:
        Per batch, per restart, one row per image in the format of the module docstring without
        ``attack`` and ``eps`` (``index``: the image's position in ``images``).
    """
    images, labels = _check_inputs(images, labels, batch_size)
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise InputError(f"restarts must be an integer >= 1, got {restarts!r}")
    if zero_gradient is None:
        zero_gradient = zero_gradients(attack, images, labels, batch_size)
    if clean_pred is None:
        clean_pred = classify_images(model, images, batch_size).argmax(dim=1)
    device = _device(model)
    rows: list[Row] = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        zero = zero_gradient[start : start + batch_size].tolist()
        clean = clean_pred[start : start + batch_size].to(device)
        adv, adv_pred = x.clone(), clean.clone()
        for restart in range(restarts):
            rerun = (adv_pred == y) if attack.early_stop and restart else torch.ones_like(y) > 0
            if rerun.all():
                adv = attack(x, y)
                with evaluating(model):
                    adv_pred = model(adv).argmax(dim=1)
            elif rerun.any():
                adv, adv_pred = adv.clone(), adv_pred.clone()
                adv[rerun] = attack(x[rerun], y[rerun])
                with evaluating(model):
                    adv_pred[rerun] = model(adv[rerun]).argmax(dim=1)
            delta = (adv - x).flatten(1).double()
            linf = delta.abs().amax(dim=1) * 255
            l2 = delta.norm(dim=1) * 255
            flat = adv.flatten(1)
            for j in range(len(x)):
                clean_ok = bool(clean[j] == y[j])
                adv_ok = bool(adv_pred[j] == y[j])
                rows.append(
                    {
                        "restart": restart,
                        "index": start + j,
                        "label": int(y[j]),
                        "clean_pred": int(clean[j]),
                        "adv_pred": int(adv_pred[j]),
                        "clean_correct": clean_ok,
                        "adv_correct": adv_ok,
                        "robust_correct": clean_ok and adv_ok,
                        "linf": round(float(linf[j]), 6),
                        "l2": round(float(l2[j]), 6),
                        "adv_min": float(flat[j].min()),
                        "adv_max": float(flat[j].max()),
                        "size": flat.shape[1],
                        "zero_gradient": bool(zero[j]),
                    }
                )
    return rows


def robust_rows(
    classifier: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    attacks: Sequence[AttackEntry],
    eps_values: Sequence[float],
    seed: int | None = 0,
    batch_size: int = 128,
    names: Sequence[str] | None = None,
    early_stop: bool = False,
    memo: dict[str, torch.Tensor] | None = None,
) -> list[Row]:
    """Attack ``classifier`` (images -> logits) with every entry of ``attacks`` at every budget
    of ``eps_values`` (budget by budget, attack by attack, in the given order): the flat rows
    of the module docstring, ``index`` the position in ``images``.

    ``seed``: the random starts are drawn from a generator seeded with it, leaving the global
    one untouched; None draws them from the global generator. ``names``: the entries' labels
    when ``attacks`` is part of a longer list (default :func:`~medshield.config.attack_labels`).
    ``early_stop``: attacks that support it stop on an image once it is misclassified and
    restart only the images not yet fooled (see :class:`~medshield.attacks.base.Attack`), unless
    the entry sets ``early_stop`` itself; robust accuracy can only fall or stay.

    The clean predictions and each entry's zero-gradient flags
    (:func:`~medshield.attacks.sanity.zero_gradients`) depend on neither the budget nor the
    random numbers: they are computed once and kept in ``memo`` when given (``"clean_pred"``,
    ``"zero_gradient/<label>"``), for a caller attacking the same classifier and images in
    several calls (one per attack and budget, as ``medshield finetune`` does).

    Raises:
        ConfigError: an attack entry that does not fit the registry.
        InputError: bad budgets, images or labels.
    """
    eps_values = check_eps_values(eps_values)
    labels_of = list(names) if names is not None else attack_labels(list(attacks))
    images, labels = _check_inputs(images, labels, batch_size)
    rows: list[Row] = []
    memo = {} if memo is None else memo
    if "clean_pred" not in memo:
        memo["clean_pred"] = classify_images(classifier, images, batch_size).argmax(dim=1)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for eps in eps_values:
            for label, entry in zip(labels_of, attacks, strict=True):
                attack = build_attack(entry, classifier, eps, early_stop)
                zero = f"zero_gradient/{label}"
                if zero not in memo:
                    memo[zero] = zero_gradients(attack, images, labels, batch_size)
                attacked = attacked_rows(
                    classifier,
                    attack,
                    images,
                    labels,
                    batch_size,
                    entry.restarts,
                    memo["clean_pred"],
                    memo[zero],
                )
                rows.extend({"attack": label, "eps": eps, **row} for row in attacked)
    return rows


def robust_zero_shot_rows(
    model: DualEncoder,
    modality: str,
    eps_values: Sequence[float] = (1, 2, 4),
    attacks: Sequence[AttackEntry] = DEFAULT_ATTACKS,
    max_items: int | None = 200,
    seed: int = 0,
    split: str = "test",
    data_dir: str | Path | None = None,
    batch_size: int = 128,
) -> list[Row]:
    """Attack the zero-shot classifier of one modality with every attack at every budget.

    Args:
        model: the dual encoder (left in the train/eval mode and with the gradient flags it had).
        modality: modality name.
        eps_values: budgets in /255 units.
        attacks: the image attacks (default PGD-10 from a random start).
        max_items: class-balanced subsample size (see :func:`balanced_subset`); None: all.
        seed: seed of the subsample and of the random starts.
        split: the split attacked.
        data_dir: data root (see :func:`medshield.data.load_split`).
        batch_size: images per attack call.

    Returns:
        The rows of :func:`robust_rows` tagged with ``task`` and ``modality``; ``index`` is the
        image's row in the split.

    Raises:
        InputError: bad budgets.
        ConfigError: a bad attack entry.
        DataError: the split cannot be loaded.
    """
    eps_values = check_eps_values(eps_values)
    samples = data.load_split(modality, split, data_dir)
    mod = samples.modality
    indices = balanced_subset(samples.labels, mod.num_classes, max_items, seed)
    images = samples.tensor(indices)
    labels = torch.as_tensor(samples.labels[indices], dtype=torch.long)
    with evaluating(model):
        classifier = ZeroShotClassifier(model, mod.prompts())
    rows = robust_rows(classifier, images, labels, attacks, eps_values, seed, batch_size)
    return [
        {"task": TASK, "modality": mod.name, **row, "index": int(indices[row["index"]])}
        for row in rows
    ]


# --- aggregation and sanity flags ------------------------------------------------------------


def _attack_rows(rows: Sequence[Row], eps: float | None, attack: str | None) -> list[Row]:
    return [
        r
        for r in rows
        if "attack" in r
        and (eps is None or eps_key(r["eps"]) == eps_key(eps))
        and (attack is None or r["attack"] == attack)
    ]


def per_image(
    rows: Sequence[Row], eps: float | None = None, attack: str | None = None
) -> list[Row]:
    """One record per attacked image (ascending ``index``) of the rows at ``eps`` (all budgets
    when None) under ``attack`` (every attack when None): ``index``, ``label``, the clean
    result, the worst case over the rows (``adv_correct`` and ``robust_correct`` true only when
    true in every row), the largest perturbation and the widest value range, ``size``,
    ``zero_gradient`` and, when the rows carry it, ``shuffled_correct``."""
    records: dict[int, Row] = {}
    for r in _attack_rows(rows, eps, attack):
        rec = records.get(r["index"])
        if rec is None:
            records[r["index"]] = {
                key: r[key]
                for key in (
                    "index",
                    "label",
                    "clean_correct",
                    "adv_correct",
                    "robust_correct",
                    "linf",
                    "l2",
                    "adv_min",
                    "adv_max",
                    "size",
                    "zero_gradient",
                    "shuffled_correct",
                )
                if key in r
            }
            continue
        for key, pick in (
            ("adv_correct", min),
            ("robust_correct", min),
            ("linf", max),
            ("l2", max),
            ("adv_min", min),
            ("adv_max", max),
            ("zero_gradient", max),
        ):
            if key in rec:
                rec[key] = pick(rec[key], r[key])
    return [records[i] for i in sorted(records)]


def worst_case(
    rows: Sequence[Row], eps: float | None = None, attack: str | None = None
) -> list[bool]:
    """Per attacked image (ascending ``index``): right clean and under every attack row at
    ``eps`` (every attack and restart, or only ``attack``'s restarts); robust accuracy is the
    mean. Rows without ``attack`` (clean, shuffled, retrieval rows) are ignored."""
    return [bool(r["robust_correct"]) for r in per_image(rows, eps, attack)]


def _flag(flag: SanityFlag, group: str) -> Row:
    return {"name": flag.name, "group": group, "passed": flag.passed, "detail": flag.detail}


def stronger_pairs(attacks: Sequence[AttackEntry]) -> list[tuple[str, str]]:
    """``(weaker, stronger)`` labels: consecutive entries of the same attack by ``steps`` and
    ``restarts`` (``pgd10`` -> ``pgd50``)."""
    labels = attack_labels(list(attacks))
    by_name: dict[str, list[tuple[tuple[Any, int], str]]] = {}
    for label, entry in zip(labels, attacks, strict=True):
        key = (entry.kwargs.get("steps", 0), entry.restarts)
        by_name.setdefault(entry.name, []).append((key, label))
    pairs = []
    for group in by_name.values():
        ordered = [label for _, label in sorted(group, key=lambda g: g[0])]
        pairs.extend(zip(ordered, ordered[1:], strict=False))
    return pairs


def robust_flags(
    rows: Sequence[Row], attacks: Sequence[AttackEntry] | None = None
) -> list[dict[str, Any]]:
    """The sanity flags (JSON-ready: ``name``, ``group``, ``passed``, ``detail``) of one
    evaluation's attack rows, restarts folded per image (:func:`per_image`):

    - per attack and budget (group ``<attack>@<eps>``): "budget" (in the entry's ``norm``,
      default L-inf), "range", "robust<=clean";
    - per attack, between consecutive budgets (group ``<attack>@<a>-><b>``):
      "stronger<=weaker", a larger ball leaves no more robust accuracy;
    - with ``attacks``, per budget between entries of the same attack ordered by steps and
      restarts (group ``<weaker>-><stronger>@<eps>``, :func:`stronger_pairs`):
      "stronger<=weaker";
    - "zero-gradients" (group ``inputs``): images whose input gradient is exactly zero point
      to gradient masking.
    """
    rows = _attack_rows(rows, None, None)
    if not rows:
        raise InputError("robust_flags needs at least one attack row")
    keys = list(dict.fromkeys((r["attack"], eps_key(r["eps"])) for r in rows))
    images = {key: per_image(rows, float(key[1]), key[0]) for key in keys}
    entries = list(attacks or [])
    norms = {
        label: e.kwargs.get("norm", "Linf")
        for label, e in zip(attack_labels(entries), entries, strict=True)
    }
    flags = []
    for (attack, eps), at in images.items():
        budget = budget_flag(at, float(eps), norms.get(attack, "Linf"))
        for flag in (budget, range_flag(at), accuracy_flag(at)):
            flags.append(_flag(flag, f"{attack}@{eps}"))
    for attack in dict.fromkeys(a for a, _ in keys):
        budgets = sorted((e for a, e in keys if a == attack), key=float)
        for small, large in zip(budgets, budgets[1:], strict=False):
            flag = stronger_flag(images[(attack, small)], images[(attack, large)])
            flags.append(_flag(flag, f"{attack}@{small}->{large}"))
    for weak, strong in stronger_pairs(attacks or []):
        for eps in dict.fromkeys(e for _, e in keys):
            a, b = images.get((weak, eps)), images.get((strong, eps))
            if a and b and len(a) == len(b):
                flags.append(_flag(stronger_flag(a, b), f"{weak}->{strong}@{eps}"))
    flags.append(_flag(zero_gradient_flag(per_image(rows)), "inputs"))
    return flags


def sanity_checks(
    model: nn.Module,
    attack: Attack,
    images: torch.Tensor,
    labels: torch.Tensor,
    stronger: Attack | None = None,
    batch_size: int = 128,
    norm: str | None = None,
    tolerance: float = 1e-3,
    uint8: bool = False,
) -> list[SanityFlag]:
    """Run every check on ``attack`` against ``model`` over ``images``::

        flags = sanity_checks(classifier, PGD(classifier, eps=4), images, labels,
                              stronger=PGD(classifier, eps=4, steps=50, restarts=3))

    Args:
        model: the classifier evaluated.
        attack: the attack checked.
        images, labels: the evaluation set, [0, 1] NCHW images and (N,) class indices.
        stronger: a stronger configuration of the attack (more steps or restarts); when given,
            the "stronger<=weaker" check runs.
        batch_size: images per attack call.
        norm: norm of the budget check; default: the attack's ``norm`` attribute, else "Linf".
        tolerance, uint8: see :func:`medshield.attacks.sanity.budget_flag`.

    Returns:
        Flags "budget", "range", "robust<=clean", "zero-gradients" and, with ``stronger``,
        "stronger<=weaker".
    """
    norm = norm or getattr(attack, "norm", "Linf")
    rows = attacked_rows(model, attack, images, labels, batch_size)
    flags = [
        budget_flag(rows, attack.eps, norm, tolerance, uint8),
        range_flag(rows),
        accuracy_flag(rows),
        zero_gradient_flag(rows),
    ]
    if stronger is not None:
        strong_rows = attacked_rows(model, stronger, images, labels, batch_size)
        flags.append(stronger_flag(rows, strong_rows))
    return flags
