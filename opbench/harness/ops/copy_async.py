"""COPY_ASYNC: the async-copy contract (harness/contracts.py) as cases of ``opbench test``.

Each case runs one contract check at one size, dtype and device count; the check judges
itself (bit-exact data, clause named in the failure).  Gated checks need the backend's
``hold`` hook (deterministic slow work on the source); ``race`` needs none: ungated seeded
trials, repeated under several delay seeds on a backend with a delay knob, so a copy that
does not wait for its source fails every run, not most.
"""

from __future__ import annotations

from typing import Any

from .. import contracts
from ..cases import Axis, Case, Impossible, OpSpec

# elements: one element .. 4 MiB of f32 on the axis (in every pair, and in --quick)
SIZES = (1, 7, 4099, 1 << 20)
#: 64 MiB of f32: one case per gated check and the chain, in the full table (not --quick).
#: A gated check at this size costs about as much as at any size (its settle and probe waits,
#: 0.5-1.2 s) plus ~0.5 s of payload and copies on the cpu backend
LARGEST = 1 << 24
#: (check, dtype, devices) of the 64 MiB cases; ``race`` draws sizes per copy up to 64 Ki
#: elements (its trials repeat under several delay seeds), so it has none
LARGEST_CASES = (("source", "f32", 2), ("dest_read", "bf16", 2), ("host", "f16", 2),
                 ("sync", "f32", 2), ("many", "f32", 2), ("chain", "f16", 4))
RACE_DELAY_SEEDS = (0, 1, 2)
GATED = ("source", "dest_read", "host", "sync", "many")


def _sizes_up_to(n: int) -> tuple[int, ...]:
    return tuple(s for s in contracts.SIZES if s < n) + (n,)


class CopyAsyncSpec(OpSpec):
    name = "COPY_ASYNC"
    method = "copy_async"
    exact = True
    axes = (
        Axis("check", ("source", "dest_read", "host", "sync", "many", "chain", "race")),
        Axis("type", ("f32", "f16", "bf16")),
        Axis("n", SIZES),
        Axis("ndev", (2, 3, 4)),
    )
    impossible = (
        Impossible("check", GATED, "ndev", (3, 4), "a clause check uses one pair of devices"),
        Impossible("check", ("race",), "type", ("f16", "bf16"),
                   "the race trials draw a dtype per copy"),
    )
    strength = 2  # gated checks wait out SETTLE_S each: pairs keep the table to seconds

    def validate(self, case: Case) -> None:
        if case["check"] not in self.axis_values()["check"]:
            raise ValueError(f"check={case['check']} is not a COPY_ASYNC contract check")

    def extra_cases(self) -> list[Case]:
        return [Case.make(self.name, check=check, type=dtype, n=LARGEST, ndev=ndev)
                for check, dtype, ndev in LARGEST_CASES]

    def unsupported(self, backend: Any, case: Case) -> str | None:
        """Why ``backend`` cannot run ``case`` (None: it can)."""
        if not backend.implements(self.method):
            return f"{backend.name} does not implement COPY_ASYNC"
        if case["check"] in GATED + ("chain",) and not backend.implements("hold"):
            return f"{backend.name} has no hold() hook to queue deterministic slow work"
        try:
            backend.devices(case["ndev"])
        except Exception as exc:  # noqa: BLE001 - any refusal means: not this many devices
            return f"{backend.name} cannot open {case['ndev']} devices: {exc}"
        return None

    def run_check(self, backend: Any, case: Case, seed: int) -> None:
        """Raise contracts.ContractViolation when the backend breaks the contract."""
        check, n, dtype = case["check"], case["n"], case["type"]
        if check == "race":
            return self._race(backend, case, seed)
        if check == "many":
            return contracts.check_many_copies_one_synchronize(backend, seed, _sizes_up_to(n))
        if check == "chain":
            return contracts.check_chain(backend, seed, n_devices=case["ndev"], n=n, dtype=dtype)
        run = {"source": contracts.check_copy_waits_for_source,
               "dest_read": contracts.check_destination_waits_for_copy,
               "host": contracts.check_host_not_blocked,
               "sync": contracts.check_synchronize_waits}[check]
        return run(backend, seed, n=n, dtype=dtype)

    def _race(self, backend: Any, case: Case, seed: int) -> None:
        """Ungated trials under several delay seeds: on a backend with a delay knob each seed
        runs on a sibling backend with delays on; otherwise on ``backend`` as it is."""
        sizes = _sizes_up_to(min(case["n"], 1 << 16))
        knobs = {option.name for option in backend.OPTIONS}
        if not {"delay", "delay_seed"} <= knobs:
            return contracts.check_random_trials(backend, seed, n_devices=case["ndev"],
                                                 sizes=sizes)
        for delay_seed in RACE_DELAY_SEEDS:
            sibling = _delayed_sibling(backend, delay_seed)
            try:
                contracts.check_random_trials(sibling, seed, n_devices=case["ndev"],
                                              sizes=sizes)
            finally:
                sibling.close()

    def cost(self, case: Case) -> float:
        return float(case["n"]) + (1e6 if case["check"] != "race" else 4e6)


def _delayed_sibling(backend: Any, delay_seed: int) -> Any:
    """``backend`` with delays on: its own ``delayed_sibling`` when it has one (a rank's
    backend, whose sibling must be a rank of the same process group), else a new instance."""
    own = getattr(backend, "delayed_sibling", None)
    if own is not None:
        return own(delay_seed)
    return type(backend)(**{**backend.options, "delay": True, "delay_seed": delay_seed})
