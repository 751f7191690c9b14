"""The routing study: grids of small trainings that test what modality-aware routing buys.

``modalmoe study NAME`` loads ``launch/studies/NAME.yaml`` (:mod:`.spec`), trains every (arm, seed)
as an ordinary resumable run (:mod:`.runner`), probes each run's routing and experts on fixed tokens
(:mod:`.probe`, expert / concept MI in :mod:`.concepts`), and writes a markdown + PNG report
(:mod:`.aggregate`, :mod:`.report`, :mod:`.sections`; expert compute per modality in :mod:`.compute`).
The synthetic separation experiment (:mod:`.separation`) needs no training run. The metrics are pure
functions in :mod:`.metrics`.
"""

from .metrics import (
    canonical_target,
    effective_experts,
    linear_cka,
    load_cv,
    matched_agreement,
    max_mean_ratio,
    pairwise_cka,
    share_similarity,
    specialisation_index,
)
from .runner import StudyRunner
from .spec import StudySpec, list_studies, load_study, study_path

__all__ = [
    "StudyRunner",
    "StudySpec",
    "canonical_target",
    "effective_experts",
    "linear_cka",
    "list_studies",
    "load_cv",
    "load_study",
    "matched_agreement",
    "max_mean_ratio",
    "pairwise_cka",
    "run_study",
    "share_similarity",
    "specialisation_index",
    "study_path",
]


def run_study(name_or_path: str, overrides: list[str] | None = None, out_dir: str | None = None, *,
              jobs: int = 1, report_only: bool = False):
    """Load, run (skipping finished runs) and report a study; returns the report's path."""
    from .report import write_study_report

    spec = load_study(name_or_path, overrides)
    runner = StudyRunner(spec, out_dir, jobs=jobs)
    if report_only:
        return write_study_report(spec, runner.out)
    return runner.run()
