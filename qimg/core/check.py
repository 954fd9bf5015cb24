"""CheckResult: what a format's consistency check found (qemu's BdrvCheckResult)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CheckResult:
    """Counts as ``qemu-img check`` reports them; ``messages`` are per-cluster diagnostics for stderr."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    messages: list = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """qemu-img check's status: 1 check failed, 2 corruptions, 3 leaks only, 0 clean."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        return 3 if self.leaks else 0

    def __getitem__(self, key):
        return getattr(self, key.replace("-", "_"))


def check_then_recheck(run_check, repair: str | None) -> CheckResult:
    """Run ``run_check(repair)``; after a repair run it again without repairing, as qemu-img reports
    the second pass, carrying the fixed counts and the first pass's messages over."""
    res = run_check(repair)
    if repair and (res.corruptions_fixed or res.leaks_fixed):
        again = run_check(None)
        again.corruptions_fixed, again.leaks_fixed = res.corruptions_fixed, res.leaks_fixed
        again.messages = res.messages + again.messages
        return again
    return res
