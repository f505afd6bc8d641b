"""The runtime protocol: `load(model, **options) -> Session`; `Session.run(feeds) -> outputs`; `describe()`."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Session(Protocol):
    """A model loaded on a runtime.

    run: input name -> array in, output name -> array out (in the model's output order).
    describe: facts about how the model is executed (threads, kernels chosen, cache hits, hardware cost of the
    last run...). `optimize bench` and `optimize run --report` put it into the report under the runtime's name.
    """

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def describe(self) -> dict: ...
