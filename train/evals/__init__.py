"""Evaluations, in one package: the robustness suite (robustness.py), the lexinvariant probes
(lexinv.py), the LCM and sentence-decoder metrics (lcm.py) and the table / PNG writers
(report.py). Families call them from their `eval_suite` hook and the trainer dispatches; these
modules get what they score (a trainer `Setup`, parameters, loaded runs) as arguments and
import no family, trainer or run loader (tests/test_layering.py)."""
