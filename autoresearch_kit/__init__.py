"""autoresearch_kit: an AI agent edits train.py, a fixed budget trains it, validation
bits-per-byte scores it, and a person approves, rejects or edits each step in Jupyter.

    from autoresearch_kit import Lab, Budget
    lab = Lab("my_lab", budget="60s")
    lab.baseline()
    lab.panel()            # in JupyterLab: diffs, live loss curves, approve/reject

The public surface is small and imported lazily: train.py's process imports
`autoresearch_kit.harness` and must not pay for pandas, ipywidgets or openai.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_EXPORTS = {
    "Budget": "autoresearch_kit.config",
    "detect": "autoresearch_kit.device",
    "Device": "autoresearch_kit.device",
    "prepare": "autoresearch_kit.data",
    "evaluate_bpb": "autoresearch_kit.metric",
    "causality_probe": "autoresearch_kit.metric",
    "run_budgeted": "autoresearch_kit.runner",
    "RunResult": "autoresearch_kit.runner",
    "Ledger": "autoresearch_kit.ledger",
    "Workspace": "autoresearch_kit.workspace",
    "Proposal": "autoresearch_kit.propose.base",
    "ProposalContext": "autoresearch_kit.propose.base",
    "ProposalError": "autoresearch_kit.propose.base",
    "LLMProposer": "autoresearch_kit.propose.llm",
    "MutateProposer": "autoresearch_kit.propose.mutate",
    "ReplayProposer": "autoresearch_kit.propose.replay",
    "Lab": "autoresearch_kit.lab",
}

# `propose` is the subpackage autoresearch_kit/propose, made callable:
# `from autoresearch_kit import propose; propose(context)` calls the default proposer.
__all__ = sorted(_EXPORTS) + ["propose", "__version__"]


def __getattr__(name: str):
    if name == "propose":  # the callable subpackage (see above)
        return importlib.import_module("autoresearch_kit.propose")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    msg = f"module 'autoresearch_kit' has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__():
    return __all__
