"""Say in words when a run is failing, while it runs.

The most reported failure in this field is a run that trains for hours and learns nothing:
a partial weight load leaves the loss stuck, no gradient reaches the projector, the LLM ignores
the image slots, or most images fail to load. Each check below watches one symptom; when it
fires, the run prints `! ALARM ...` once, writes it to TensorBoard (text `alarms` and scalar
`alarm/<kind>`) and to summary.json (`alarms`), and the periodic log line names it until the
run ends. A healthy run (the demo, the tests' short runs) never fires one.

A run shorter than JUDGE_AFTER steps (a smoke test, a dry run) is too short for the soft checks:
a loss that moved less than 2% or a small image gap say nothing yet. There, only what no
training at all can produce fires (a held-out loss that did not move at all, an image that
changes nothing, a zero gradient); the rest is printed once as "too short to judge" and listed
in summary.json (`alarms_too_short_to_judge`), never as an alarm.
"""

from __future__ import annotations

from typing import Any

from utils import console

GAP_FLOOR = 0.05        # nats/token: below this the image-ablation gap is noise (an untrained
                        # projector gives ±0.05..0.2 on the toy world; a working one 0.4..1.7)
FLAT_LOSS = 0.02        # a train loss that moved less than 2% from its first steps "did not move"
FLAT_EVAL = 0.005       # the held-out loss (same samples each time: no batch noise) moved less than 0.5%
SKIP_RATE = 0.05        # more than 5% of the samples tried could not be used
WINDOW = 10             # steps averaged at each end when comparing losses
MIN_SAMPLES = 100       # skip rate is judged after this many samples tried
JUDGE_AFTER = 100       # steps before which a slow start is normal: the soft checks wait for it
UNMOVED = 1e-6          # relative change of a loss (or a gap in nats) that only no update at all gives

ADVICE = {
    "image_gap": "the LLM is not using the image slots: check the tower/LLM pairing, the feature layer "
                 "(--feature_layer/--feature_select), the learning rate, and that the projector is trained",
    "grad_zero": "no gradient reaches the projector: check that its output reaches the LLM (image slots in "
                 "the prompt, the image token id) and that the loss has supervised tokens",
    "flat_loss": "the loss has not moved: check --lr (0 or far too small?), that the projector is trainable, "
                 "and the first sample the run printed",
    "skip_rate": "many samples cannot be used: check --data_root/--image_root and the skip reasons",
}


class Alarms:
    """Checks one run's symptoms; `logger` (a RunLogger or None) receives what fires. Only rank 0
    raises alarms (`enabled`): loss and gradient are the same on every rank, so the others would
    only repeat them. `flat_after`: the step by which the loss must have moved (after warmup);
    `gap_after`: the step from which the image-ablation gap must be clearly above zero."""

    def __init__(self, logger: Any, flat_after: int, gap_after: int, eval_loss_before: float | None = None,
                 enabled: bool = True):
        self.logger, self.flat_after, self.gap_after, self.enabled = logger, flat_after, gap_after, enabled
        self.eval_loss_before = eval_loss_before   # the held-out loss at step 0, before any update
        self.fired: list[dict] = []
        self.too_short: list[dict] = []             # soft checks that would have fired, in a run too short to judge

    @property
    def active(self) -> list[str]:
        return [a["kind"] for a in self.fired]

    def _fire(self, step: int, kind: str, detail: str) -> None:
        if kind in self.active or not self.enabled:
            return
        message = f"{detail}: {ADVICE[kind]}"
        self.fired.append({"step": step, "kind": kind, "message": message})
        console.warn(f"ALARM at step {step}: {message}")
        if self.logger is not None:
            self.logger.text("alarms", f"step {step} ({kind}): {message}", step)
            self.logger.log(step, {f"alarm/{kind}": 1.0})

    def _too_short(self, step: int, kind: str, detail: str) -> None:
        """What a soft check saw in a run too short to judge: said once, never an alarm."""
        if kind in (a["kind"] for a in self.too_short + self.fired) or not self.enabled:
            return
        self.too_short.append({"step": step, "kind": kind, "detail": detail})
        console.info(f"  note: {detail}; too short to judge before step {JUDGE_AFTER} (not an alarm)")

    def step(self, step: int, losses: list[float], grad_norm: float) -> None:
        """After each optimizer step: the gradient norm, and whether the training loss moved.
        Batches differ, so the training loss only tells a loss that stayed put within 2%; the
        held-out check in eval() sees smaller stalls."""
        if grad_norm == 0.0:
            self._fire(step, "grad_zero", f"gradient norm is exactly 0 at step {step}")
        if step == self.flat_after and len(losses) >= 2 * WINDOW:
            first, last = sum(losses[:WINDOW]) / WINDOW, sum(losses[-WINDOW:]) / WINDOW
            if abs(first - last) <= FLAT_LOSS * abs(first):
                detail = f"loss {first:.4f} over the first {WINDOW} steps, {last:.4f} over the last {WINDOW} (step {step})"
                if step < JUDGE_AFTER:
                    self._too_short(step, "flat_loss", detail)
                else:
                    self._fire(step, "flat_loss", detail)

    def data(self, step: int, skipped: int, used: int) -> None:
        """Skip rate over the samples the loader tried during training."""
        tried = skipped + used
        if tried >= MIN_SAMPLES and skipped > SKIP_RATE * tried:
            self._fire(step, "skip_rate", f"{skipped} of {tried} samples skipped ({skipped / tried:.1%})")

    def eval(self, step: int, metrics: dict) -> None:
        """After a held-out evaluation: the loss must differ from the one before training (the
        same samples, so any update shows), and the image-ablation gap must have left zero by
        `gap_after`."""
        loss, gap = metrics["eval/loss"], metrics.get("eval/image_ablation_gap")
        judged = step >= JUDGE_AFTER
        if step == 0:
            self.eval_loss_before = loss
        elif self.eval_loss_before is not None:
            moved = abs(loss - self.eval_loss_before)
            detail = f"held-out loss {loss:.4f} at step {step}, {self.eval_loss_before:.4f} before training"
            if moved <= (FLAT_EVAL if judged else UNMOVED) * self.eval_loss_before:
                self._fire(step, "flat_loss", detail)
            elif moved <= FLAT_EVAL * self.eval_loss_before:
                self._too_short(step, "flat_loss", detail)
        if gap is not None and step >= self.gap_after and gap < GAP_FLOOR:
            detail = f"image-ablation gap {gap:+.4f} nats at step {step}"
            if judged or abs(gap) <= UNMOVED:
                self._fire(step, "image_gap", detail)
            else:
                self._too_short(step, "image_gap", detail)
