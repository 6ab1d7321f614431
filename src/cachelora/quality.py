"""Quality gate for triplets with Great Expectations: row failures go to quarantine with reasons."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cachelora.errors import CacheloraError
from cachelora.lexicon import BAD_RENDER_RE
from cachelora.params import ValidateParams
from cachelora.triplets import TEXT_FIELDS, normalise

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

REQUIRED = ("id", "domain", *TEXT_FIELDS, "source_id")
# Filler a generator left in (reason ``placeholder:<field>``). Template slots and braces, stray or
# doubled spaces and a space before "?" are a failed render instead (``bad_render:<field>``), matched
# by the lexicon's BAD_RENDER_RE, built on the one placeholder pattern the lexicon checks templates with.
FILLER_RE = (
    r"(?i)<[a-z_ ]+>|\[(?:insert|placeholder|query|text)[^\]]*\]"
    r"|lorem ipsum|\bTODO\b|\bTBD\b|\bFIXME\b|^\s*n/?a\s*$|\.\.\.\s*$|^\s*(?:paraphrase|negative|query)\s*\d*\s*:"
)

# What a chat model or an injected prompt leaves in a reply (reason ``boilerplate:<field>``): refusals,
# assistant self-talk, instructions aimed at a model, and credentials (a bearer token, an sk- key).
BOILERPLATE_RE = (
    r"(?i)\bas an ai\b|\blanguage model\b|\bsystem prompt\b|\bi(?:'m| am) sorry\b"
    r"|\bignore (?:all |any )?(?:the )?(?:previous|prior|above|earlier) (?:instructions|prompts?)\b"
    r"|\bi can(?:not|'t) (?:help|assist|comply)\b|\bhere (?:are|is) (?:the |some |your )?(?:paraphrases?|negatives?)\b"
    r"|\bbearer\s+\S{8,}|\bsk-[a-z0-9_-]{16,}"
)


@dataclass
class QualityReport:
    """Rows that passed, rows quarantined (each with ``reasons``), and the counts."""

    passed: list[dict[str, Any]]
    quarantined: list[dict[str, Any]]
    metrics: dict[str, Any] = field(default_factory=dict)


def _frame(rows: list[dict[str, Any]], neg_sim: np.ndarray) -> pd.DataFrame:
    """The columns the expectations read: texts (non-strings as null), normalised forms, flags."""
    columns: dict[str, list[Any]] = {key: [r.get(key) for r in rows] for key in REQUIRED}
    for key in TEXT_FIELDS:
        columns[key] = [v if isinstance(v, str) else None for v in columns[key]]
        columns[f"{key}_norm"] = [normalise(v) if v else None for v in columns[key]]
    triplets = pd.Series(list(zip(*(columns[f"{k}_norm"] for k in TEXT_FIELDS), strict=True)))
    columns["repeats_earlier_row"] = triplets.duplicated(keep="first").tolist()
    columns["near_miss_unchanged"] = [_unchanged_edit(r) for r in rows]
    df = pd.DataFrame(columns, dtype=object)
    # A near-miss is close to its anchor by design: the near-paraphrase check reads other negatives only.
    df["neg_sim"] = np.where([is_near_miss_edit(r) for r in rows], np.nan, neg_sim)
    return df


def is_near_miss_edit(row: dict[str, Any]) -> bool:
    """A row whose negative is a generated edit of one of its texts (``near_miss_of`` names which)."""
    return isinstance(row.get("near_miss_of"), str)


def _unchanged_edit(row: dict[str, Any]) -> bool:
    """An "edit" that left the text it was made from as it was (after normalising): no near-miss at all."""
    if not is_near_miss_edit(row):
        return False
    source, negative = row.get(row["near_miss_of"]), row.get("negative")
    return not isinstance(source, str) or not isinstance(negative, str) or normalise(source) == normalise(negative)


def _row_suite(params: ValidateParams, domain: str) -> Any:
    import great_expectations as gx
    import great_expectations.expectations as gxe

    def named(reason: str, expectation: Any) -> Any:
        expectation.meta = {"reason": reason}
        return expectation

    suite = gx.ExpectationSuite(name=f"triplets_{domain}")
    for key in REQUIRED:
        suite.add_expectation(named(f"missing:{key}", gxe.ExpectColumnValuesToNotBeNull(column=key)))
    for key in TEXT_FIELDS:
        suite.add_expectation(
            named(
                f"length:{key}",
                gxe.ExpectColumnValueLengthsToBeBetween(
                    column=key, min_value=params.min_chars, max_value=params.max_chars
                ),
            )
        )
        suite.add_expectation(
            named(f"placeholder:{key}", gxe.ExpectColumnValuesToNotMatchRegex(column=key, regex=FILLER_RE))
        )
        suite.add_expectation(
            named(f"boilerplate:{key}", gxe.ExpectColumnValuesToNotMatchRegex(column=key, regex=BOILERPLATE_RE))
        )
        suite.add_expectation(
            named(
                f"bad_render:{key}",
                gxe.ExpectColumnValuesToNotMatchRegex(column=key, regex=BAD_RENDER_RE.pattern),
            )
        )
    suite.add_expectation(
        named(
            "texts_not_distinct",
            gxe.ExpectSelectColumnValuesToBeUniqueWithinRecord(column_list=[f"{k}_norm" for k in TEXT_FIELDS]),
        )
    )
    suite.add_expectation(
        named("duplicate_triplet", gxe.ExpectColumnValuesToBeInSet(column="repeats_earlier_row", value_set=[False]))
    )
    suite.add_expectation(
        named("near_miss_unchanged", gxe.ExpectColumnValuesToBeInSet(column="near_miss_unchanged", value_set=[False]))
    )
    suite.add_expectation(named("wrong_domain", gxe.ExpectColumnValuesToBeInSet(column="domain", value_set=[domain])))
    suite.add_expectation(
        named(
            "negative_near_paraphrase",
            gxe.ExpectColumnValuesToBeBetween(column="neg_sim", max_value=params.max_neg_sim),
        )
    )
    return suite


def _validate(df: pd.DataFrame, params: ValidateParams, domain: str) -> list:
    """Run the row suite on ``df``."""
    return run_suite(df, lambda: _row_suite(params, domain))


def run_suite(df: pd.DataFrame, make_suite: Callable[[], Any]) -> list:
    """Run the suite ``make_suite`` builds (once the context exists) on a dataframe, in an ephemeral GX
    context (nothing written to disk, no progress bars); the results, one per expectation, with their
    unexpected row indexes."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        progress_bars=ProgressBarsConfig(globally=False),
        analytics_enabled=False,
    )
    context = gx.get_context(mode="ephemeral", project_config=config)
    asset = context.data_sources.add_pandas("frame").add_dataframe_asset("rows")
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": df})
    return batch.validate(make_suite(), result_format="COMPLETE").results


def negative_similarity(rows: list[dict[str, Any]], model: SentenceTransformer, batch_size: int) -> np.ndarray:
    """cos(anchor, negative) under the base model for each row (NaN where a text is missing)."""
    from cachelora.base_model import encode_unique

    pairs = [(r.get("anchor"), r.get("negative")) for r in rows]
    usable = {i: (a, n) for i, (a, n) in enumerate(pairs) if isinstance(a, str) and isinstance(n, str) and a and n}
    vectors = encode_unique(model, [t for pair in usable.values() for t in pair], batch_size, desc="negative check")
    sims = np.full(len(rows), np.nan)
    for i, (a, n) in usable.items():
        sims[i] = float(np.dot(vectors[a], vectors[n]))
    return sims


def check_triplets(
    rows: list[dict[str, Any]], params: ValidateParams, domain: str, neg_sim: np.ndarray, source: str
) -> QualityReport:
    """Run the row expectations, split rows into passed/quarantined, then the dataset checks."""
    if not rows:
        raise CacheloraError(f"{source}: no rows to validate")
    df = _frame(rows, neg_sim)
    reasons: list[list[str]] = [[] for _ in rows]
    failed: dict[str, int] = {}
    for result in _validate(df, params, domain):
        reason = result.expectation_config.meta["reason"]
        if result.exception_info and result.exception_info.get("raised_exception"):
            raise CacheloraError(
                f"{source}: expectation {reason} could not run: {result.exception_info['exception_message']}"
            )
        bad = result.result.get("unexpected_index_list") or []
        if bad:
            failed[reason] = len(bad)
        for index in bad:
            reasons[index].append(reason)

    passed = [row for row, why in zip(rows, reasons, strict=True) if not why]
    quarantined = [{**row, "reasons": why} for row, why in zip(rows, reasons, strict=True) if why]
    metrics = {
        "rows_in": len(rows),
        "passed": len(passed),
        "quarantined": len(quarantined),
        "quarantined_fraction": round(len(quarantined) / len(rows), 6),
        "failed_expectations": dict(sorted(failed.items())),
    }
    if np.isfinite(neg_sim).any():
        metrics["negative_similarity"] = {
            "mean": round(float(np.nanmean(neg_sim)), 6),
            "max": round(float(np.nanmax(neg_sim)), 6),
        }
    problems = []
    if len(passed) < params.min_rows:
        problems.append(f"passed rows {len(passed)} < validate.min_rows {params.min_rows}")
    if metrics["quarantined_fraction"] > params.max_bad_fraction:
        share = metrics["quarantined_fraction"]
        problems.append(f"quarantined share {share:.3f} > validate.max_bad_fraction {params.max_bad_fraction}")
    if problems:
        detail = ", ".join(f"{k}={v}" for k, v in sorted(failed.items())) or "none"
        raise CacheloraError(f"{source}: dataset check failed: {'; '.join(problems)} (failed expectations: {detail})")
    log.info("%s: %d passed, %d quarantined", source, len(passed), len(quarantined))
    return QualityReport(passed, quarantined, metrics)
