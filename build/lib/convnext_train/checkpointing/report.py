"""What a save cost the training loop: the row it adds to metrics.jsonl."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class SaveReport:
    step: int
    seconds: float  # the loop's wait (for an async save: until its tensors were staged)
    peak_rss_mb: float | None  # this process's resident memory above where it stood before the save

    def row(self) -> dict[str, Any]:
        row = {"step": self.step, "checkpoint_seconds": self.seconds}
        if self.peak_rss_mb is not None:  # Linux only
            row["checkpoint_peak_rss_mb"] = self.peak_rss_mb
        return row


def measure_peak_rss(work):
    """(work(), the process's peak resident memory during it above where it started, in MB).
    Linux resets the peak (VmHWM) on request; elsewhere the second value is None."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
        before = _status_kb("VmRSS")
    except OSError:
        return work(), None
    result = work()
    return result, (_status_kb("VmHWM") - before) / 1024


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} is not in /proc/self/status")
