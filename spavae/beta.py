"""Dynamic KL weight: the incremental PI controller of the original spaVAE (ALGORITHM section 5)."""

from __future__ import annotations

import math
from collections import deque


class PIController:
    """Steer beta so that the KL per spot approaches ``target``.

    At each call, with error ``e = error_gain * (target - measured)`` and ``f(x) = 1 / (1 + exp(x))``,
    the state moves by ``kp * (f(e) - f(e_prev)) + ki * e`` (the integral step is frozen while the
    state is below ``beta_min``); the returned beta is the state clipped to ``[beta_min, beta_max]``.
    As in the original the state itself is not clipped (windup above ``beta_max``).

    Parameters
    ----------
    target
        Target KL per spot (the original: 0.025 times the latent dimension).
    beta_init, beta_min, beta_max
        Initial state and the clipping bounds (10, 4, 25).
    kp, ki, error_gain
        Controller gains (0.01, -0.005, 5).
    window
        The measured KL is the mean of the last ``window`` values passed to :meth:`step` (10).
    """

    def __init__(self, target: float, *, beta_init: float = 10.0, beta_min: float = 4.0, beta_max: float = 25.0,
                 kp: float = 0.01, ki: float = -0.005, error_gain: float = 5.0, window: int = 10):
        if not beta_min <= beta_max:
            raise ValueError(f"beta_min ({beta_min}) must not exceed beta_max ({beta_max})")
        if window < 1:
            raise ValueError(f"the KL window must hold at least one value, got {window}")
        self.target, self.beta_min, self.beta_max = target, beta_min, beta_max
        self.kp, self.ki, self.error_gain = kp, ki, error_gain
        self.state = float(beta_init)
        self.previous_error = 0.0
        self.window = window
        self.history: deque[float] = deque()

    @property
    def beta(self) -> float:
        """The current beta (the clipped state)."""
        return min(max(self.state, self.beta_min), self.beta_max)

    def update(self, measured: float) -> float:
        """One controller step on a measured KL; returns the new beta."""
        error = self.error_gain * (self.target - measured)
        proportional = self.kp * (_logistic_complement(error) - _logistic_complement(self.previous_error))
        integral = 0.0 if self.state < self.beta_min else self.ki * error
        self.state += proportional + integral
        self.previous_error = error
        return self.beta

    def step(self, kl_per_spot: float) -> float:
        """Push one training step's KL per spot into the window and update on the window mean."""
        self.history.append(float(kl_per_spot))
        beta = self.update(sum(self.history) / len(self.history))
        if len(self.history) >= self.window:
            self.history.popleft()
        return beta

    def state_dict(self) -> dict:
        """Everything needed to resume the controller."""
        return {"state": self.state, "previous_error": self.previous_error, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`."""
        self.state, self.previous_error = state["state"], state["previous_error"]
        self.history = deque(state["history"])


def _logistic_complement(x: float) -> float:
    """``1 / (1 + exp(x))`` without overflow."""
    if x >= 0:
        z = math.exp(-x)
        return z / (1.0 + z)
    return 1.0 / (1.0 + math.exp(x))
