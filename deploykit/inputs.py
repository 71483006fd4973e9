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
    from .data.synthetic import SYNTH_BATCH, native_bf16, synthesize_from_bn

    notes.append(DATA_FREE_NOTE)
    console.print(f"[yellow]warning:[/] {DATA_FREE_NOTE}")
    n_cal, n_check = data_cfg.synthetic_images, min(16, data_cfg.check_images)
    bf16 = native_bf16() if data_cfg.synthetic_precision == "auto" else data_cfg.synthetic_precision == "bf16"
    inputs = StageInputs()
    synthetic: list[np.ndarray] = []

    def synth() -> np.ndarray:
        # One optimisation for both sets (the cost is per step, not per image); split afterwards so the
        # parity checks run on inputs the calibration never saw.
        if not synthetic:
            from rich.progress import Progress

            from .measure import stopwatch

            batches = -(-(n_cal + n_check) // SYNTH_BATCH)  # the progress bar counts optimisation steps
            with Progress(console=console, transient=True) as bar, stopwatch() as sw:
                task = bar.add_task(f"synthesizing {n_cal + n_check} data-free inputs from BatchNorm statistics",
                                    total=batches * data_cfg.synthetic_steps)
                synthetic.append(synthesize_from_bn(teacher, pre.input_size, n=n_cal + n_check,
                                                    steps=data_cfg.synthetic_steps, seed=data_cfg.seed, bf16=bf16,
                                                    progress=lambda: bar.advance(task)))
            inputs.origin = {"kind": "synthetic", "images": n_cal + n_check, "held_out": n_check,
                             "steps": data_cfg.synthetic_steps, "precision": "bf16" if bf16 else "fp32",
                             "seconds": round(sw["seconds"], 2)}
        return synthetic[0]

    inputs.calibration_fn, inputs.check_fn = (lambda: synth()[:n_cal]), (lambda: synth()[n_cal:])
    return inputs
