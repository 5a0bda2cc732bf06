"""Profile drift: a torch run's own copy and expert FFN times against those its hardware profile predicts for the
same work, so that a profile measured on a busier (or quieter, or other) machine says so.

    python -m moesim run backend=torch hardware=mine.yaml ...   # summary.json: profile_check; notes on drift

The backend already times every copy and every layer's device experts for its profiler; this adds up those
times and, beside them, the profile's: copy_ms(bytes per expert) per copy, and per layer expert_ms(tokens) of
each device expert, the shared experts over the step's tokens and the write-back of the copies before it
(writeback_ms), as the sim backend charges a layer. Host experts are not compared. Where the profile's total
differs from the observed one by more than DRIFT, a note says so (a preset's numbers describe a datasheet's
GPU, not this machine: there the difference is expected, and the note says that instead). The bookkeeping
costs about 1 us per layer on the 2-core VM (0.1% of a gpt-oss-20b step at scale 1/8), in the replay's own time.
"""
from __future__ import annotations

DRIFT = 0.10  # |profile / observed - 1| above which a run says its profile is off


class DriftCheck:
    """Observed and predicted totals of one torch run under `hardware` (a HardwareProfile); `spec` the stored
    model spec, `nbytes` the bytes of one copy, `pinned` whether copies come from pinned memory."""

    def __init__(self, hardware, spec, nbytes: int, pinned: bool):
        self.hardware, self.spec, self.nbytes = hardware, spec, nbytes
        self.copy_profile_ms = hardware.copy_ms(nbytes, pinned)  # ms per copy
        self.copies, self.copy_ms = 0, 0.0  # copies reported, their summed ms
        self.experts, self.ffn_ms, self.ffn_profile_ms = 0, 0.0, 0.0  # experts computed, observed ms, predicted ms
        self._loads = 0  # copies issued since the last layer (their write-back slows it)
        self._memo: dict = {}  # (tokens, shared) -> profile ms

    def _expert_ms(self, n: int, shared: bool = False) -> float:
        ms = self._memo.get((n, shared))
        if ms is None:
            ms = self._memo[(n, shared)] = self.hardware.expert_ms(n, self.spec, "device", shared=shared)
        return ms

    def load(self) -> None:
        """One copy issued."""
        self._loads += 1

    def layer(self, device, n_tokens: int) -> None:
        """The profile's time for one layer's device part: `device` [(key, slot, tokens)], the step's tokens."""
        shared = self.spec.shared_experts
        ms = sum(self._expert_ms(n) for _, _, n in device)
        if shared and n_tokens:
            ms += shared * self._expert_ms(n_tokens, shared=True)
        ms += self.hardware.writeback_ms(self._loads * self.nbytes)
        self._loads = 0
        self.ffn_profile_ms += ms
        self.experts += len(device) + (shared if n_tokens else 0)

    def observed_copy(self, ms: float) -> None:
        self.copies += 1
        self.copy_ms += ms

    def observed_layer(self, ms: float) -> None:
        """One layer's device part as it ran (its span)."""
        self.ffn_ms += ms

    def result(self, device_label: str) -> dict:
        """The comparison for summary.json's profile_check, with the notes to show ("notes")."""
        hw = self.hardware
        preset = hw.source.startswith("preset")
        kind = "preset" if preset else ("calibrated" if hw.conditions or hw.ffn_table or hw.copy_table else "written")
        r = {"profile": hw.name, "kind": kind, "threshold": DRIFT, "copy_bytes": self.nbytes, "copies": self.copies,
             "copy_ms_observed": None, "copy_ms_profile": self.copy_profile_ms, "copy_gbps_observed": None,
             "copy_gbps_profile": self.nbytes / self.copy_profile_ms / 1e6, "copy_error": None,
             "experts_computed": self.experts, "ffn_ms_observed": None, "ffn_ms_profile": None, "ffn_error": None}
        if self.copies:
            observed = self.copy_ms / self.copies
            r |= {"copy_ms_observed": observed, "copy_gbps_observed": self.nbytes / observed / 1e6 if observed > 0
                  else None, "copy_error": self.copy_profile_ms / observed - 1 if observed > 0 else None}
        if self.experts:
            r |= {"ffn_ms_observed": self.ffn_ms / self.experts, "ffn_ms_profile": self.ffn_profile_ms / self.experts,
                  "ffn_error": self.ffn_profile_ms / self.ffn_ms - 1 if self.ffn_ms > 0 else None}
        r["drift"] = any(e is not None and abs(e) > DRIFT for e in (r["copy_error"], r["ffn_error"]))
        r["notes"] = drift_notes(r, device_label, hw.conditions)
        return r


def _pct(x: float) -> str:
    return f"{x * 100:+.0f}%"


def drift_notes(r: dict, device_label: str, conditions: dict | None = None) -> list[str]:
    """The lines a run shows for profile_check `r` (errors: the profile's figure against the observed one, as
    a prediction's error: + where the profile is too slow, - where it is too fast); none when within DRIFT."""
    parts = []
    if r["copy_error"] is not None and abs(r["copy_error"]) > r["threshold"]:
        parts.append(f"copies ran at {r['copy_gbps_observed']:.2f} GB/s, the profile says "
                     f"{r['copy_gbps_profile']:.2f} (its copy times {_pct(r['copy_error'])})")
    if r["ffn_error"] is not None and abs(r["ffn_error"]) > r["threshold"]:
        parts.append(f"expert FFNs took {r['ffn_ms_observed']:.3f} ms each, the profile says "
                     f"{r['ffn_ms_profile']:.3f} ({_pct(r['ffn_error'])})")
    if not parts:
        return []
    what = "; ".join(parts)
    if r["kind"] == "preset":
        return [f"profile check: {what}: expected, the profile is the preset {r['profile']!r} (a datasheet's "
                f"numbers, not this {device_label}); calibrate this machine to compare (python -m moesim calibrate)"]
    busy = ""
    if conditions and (conditions.get("forced") or conditions.get("warnings")):
        busy = " (its conditions say it was measured on a busy machine)"
    return [f"profile drift: {what}: the profile {r['profile']!r}{busy} does not describe this machine as it runs "
            f"now (off by more than {r['threshold'] * 100:.0f}%): re-run calibrate, or run when the machine is quiet"]
