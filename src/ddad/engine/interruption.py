"""What lets training stop cleanly and resume exactly: stop signals that wait for the step to finish, and
the state of the global generators that dropout draws from (saved in every checkpoint)."""

from __future__ import annotations

import signal
import threading

import torch


class StopSignals:
    """Between :meth:`install` and :meth:`restore` (in the main thread): the first SIGINT or SIGTERM is only
    recorded, so that training can finish its step and save; a second one interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._saved: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._saved = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def restore(self) -> None:
        for s, handler in self._saved.items():
            signal.signal(s, handler)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The global generators' states (the CPU's, and the device's on CUDA): what dropout draws from."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
