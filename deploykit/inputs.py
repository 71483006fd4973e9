"""The inputs stages calibrate and check on: real images from the data splits, or synthesized ones (data-free).

Example:
    >>> inputs = stage_inputs(teacher, preprocessing, splits, recipe.data, console, notes)
    >>> inputs.calibration().shape
    (512, 1, 28, 28)
"""

from __future__ import annotations

import numpy as np

from .stages.state import StageInputs

DATA_FREE_NOTE = ("No --data given: calibrated on inputs synthesized from the model's BatchNorm statistics "
                  "(data-free, ZeroQ-style). Accuracy was NOT measured; fidelity is measured on held-out "
                  "synthetic inputs. Pass --data for real numbers.")


def stage_inputs(teacher, pre, data, data_cfg, console, notes: list[str]) -> StageInputs:
    """Calibration and parity-check inputs, built only when a stage first asks for them.

    Args:
        teacher: the original model (data-free inputs are synthesized from its BatchNorm statistics).
        pre: the model's Preprocessing.
        data: DataSplits, or None for the data-free path.
        data_cfg: the recipe's DataConfig (sizes, seed).
        console: where progress is shown; ``notes`` collects what the report must say.
    """
    if data is not None:
        check = data.eval.head(data_cfg.check_images, seed=data_cfg.seed + 1)
        return StageInputs(calibration_fn=lambda: data.calibration.load(pre, np.arange(len(data.calibration))),
                           check_fn=lambda: check.load(pre, np.arange(len(check))))
    from .data.synthetic import synthesize_from_bn

    notes.append(DATA_FREE_NOTE)
    console.print(f"[yellow]warning:[/] {DATA_FREE_NOTE}")
    n_cal, n_check = data_cfg.synthetic_images, min(16, data_cfg.check_images)
    synthetic: list[np.ndarray] = []

    def synth() -> np.ndarray:
        # One optimisation for both sets (the cost is per step, not per image); split afterwards so the
        # parity checks run on inputs the calibration never saw.
        if not synthetic:
            with console.status(f"synthesizing {n_cal + n_check} data-free inputs from BatchNorm statistics..."):
                synthetic.append(synthesize_from_bn(teacher, pre.input_size, n=n_cal + n_check,
                                                    steps=data_cfg.synthetic_steps, seed=data_cfg.seed))
        return synthetic[0]

    return StageInputs(calibration_fn=lambda: synth()[:n_cal], check_fn=lambda: synth()[n_cal:])
