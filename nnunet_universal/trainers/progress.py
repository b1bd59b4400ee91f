"""nnU-Net's local logger with per-domain curves: pseudo-Dice per domain and gate accuracy.

nnU-Net's ``LocalLogger`` only accepts its predefined keys and plots ``progress.png`` from them. This
subclass registers two more keys (``dice_per_domain``: one list of per-domain mean pseudo-Dice per
epoch; ``gate_accuracy``: one float per epoch, NaN without a gate) and writes them, next to the stock
``progress.png``, as ``progress_domains.png``. The stock plot stays untouched so nnU-Net users find what
they know; the stock keys (``mean_fg_dice`` -> ``ema_fg_dice`` -> ``checkpoint_best``) keep working.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from nnunetv2.training.logging.nnunet_logger import LocalLogger

#: Logging keys added to nnU-Net's LocalLogger (one value per epoch each).
EXTRA_KEYS = ("dice_per_domain", "gate_accuracy")
PLOT_NAME = "progress_domains.png"


class UniversalLocalLogger(LocalLogger):
    """``LocalLogger`` + per-domain pseudo-Dice and gate accuracy (checkpointed with the stock keys)."""

    def __init__(self, domain_names: Sequence[str], verbose: bool = False) -> None:
        super().__init__(verbose)
        self.domain_names = list(domain_names)
        self._register_extra_keys()

    def _register_extra_keys(self) -> None:
        """Add missing extra keys, padded with NaN to the logged epochs (old or stock checkpoints)."""
        n = len(self.my_fantastic_logging.get("epoch_end_timestamps", []))
        nan_domains = [math.nan] * len(self.domain_names)
        self.my_fantastic_logging.setdefault("dice_per_domain", [list(nan_domains) for _ in range(n)])
        self.my_fantastic_logging.setdefault("gate_accuracy", [math.nan] * n)

    def load_checkpoint(self, checkpoint: dict) -> None:
        """Restore every logged list (stock and extra) from a checkpoint; ``--c`` continues the curves."""
        super().load_checkpoint(checkpoint)
        self._register_extra_keys()

    def plot_progress_png(self, output_folder: str) -> None:
        """Stock ``progress.png`` plus ``progress_domains.png`` (per-domain pseudo-Dice, gate accuracy)."""
        super().plot_progress_png(output_folder)
        plot_domain_progress(self.my_fantastic_logging, self.domain_names, output_folder)


def plot_domain_progress(logging: dict, domain_names: Sequence[str], output_folder: str) -> str:
    """Write ``progress_domains.png`` in ``output_folder`` (atomic) and return its path.

    Drawn in the evaluation plots' own style (``evaluation.plots.plot_style``): nnU-Net's ``progress.png``
    sets global rcParams (font size) just before, which must not leak into this figure. Legends sit right of
    the axes, never over the curves; epochs are integer ticks.
    """
    from matplotlib.ticker import MaxNLocator

    from nnunet_universal.evaluation.plots import plot_style, save_figure

    n = min(len(v) for v in logging.values())  # epochs logged for every key, like the stock plot
    x = list(range(n))
    with plot_style() as plt:
        fig, axes = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, layout="constrained")
        ax = axes[0]
        per_domain = logging["dice_per_domain"][:n]
        for d, name in enumerate(domain_names):
            ax.plot(x, [row[d] if d < len(row) else math.nan for row in per_domain], marker="o", ms=3, label=name)
        ax.plot(x, logging["mean_fg_dice"][:n], color="k", ls="--", label="mean over domains")
        ax.plot(x, logging["ema_fg_dice"][:n], color="k", ls="-", label="mean (mov. avg.)")
        ax.set(ylabel="pseudo Dice\n(own domain head)", ylim=(0, 1.02),
               title="Validation per domain (each epoch's validation patches)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        ax = axes[1]
        ax.plot(x, logging["gate_accuracy"][:n], color="tab:purple", marker="o", ms=3, label="gate accuracy")
        ax.set(xlabel="epoch", ylabel="gate accuracy\n(patches routed to\ntheir own domain)", ylim=(-0.02, 1.02))
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        for a in axes:
            a.grid(alpha=0.3)
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
            if n <= 1:
                a.set_xlim(-0.5, 0.5)
        return str(save_figure(fig, Path(output_folder) / PLOT_NAME))
