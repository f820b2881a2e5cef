"""Proposers: who writes the next train.py. Also callable: `propose(context)`.

    from autoresearch_kit import propose
    proposal = propose(context)                       # the default proposer (see make_proposer)
    proposal = propose(context, proposer="llm", model="qwen2.5-coder:7b",
                       base_url="http://localhost:11434/v1")
    p = propose.make_proposer("mutate", seed=1)       # or "llm", "replay", a folder of patches
    propose.human_proposal(parent_src, my_src, "try SwiGLU")   # a person's edit, validated

Every proposer returns a validated Proposal (applies, compiles, only train.py, not a
repeat, passes the integrity check) or raises ProposalError with a reason to show.

Which proposer "auto" picks (`make_proposer()` / `propose(context)`):

1. AUTORESEARCH_PROPOSER if set: `mutate`, `llm`, or a folder of patches (replay);
2. `llm` when an endpoint or model is configured: `model=`/`base_url=` given, or
   AUTORESEARCH_MODEL or OPENAI_BASE_URL in the environment;
3. otherwise `mutate`, the offline proposer. An OPENAI_API_KEY alone does not switch to
   the LLM: a key left in the environment must not break an offline session.

    python -m pytest tests/test_propose_edits.py tests/test_llm.py tests/test_mutate.py tests/test_replay.py -q
"""

from __future__ import annotations

import inspect
import os
import sys
import types
from pathlib import Path
from typing import Any, Callable

from autoresearch_kit.propose.base import (HistoryEntry, Proposal, ProposalContext, ProposalError, Proposer,
                                           source_hash, unified_diff)
from autoresearch_kit.propose.edits import (EditBlock, EditError, apply_edits, apply_unified_diff, describe_change,
                                            make_proposal, parse_reply, validate)
from autoresearch_kit.propose.llm import LLMProposer
from autoresearch_kit.propose.mutate import MutateProposer
from autoresearch_kit.propose.replay import ReplayProposer

__all__ = ["EditBlock", "EditError", "HistoryEntry", "LLMProposer", "MutateProposer", "Proposal",
           "ProposalContext", "ProposalError", "Proposer", "ReplayProposer", "apply_edits",
           "apply_unified_diff", "describe_change", "human_proposal", "make_proposal", "make_proposer",
           "parse_reply", "propose", "resolve_spec", "source_hash", "unified_diff", "validate"]

_CLASSES = {"mutate": MutateProposer, "llm": LLMProposer, "replay": ReplayProposer}
_ALIASES = {"offline": "mutate", "openai": "llm", "patches": "replay"}
_LLM_HINTS = ("model", "base_url", "api_key")


def resolve_spec(spec: str = "auto", **kwargs: Any) -> str:
    """The proposer kind "auto" (or an alias) stands for: "mutate", "llm" or "replay"."""
    spec = (spec or "auto").strip()
    if spec.lower() == "auto":
        env = os.environ.get("AUTORESEARCH_PROPOSER", "").strip()
        if env and env.lower() != "auto":
            return resolve_spec(env, **kwargs)
        if any(kwargs.get(k) for k in _LLM_HINTS) or os.environ.get("AUTORESEARCH_MODEL") \
                or os.environ.get("OPENAI_BASE_URL"):
            return "llm"
        return "mutate"
    kind = _ALIASES.get(spec.lower(), spec.lower())
    if kind in _CLASSES:
        return kind
    if Path(spec).is_dir():
        return "replay"
    msg = (f"Unknown proposer {spec!r}: use 'auto', 'mutate' (offline), 'llm' (an OpenAI-compatible "
           f"endpoint), 'replay' or a folder of .patch files")
    raise ValueError(msg)


def make_proposer(spec: "str | Proposer | None" = "auto", **kwargs: Any) -> Proposer:
    """Build a proposer from a name, or pass one through.

    Parameters
    ----------
    spec
        "auto" (see the module docstring), "mutate", "llm", "replay", a folder of
        patches, or a Proposer instance (returned as is).
    **kwargs
        Constructor arguments: MutateProposer(seed, p_two, max_tries); LLMProposer(model,
        base_url, api_key, max_attempts, stream, on_token, timeout, max_tokens, extra_body,
        edit_mode ("auto" | "edits" | "knobs"), context_size, structured, on_progress, ...);
        ReplayProposer(source). `seed` is accepted for every kind (only mutate uses it),
        so callers can pass it uniformly.

    Returns
    -------
    Proposer
        Something with `.name` and `.propose(context) -> Proposal`.
    """
    if spec is not None and not isinstance(spec, str):
        if not callable(getattr(spec, "propose", None)):
            msg = f"{spec!r} is not a proposer: it needs a .propose(context) -> Proposal method"
            raise TypeError(msg)
        return spec
    kind = resolve_spec(spec or "auto", **kwargs)
    cls = _CLASSES[kind]
    if kind == "replay" and "source" not in kwargs:
        if "patches" in kwargs:
            kwargs["source"] = kwargs.pop("patches")
        elif spec and Path(spec).is_dir():
            kwargs["source"] = spec
        else:
            msg = "The replay proposer needs patches: make_proposer('replay', source='patches/') or a list of edits"
            raise ValueError(msg)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    if "seed" not in accepted:
        kwargs.pop("seed", None)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        msg = f"{cls.__name__} does not take {', '.join(unknown)}; it takes {', '.join(sorted(accepted))}"
        raise TypeError(msg)
    return cls(**kwargs)


def human_proposal(parent: str, source: str, description: str, *, rationale: str = "",
                   parent_id: str | None = None, seen_hashes: "set[str] | None" = None) -> Proposal:
    """A person's own edit of train.py, validated like any other proposal (proposer "human").

    Raises
    ------
    ProposalError
        The edit changes nothing, does not compile, fails the integrity check, or (when
        `seen_hashes` is given) repeats a past experiment.
    """
    ctx = ProposalContext(program="", parent_source=parent, parent_id=parent_id,
                          seen_hashes=set(seen_hashes or ()))
    return make_proposal(ctx, source, description or "", proposer="human", rationale=rationale,
                         metadata={"attempts": 1})


def propose(context: ProposalContext, proposer: "str | Proposer | None" = None, *,
            on_token: Callable[[str], Any] | None = None, **kwargs: Any) -> Proposal:
    """Propose the next train.py for `context` (the cell-by-cell entry point).

    Parameters
    ----------
    context
        What the proposer sees (Lab.context() builds one).
    proposer
        None or "auto" for the default, a name, or a Proposer instance.
    on_token
        Streamed reply text, for the LLM proposer.
    **kwargs
        Passed to make_proposer when `proposer` is a name.
    """
    p = make_proposer(proposer or "auto", **kwargs)
    if on_token is not None and isinstance(p, LLMProposer):
        return p.propose(context, on_token=on_token)
    return p.propose(context)


class _CallableModule(types.ModuleType):
    """`autoresearch_kit.propose` is both this subpackage and the function `propose`."""

    def __call__(self, context: ProposalContext, proposer: "str | Proposer | None" = None, **kwargs: Any) -> Proposal:
        return propose(context, proposer, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
