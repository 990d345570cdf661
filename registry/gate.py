"""Promotion policy: which checks a candidate must pass before it becomes `champion`.

The gate decides from evidence already computed (training health now; VLM scores later) and never
touches a champion when it refuses. Its result is stored on the model version so the reason stays
next to the model.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import TypeGuard

from atelier.kernel.settings import ChallengerRules, GateRules, JudgeGateRules, OcrGateRules
from atelier.models.dreambooth.health import Health

CANDIDATE, CHAMPION = "candidate", "champion"


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    value: float | bool
    threshold: float | bool
    detail: str
    enforced: bool = True  # False: recorded on the card and in the ledger, never refusing (an uncalibrated judge)


@dataclass(frozen=True)
class GateResult:
    passed: bool
    checks: list[Check]

    @property
    def reasons(self) -> list[str]:
        return [c.detail for c in self.checks if not c.passed]

    def as_json(self) -> str:
        return json.dumps({"passed": self.passed, "checks": [asdict(c) for c in self.checks]}, sort_keys=True)


def evaluate_training_health(health: Health, rules: GateRules) -> GateResult:
    checks = [
        Check(
            "finite_loss",
            health.loss_finite or not rules.require_finite_loss,
            health.loss_finite,
            rules.require_finite_loss,
            "training loss went NaN or infinite" if not health.loss_finite else "loss finite at every step",
        ),
        Check(
            "final_loss",
            math.isfinite(health.final_loss) and health.final_loss <= rules.max_final_loss,
            health.final_loss,
            rules.max_final_loss,
            f"final loss {health.final_loss:.4g} (limit {rules.max_final_loss})",
        ),
        Check(
            "blank_samples",
            health.blank_samples == 0,
            health.min_sample_std,
            rules.min_sample_std,
            f"{health.blank_samples} of {health.sample_count} samples are blank (pixel std under {rules.min_sample_std})",
        ),
        Check(
            "distinct_samples",
            health.distinct_share >= rules.min_distinct_samples,
            health.distinct_share,
            rules.min_distinct_samples,
            f"{health.distinct_share:.0%} of sample pairs differ (need {rules.min_distinct_samples:.0%})",
        ),
    ]
    return GateResult(all(c.passed for c in checks), checks)


def evaluate_challenger(summary: dict, champion: dict, champion_version: str, rules: ChallengerRules) -> list[Check]:
    """The challenger against the champion it would replace, on what both were measured by: final loss
    (lower is better, within a relative tolerance) and, when a calibrated judge scored both, prompt score
    and fidelity (higher is better, within an absolute tolerance). Nothing to compare: no check."""
    if not rules.enabled:
        return []
    checks = []
    mine, theirs = summary.get("final_loss"), champion.get("final_loss")
    if _number(mine) and _number(theirs):
        limit = theirs * (1 + rules.max_final_loss_increase)
        checks.append(
            Check(
                "gate.challenger.final_loss",
                mine <= limit,
                mine,
                limit,
                f"final loss {mine:.4g} against the champion's (v{champion_version}) {theirs:.4g}: at most {limit:.4g} "
                f"(+{rules.max_final_loss_increase:.0%})",
            )
        )
    judged, champion_judged = summary.get("judge") or {}, champion.get("judge") or {}
    if judged.get("calibrated") and champion_judged.get("calibrated"):
        for key in ("prompt_score", "fidelity"):
            mine, theirs = judged.get(key), champion_judged.get(key)
            if _number(mine) and _number(theirs):
                limit = theirs - rules.max_judge_drop
                checks.append(
                    Check(
                        f"gate.challenger.judge_{key}",
                        mine >= limit,
                        mine,
                        limit,
                        f"judge {key.replace('_', ' ')} {mine:.2f} against the champion's (v{champion_version}) "
                        f"{theirs:.2f}: at least {limit:.2f}",
                    )
                )
    return checks


def _number(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def evaluate_ocr(summary: dict, rules: OcrGateRules) -> GateResult:
    """The served recogniser against its fp32 form on the evaluation split (overall and per language
    it serves), and the routed engine with no language given. Each check is named by its setting,
    so a refusal says which rule to look at. Speed is not a gate: the flow serves the fastest variant
    that holds accuracy (models/ocr/variants.py).

    `summary`: cer_fp32 / cer_served (language -> CER, with "overall"), served (the variant), langs
    (the languages the recogniser serves), engine_cer (the routed engine, no language given).
    Versions registered before variants existed carry cer_int8 and are judged as int8.
    """
    fp32 = summary["cer_fp32"]
    served: dict = summary["cer_served"] if "cer_served" in summary else summary["cer_int8"]
    variant = summary.get("served", "int8")
    overall = served["overall"] - fp32["overall"]
    checks = [
        Check(
            "gate.ocr.max_cer_increase",
            overall <= rules.max_cer_increase,
            overall,
            rules.max_cer_increase,
            f"{variant} recogniser overall CER {fp32['overall']:.2%} (fp32) -> {served['overall']:.2%} "
            f"({overall * 100:+.2f} points, limit +{rules.max_cer_increase * 100:.2f})",
        )
    ]
    for lang in summary.get("langs", []):
        delta = served[lang] - fp32[lang]
        checks.append(
            Check(
                "gate.ocr.max_cer_increase_per_language",
                delta <= rules.max_cer_increase_per_language,
                delta,
                rules.max_cer_increase_per_language,
                f"{variant} recogniser {lang} CER {fp32[lang]:.2%} (fp32) -> {served[lang]:.2%} ({delta * 100:+.2f} points, "
                f"limit +{rules.max_cer_increase_per_language * 100:.2f})",
            )
        )
    engine = summary.get("engine_cer")
    if engine is not None:
        checks.append(
            Check(
                "gate.ocr.max_cer",
                engine <= rules.max_cer,
                engine,
                rules.max_cer,
                f"routed engine with no language given: CER {engine:.2%} on the evaluation split (limit {rules.max_cer:.2%})",
            )
        )
    return GateResult(all(c.passed for c in checks), checks)


def evaluate_judge(summary: dict, rules: JudgeGateRules) -> list[Check]:
    """Checks from the VLM judge's summary. A judge that was configured but failed is a failing check;
    an uncalibrated judge's scores are recorded, not enforced."""
    if summary.get("error"):
        return [Check("judge", False, False, True, f"VLM judge unavailable: {summary['error']} (no promotion without it)")]
    enforce = bool(summary.get("calibrated"))
    note = "" if enforce else " (uncalibrated judge: recorded, not enforced)"
    checks = []
    for name, key, limit, lower_is_better, what in (
        ("judge_prompt", "prompt_score", rules.min_prompt_score, False, "samples show their prompts"),
        ("judge_fidelity", "fidelity", rules.min_fidelity, False, "samples show the reference subject"),
        ("judge_prior_leak", "prior_leak", rules.max_prior_leak, True, "class images show the subject"),
        ("judge_failures", "failure_rate", rules.max_failure_rate, True, "judgments failed"),
    ):
        value = summary.get(key)
        if value is None:
            continue
        ok = value <= limit if lower_is_better else value >= limit
        checks.append(
            Check(
                name,
                ok or not enforce,
                value,
                limit,
                f"{what}: {value:.2f} ({'at most' if lower_is_better else 'at least'} {limit:.2f}){note}",
                enforce,
            )
        )
    return checks
